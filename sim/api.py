"""The Python API: run a comparison from a notebook or script and get its results table.

    from sim import run
    table = run("configs/benchmark.yaml", {"rounds": 5, "algorithms": ["fedavg", "fedprox"]})
    table.attrs["run_dir"]   # where the run wrote its files (report, checkpoints, metrics.parquet)

It is the CLI's `run` command without the printing: the same config keys, defaults and checks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["run"]


def run(
    config: str | Path | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | Sequence[str] = (),
    *,
    report: bool = True,
) -> pd.DataFrame:
    """Run every (algorithm, seed) of `config` and return its metrics rows as a DataFrame.

    `config`: a YAML path, a mapping of config keys, or None (the embedded defaults).
    `overrides`: {"train.lr": 0.01} or CLI-style ["train.lr=0.01"]; applied on top of `config`.
    Rows are (run_id, algorithm, seed, round, client_id, split, metric, value), as in metrics.parquet;
    `attrs["run_dir"]` names the run directory. A wrong key or value raises a one-line user error
    (`sim.typed.ConfigError` and kin), never a half-written run.
    """
    from sim.config import load_config
    from sim.orchestration.report import write_report
    from sim.orchestration.runner import run_comparison
    from sim.results import read_metrics

    sets = [f"{k}={json.dumps(v)}" for k, v in overrides.items()] if isinstance(overrides, Mapping) else list(overrides)
    result = run_comparison(load_config(config, sets))
    if report:
        write_report(result.run_dir)
    table = read_metrics(result.run_dir).to_pandas()
    table.attrs["run_dir"] = result.run_dir
    return table
