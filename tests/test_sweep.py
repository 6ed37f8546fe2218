"""`run_sim.py sweep`: grids of runs, deterministic cells, validation first, resume, summary."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import run_sim
from sim.orchestration.sweep import cell_id, parse_grid, plan_sweep
from sim.typed import ConfigError
from tests.cli import cli, sets
from tests.conftest import session_address
from tests.faults import crash_env


def _base(tmp_path, *extra: str) -> list[str]:
    """A seconds-long cell: few clients, one round, a narrow model, results and cache in tmp."""
    return [
        "rounds=1",
        "clients_per_round=4",
        "progress=false",
        "model.width=8",
        "ray.pool_size=1",
        f"out={tmp_path / 'out'}",
        *extra,
    ]


def _argv(items, grid, *more):
    return [*sets(items), *[a for g in grid for a in ("--grid", g)], *more]


def _sweep(argv, capsys):
    code = run_sim.main(["sweep", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------- planning (no Ray)
def test_grid_parsing_and_fixed_keys():
    assert parse_grid(["algorithms=fedavg,local", "num_clients=10,100", "seed=0"]) == {
        "algorithms": ["fedavg", "local"],
        "num_clients": [10, 100],
        "seed": [0],
    }
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["seed=0,1", "seed=2"])
    for key in ("out", "cache_dir", "ray.address", "ray.num_cpus"):
        with pytest.raises(ConfigError, match=f"--grid {key}: cannot vary"):
            parse_grid([f"{key}=a,b"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_grid(["seed"])


def test_cells_are_the_product_with_deterministic_ids(tmp_path):
    sets = _base(tmp_path)
    a = plan_sweep(None, sets, ["algorithms=fedavg,local", "num_clients=6,8", "partition.alpha=1,0.5"], "s")
    assert len(a.cells) == 8
    assert a.cells[0].values == {"algorithms": "fedavg", "num_clients": 6, "partition.alpha": 1.0}
    # The id hashes the values as the config holds them: spelling and flag order do not matter.
    b = plan_sweep(None, sets, ["partition.alpha=1.0,0.5", "num_clients=6,8", "algorithms=fedavg,local"], "s")
    assert {c.id for c in a.cells} == {c.id for c in b.cells}
    assert len({c.id for c in a.cells}) == 8
    assert a.cells[0].id == cell_id({"algorithms": "fedavg", "num_clients": 6, "partition.alpha": 1.0})
    # One results tree and ONE cache for every cell.
    out = (tmp_path / "out").resolve()
    assert {Path(c.cfg.out) for c in a.cells} == {out / "sweeps" / "s" / "cells"}
    assert {c.cfg.cache_dir for c in a.cells} == {str(out / "cache")}
    assert all(c.cfg.run_id == c.id and c.cfg.algorithms == [c.values["algorithms"]] for c in a.cells)
    # Without --name the name is a hash of the command: the same command finds the same sweep.
    n1 = plan_sweep(None, sets, ["seed=0,1"]).name
    assert n1 == plan_sweep(None, sets, ["seed=0,1"]).name != plan_sweep(None, sets, ["seed=0,2"]).name


@pytest.mark.parametrize(
    "grid, extra, words",
    [
        (["nope=1,2"], [], ["unknown key nope"]),
        (["num_clients=6,abc"], [], ["num_clients", "expected an integer", "'abc'"]),
        (["algorithms=fedavg,fedavx"], [], ["unknown algorithm 'fedavx'"]),
        (["out=a,b"], [], ["--grid out", "cannot vary"]),
        # Only the LAST cell is bad: nothing may run before the error.
        (["num_clients=6,3"], [], ["clients_per_round (4) exceeds num_clients (3)", "num_clients=3"]),
        (["data.copies=1,0"], [], ["data.copies must be >= 1"]),
    ],
)
def test_bad_grid_is_one_clear_error_before_any_cell_runs(grid, extra, words, tmp_path, capsys):
    code, out, err = _sweep(_argv(_base(tmp_path, *extra), grid, "--name", "bad"), capsys)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and "Traceback" not in err
    for word in words:
        assert word in err
    assert not (tmp_path / "out" / "sweeps").exists()


def test_a_sweep_needs_a_grid(tmp_path, capsys):
    code, _, err = _sweep(_argv(_base(tmp_path), []), capsys)
    assert code == 2 and "--grid" in err


# ------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_sweep_runs_skips_finished_cells_and_summarizes(ray_local, tmp_path, capsys, monkeypatch):
    import sim.orchestration.runner

    real = sim.orchestration.runner.run_comparison
    calls: list[str] = []

    def interrupted_after_one(cfg, progress=None, **kwargs):
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C between cells
        calls.append(cfg.run_id)
        return real(cfg, progress, **kwargs)

    monkeypatch.setattr(sim.orchestration.runner, "run_comparison", interrupted_after_one)
    sets = _base(tmp_path, "num_clients=6")
    argv = _argv(sets, ["algorithms=fedavg,local", "partition.alpha=0.5"], "--name", "grid")
    with pytest.raises(KeyboardInterrupt):
        run_sim.main(["sweep", *argv])
    sweep_dir = tmp_path / "out" / "sweeps" / "grid"
    first = list(calls)
    assert len(first) == 1
    for cid in first:
        assert (sweep_dir / "cells" / cid / "done.json").exists()

    calls.clear()
    monkeypatch.setattr(
        sim.orchestration.runner,
        "run_comparison",
        lambda cfg, progress=None, **kw: (calls.append(cfg.run_id), real(cfg, progress, **kw))[1],
    )
    code, out, err = _sweep(argv, capsys)
    assert code == 0, err
    assert len(calls) == 1 and not set(calls) & set(first)  # finished cells are skipped, not rerun
    assert out.count("finished earlier, skipped") == 1

    # One cache: the fedavg and local cells share their partition.
    cells = json.loads((sweep_dir / "sweep.json").read_text())["cells"]
    assert len(cells) == 2
    partitions = {}
    for cell in cells:
        manifest = json.loads((Path(cell["dir"]) / "manifest.json").read_text())
        assert (Path(cell["dir"]) / "metrics.parquet").exists()
        partitions.setdefault(cell["values"]["partition.alpha"], set()).add(manifest["partitions"]["0"]["path"])
    assert all(len(paths) == 1 for paths in partitions.values()) and len(partitions) == 1
    assert len(list((tmp_path / "out" / "cache" / "partitions").iterdir())) == 1

    # One results table: every cell's rows, with the cell id and its grid values as columns.
    df = pd.read_parquet(sweep_dir / "results.parquet")
    assert set(df.cell) == {c["id"] for c in cells}
    assert {"partition.alpha", "algorithm", "seed", "metric", "value"} <= set(df.columns)
    assert "algorithms" not in df.columns  # the `algorithm` column already holds it
    per_cell = df.groupby("cell").algorithm.unique()
    assert all(len(a) == 1 for a in per_cell)
    assert df["partition.alpha"].unique().tolist() == [0.5]

    summary = (sweep_dir / "summary.md").read_text()
    assert (
        "| algorithm | partition.alpha | seeds | global acc | personal acc | Δ personal vs fedavg [95% CI] (wins) "
        "| Δ global vs fedavg [95% CI] (wins) | wall s |"
    ) in summary
    # Paired with FedAvg in the same other grid values: Local-only has a personal Δ, no global one.
    assert "| fedavg | 0.5 | 1 | " in summary and "| (reference) | (reference) |" in summary
    local_row = next(line for line in summary.splitlines() if line.startswith("| local |"))
    assert local_row.split(" | ")[5].endswith("(1/1)") or local_row.split(" | ")[5].endswith("(0/1)")
    assert local_row.split(" | ")[6] == "n/a"
    main_table = summary.split("## Other client metrics")[0]  # that table has a row per algorithm too
    assert main_table.count("| fedavg | 0.5 | 1 |") == 1 and main_table.count("| local |") == 1
    assert "## Other client metrics" in summary and "train_loss" in summary.split("## Other client metrics")[1]
    assert "| local | 0.5 | 1 | n/a |" in summary  # Local-only has no global model
    for name in ("acc_vs_clients.png", "wall_vs_clients.png"):
        assert (sweep_dir / "plots" / name).stat().st_size > 0
    assert f"results: {sweep_dir.resolve() / 'results.parquet'}" in out

    # Everything finished: a rerun runs nothing, and rebuilds a lost results table from the cells.
    (sweep_dir / "results.parquet").unlink()
    calls.clear()
    code, out, err = _sweep(argv, capsys)
    assert code == 0 and not calls and "all 2 cells finished earlier" in out
    assert set(pd.read_parquet(sweep_dir / "results.parquet").cell) == {c["id"] for c in cells}


@pytest.mark.slow
def test_interrupted_cell_resumes_from_its_checkpoint_and_seeds_are_averaged(ray_local, tmp_path):
    # The CLI in subprocesses, attached to the session's Ray (saves starting one per process).
    address = session_address(ray_local)
    sets = _base(tmp_path, "algorithms=fedavg", "num_clients=5", "rounds=2", f"ray.address={address}")
    argv = ["sweep", *_argv(sets, ["seed=0,1"], "--name", "seeds")]
    crashed = cli(argv, crash_env(1))  # the process dies hard after round 1 of the first cell
    assert crashed.returncode == 17, crashed.stderr[-2000:]
    cells = tmp_path / "out" / "sweeps" / "seeds" / "cells"
    (first,) = [d for d in cells.iterdir()]
    part = first / "metrics" / "fedavg" / "seed0" / "round_00001.parquet"
    written = part.stat().st_mtime_ns
    assert not (first / "done.json").exists()

    drivers = len(ray_local._private.state.jobs())  # every ray.init is a job (a driver) of the cluster
    resumed = cli(argv)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(ray_local._private.state.jobs()) == drivers + 1  # ONE Ray connection for both cells
    assert part.stat().st_mtime_ns == written  # round 1 was not recomputed: resumed from the checkpoint
    df = pd.read_parquet(cells.parent / "results.parquet")
    assert sorted(df.seed.unique()) == [0, 1] and len(df.cell.unique()) == 2
    acc = df[(df.metric == "global_acc") & (df.split == "test")]
    assert sorted(acc["round"].unique()) == [0, 1, 2]
    assert not df.duplicated(["cell", "algorithm", "seed", "round", "client_id", "split", "metric"]).any()
    summary = (cells.parent / "summary.md").read_text()
    row = next(line for line in summary.splitlines() if line.startswith("| fedavg |"))
    assert "| 2 |" in row and row.count("±") == 3  # mean ± std over the two seeds
    assert "results: " in resumed.stdout and "summary: " in resumed.stdout
