"""The long-format results table: one row per (algorithm, seed, round, client, split, metric).

Rows are written as one small Parquet part per (algorithm, seed, round) as the run goes, so a
crash loses at most the round in flight and everything written stays readable; `consolidate`
joins the parts into `metrics.parquet` at the end (and on resume, parts past the checkpoint
are dropped first, so a resumed run never double-counts).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from sim.files import replacing

if TYPE_CHECKING:
    import pandas as pd

SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("algorithm", pa.string()),
        ("seed", pa.int64()),
        ("round", pa.int64()),
        ("client_id", pa.int64()),
        ("split", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
    ]
)

Row = tuple[int, str, str, float]  # (client_id, split, metric, value)
RUN_LEVEL = -1  # client_id of run-level rows (bytes, wall time, phase costs)

# Metrics that measure the machine (seconds, rates, MiB, how many tasks the pool cut a round
# into, which follows measured times) rather than the method: they differ between identical
# runs, so reproducibility checks compare everything but these.
MEASUREMENT_SUFFIXES = ("_s", "per_s", "_mb", "_tasks")


def outcome_frame(run_dir: str | Path, ignore: Sequence[str] = ()) -> pd.DataFrame:
    """A run's metrics without machine measurements (or the extra `ignore` suffixes), in a fixed
    row order: two runs with the same config and seed must give equal frames."""
    df = read_metrics(run_dir).to_pandas()
    df = df[~df.metric.str.endswith((*MEASUREMENT_SUFFIXES, *ignore))].drop(columns="run_id")
    return df.sort_values(["algorithm", "seed", "round", "client_id", "split", "metric"]).reset_index(drop=True)


class ResultsWriter:
    def __init__(self, run_dir: str | Path, run_id: str) -> None:
        self.run_dir = Path(run_dir)
        self.run_id = run_id
        self.parts = self.run_dir / "metrics"

    def _part_dir(self, algorithm: str, seed: int) -> Path:
        return self.parts / algorithm / f"seed{seed}"

    def write(self, algorithm: str, seed: int, round: int, rows: Sequence[Row], tag: str = "") -> Path:
        """Write one part atomically (temp file + rename)."""
        directory = self._part_dir(algorithm, seed)
        directory.mkdir(parents=True, exist_ok=True)
        n = len(rows)
        table = pa.table(
            {
                "run_id": [self.run_id] * n,
                "algorithm": [algorithm] * n,
                "seed": [seed] * n,
                "round": [round] * n,
                "client_id": [r[0] for r in rows],
                "split": [r[1] for r in rows],
                "metric": [r[2] for r in rows],
                "value": [float(r[3]) for r in rows],
            },
            schema=SCHEMA,
        )
        path = directory / f"round_{round:05d}{tag}.parquet"
        with replacing(path) as tmp:
            pq.write_table(table, tmp)
        return path

    def drop_after(self, algorithm: str, seed: int, round: int) -> None:
        """Forget rows of rounds after `round` (they are recomputed by a resumed run)."""
        for part in self._part_dir(algorithm, seed).glob("round_*.parquet"):
            if int(part.stem.split("_")[1][:5]) > round:
                part.unlink()

    def drop_run(self, algorithm: str, seed: int) -> None:
        shutil.rmtree(self._part_dir(algorithm, seed), ignore_errors=True)

    def consolidate(self) -> Path:
        table = read_parts(self.parts)
        path = self.run_dir / "metrics.parquet"
        with replacing(path) as tmp:
            pq.write_table(table, tmp)
        return path


def read_parts(parts_dir: Path) -> pa.Table:
    files = sorted(Path(parts_dir).glob("*/seed*/round_*.parquet"))
    if not files:
        return SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f, schema=SCHEMA) for f in files])


def read_metrics(run_dir: str | Path) -> pa.Table:
    """All rows of a run: the consolidated table, or the parts of an unfinished run."""
    run_dir = Path(run_dir)
    consolidated = run_dir / "metrics.parquet"
    parts = read_parts(run_dir / "metrics")
    if parts.num_rows or not consolidated.exists():
        return parts
    return pq.read_table(consolidated)
