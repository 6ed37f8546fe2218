"""Progress bars and one-line round summaries (tqdm), silenced by `progress: false`."""

from __future__ import annotations

import math
import sys
from typing import Any

from tqdm import tqdm

from sim.metrics import SAMPLES, declared


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class Progress:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def bar(self, total: int, desc: str) -> Any:
        if not self.enabled or not sys.stderr.isatty():
            return _NullBar()  # bars in a log file are noise; the per-round summary lines remain
        return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)

    def note(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stderr)

    def report_round(self, algorithm: str, seed: int, round: int, rows: list) -> None:
        """Print the round's validation value of every metric declared with a progress label (sim/metrics.py)."""
        if self.enabled:
            tqdm.write(round_line(algorithm, seed, round, rows), file=sys.stderr)


def round_line(algorithm: str, seed: int, round: int, rows: list) -> str:
    """`fedavg seed 0 round 3 (val): global 0.812 personal 0.840`: each metric combined as it is declared.

    Validation, not test: settings are to be chosen on validation, and a stream of test numbers
    while a run goes invites choosing on test. Without a validation split, test it is (so labelled)."""
    split = "val" if any(r[1] == "val" for r in rows) else "test"
    sizes = {r[0]: r[3] for r in rows if r[1] == split and r[2] == SAMPLES}
    parts = [f"{algorithm} seed {seed} round {round} ({split}):"]
    for spec in declared():
        if not spec.progress:
            continue
        pairs = [
            (value, sizes.get(client, 0.0))
            for client, row_split, name, value in rows
            if row_split == split and name == spec.name
        ]
        value = spec.combine(pairs)
        if not math.isnan(value):
            parts.append(f"{spec.progress} {value:.3f}")
    return " ".join(parts)
