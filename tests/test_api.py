"""The Python API (`from sim import run`) and the packaging around it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import run_sim
from sim.typed import ConfigError
from tests.conftest import small_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_run_returns_the_metrics_table_of_the_run(ray_local, tmp_path):
    from sim import run

    base = {"algorithms": ["fedavg"], "rounds": 1}
    table = run(base, [*small_overrides(tmp_path), "rounds=2"])
    assert isinstance(table, pd.DataFrame)
    run_dir = Path(table.attrs["run_dir"])
    assert run_dir.parent == tmp_path / "results" and (run_dir / "report.md").is_file()
    assert set(table["algorithm"]) == {"fedavg"}
    assert sorted(table["round"].unique()) == [0, 1, 2]  # the override won over the mapping
    on_disk = pd.read_parquet(run_dir / "metrics.parquet")
    pd.testing.assert_frame_equal(table.reset_index(drop=True), on_disk.reset_index(drop=True), check_dtype=False)


def test_run_takes_overrides_as_a_mapping_and_rejects_bad_keys(tmp_path):
    from sim import run

    with pytest.raises(ConfigError, match="rounds must be >= 0"):
        run(None, {"rounds": -1, "out": str(tmp_path)})
    with pytest.raises(ConfigError, match="no_such_key"):
        run({"no_such_key": 1})


def test_console_script_is_the_cli():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    module, func = meta["project"]["scripts"]["warmfed-sim"].split(":")
    assert module == "run_sim" and getattr(run_sim, func) is run_sim.main
    assert "run_sim" in meta["tool"]["setuptools"]["py-modules"]
    assert not any(d.startswith("pytest") for d in meta["project"]["dependencies"])
