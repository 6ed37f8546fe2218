"""Paired comparisons with a reference method: per-seed differences, a bootstrap interval, wins.

Every method of a comparison runs on the same partition and clients per seed, so the honest
comparison is paired: for each seed, the difference of the two methods' accuracies over the same
clients; then the mean over seeds. Its 95 % interval is a bootstrap that resamples clients within
each seed (the same clients for both methods, so the pairing is kept) with the seeds fixed, and is
seeded, so a report is reproducible. "Wins" counts the seeds on which the method beats the
reference. With one seed the interval is the clients' spread only; with several, each seed's
client resample enters the mean, so seed-to-seed variation shows as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from sim.metrics import SAMPLES, SELECTION
from sim.metrics import metric as declared_metric
from sim.rng import stream_rng

#: Resamples of the bootstrap: the 2.5 % / 97.5 % percentiles settle to about ±0.001 at this size.
BOOTSTRAP = 2000
#: Bootstrap RNG seed (reports are reproducible).
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Paired:
    """A method minus the reference: mean over seeds, its 95 % interval and seeds won."""

    mean: float
    low: float
    high: float
    wins: int
    seeds: int

    def text(self, digits: int = 3) -> str:
        mean, low, high = (round(v, digits) + 0.0 for v in (self.mean, self.low, self.high))  # no "-0.000"
        return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}] ({self.wins}/{self.seeds})"


def _score(acc: np.ndarray, n: np.ndarray | None) -> np.ndarray:
    """Row-wise score of resampled clients: sample-weighted (pooled) when `n` is given, else the mean."""
    if n is None:
        return acc.mean(axis=-1)
    return (acc * n).sum(axis=-1) / n.sum(axis=-1)


def paired_difference(
    per_seed: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    resamples: int = BOOTSTRAP,
    seed: int = BOOTSTRAP_SEED,
) -> Paired:
    """`per_seed`: (method accuracy, reference accuracy, client weights or None) over the same
    clients, one tuple per seed. Weights make the score pooled (global accuracy: every test sample
    counts once); None makes it the client mean (personalized accuracy)."""
    if not per_seed:
        raise ValueError("paired_difference: no seeds to compare")
    rng = stream_rng(seed)
    diffs, boot = [], np.zeros(resamples)
    for acc, ref, n in per_seed:
        acc, ref = np.asarray(acc, float), np.asarray(ref, float)
        if acc.shape != ref.shape or acc.size == 0:
            raise ValueError("paired_difference: each seed needs the same, non-empty set of clients for both methods")
        weights = None if n is None else np.asarray(n, float)
        diffs.append(float(_score(acc, weights) - _score(ref, weights)))
        idx = rng.integers(0, acc.size, size=(resamples, acc.size))
        w = None if weights is None else weights[idx]
        boot += _score(acc[idx], w) - _score(ref[idx], w)
    boot /= len(per_seed)
    low, high = np.percentile(boot, [2.5, 97.5])
    return Paired(float(np.mean(diffs)), float(low), float(high), int(sum(d > 0 for d in diffs)), len(per_seed))


def client_scores(
    df: pd.DataFrame, chosen: pd.DataFrame, split: str = "test", metrics: tuple[str, ...] = SELECTION
) -> pd.DataFrame:
    """Per (algorithm, seed, client) at the chosen round of each (algorithm, seed): `metrics` and
    the sample count (the weight of a sample-weighted metric) from the long metrics table."""
    rows = df[(df.client_id >= 0) & (df.split == split) & df.metric.isin([*metrics, SAMPLES])]
    wide = rows.pivot_table(index=["algorithm", "seed", "round", "client_id"], columns="metric", values="value")
    wide = wide.reset_index()
    return wide.merge(chosen[["algorithm", "seed", "round"]], on=["algorithm", "seed", "round"])


def paired_against(scores: pd.DataFrame, reference: str, metric: str) -> dict[str, Paired | None]:
    """Per algorithm (not the reference): the paired difference of `metric` to the reference over
    the seeds both ran, on the clients both evaluated (None when there is nothing to pair)."""
    out: dict[str, Paired | None] = {}
    if metric not in scores:
        return out
    ref = scores[scores.algorithm == reference]
    for algo in dict.fromkeys(scores.algorithm):
        if algo == reference:
            continue
        mine = scores[scores.algorithm == algo]
        per_seed = []
        for seed, g in mine.groupby("seed"):
            both = g.merge(ref[ref.seed == seed], on="client_id", suffixes=("", "_ref"))
            both = both[both[metric].notna() & both[f"{metric}_ref"].notna()]
            if both.empty:
                continue
            weighted = declared_metric(metric).aggregate == "weighted" and SAMPLES in both
            n = both[SAMPLES].to_numpy() if weighted else None
            per_seed.append((both[metric].to_numpy(), both[f"{metric}_ref"].to_numpy(), n))
        out[algo] = paired_difference(per_seed) if per_seed else None
    return out
