"""`run_sim.py tune`: per-algorithm grids, choice on validation only, a reproducible tuned run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import run_sim
from sim.orchestration.tune import choose, plan_tune, validation_scores
from sim.typed import ConfigError
from tests.cli import sets


def _items(tmp_path, *extra: str) -> list[str]:
    return [
        "num_clients=4",
        "rounds=1",
        "model.width=8",
        "progress=false",
        "ray.pool_size=1",
        "data.domains=[plain]",
        f"out={tmp_path / 'out'}",
        *extra,
    ]


def test_plan_grids_criteria_and_errors(tmp_path):
    plan = plan_tune(
        None,
        _items(tmp_path, "algorithms=fedavg,fedprox,ditto,local"),
        ["train.lr=0.01,0.05"],
        ["fedprox.mu=0.01,0.1,1"],
        search_rounds=1,
        search_seeds=[0],
        untuned=["local"],
    )
    assert [c.values for c in plan.search.cells] == [{"train.lr": 0.01}, {"train.lr": 0.05}]
    assert plan.points("fedavg") == 2 and plan.points("fedprox") == 6 and plan.points("local") == 0
    assert plan.points("ditto") == 2 * 3  # its own search space: lam
    assert plan.criteria == {
        "fedavg": "global_acc",
        "fedprox": "global_acc",
        "ditto": "personal_acc",
        "local": "personal_acc",
    }
    cfg = plan.search.cells[1].cfg
    assert cfg.train.lr == 0.05 and cfg.seeds == [0] and "local@0" not in cfg.algorithms
    assert cfg.variants["fedprox@2"] == {"algorithm": "fedprox", "mu": 1}
    with pytest.raises(ConfigError, match="fedprox has no hyper-parameter 'nu'"):
        plan_tune(None, _items(tmp_path, "algorithms=fedprox"), space_items=["fedprox.nu=1"])
    with pytest.raises(ConfigError, match="not among the config's algorithms"):
        plan_tune(None, _items(tmp_path, "algorithms=fedavg"), untuned=["warmfed"])
    with pytest.raises(ConfigError, match="train.lr must be > 0"):
        plan_tune(None, _items(tmp_path, "algorithms=fedavg"), ["train.lr=0.01,-1"])


def _results(plan, rng: np.random.Generator) -> pd.DataFrame:
    """Metrics rows as a search would leave them: per cell, run, seed, round and client, val and test."""
    rows = []
    for cell in plan.search.cells:
        for run in plan.labels:
            for rnd in (0, 1):
                for cid in range(4):
                    for split in ("val", "test"):
                        for metric in ("global_acc", "personal_acc"):
                            rows.append((cell.id, run, 0, rnd, cid, split, metric, float(rng.random())))
                        rows.append((cell.id, run, 0, rnd, cid, split, "n", 5.0))
    return pd.DataFrame(rows, columns=["cell", "algorithm", "seed", "round", "client_id", "split", "metric", "value"])


def test_the_choice_never_reads_test_rows(tmp_path):
    plan = plan_tune(
        None, _items(tmp_path, "algorithms=fedavg,fedprox,ditto"), ["train.lr=0.01,0.02,0.05"], search_seeds=[0]
    )
    results = _results(plan, np.random.default_rng(0))
    chosen = choose(validation_scores(results, plan))
    test = results["split"] == "test"
    for seed in range(3):  # test accuracies shuffled, or made to favour every other point: same choice
        shuffled = results.copy()
        shuffled.loc[test, "value"] = np.random.default_rng(seed).permutation(shuffled.loc[test, "value"].to_numpy())
        assert choose(validation_scores(shuffled, plan)) == chosen
    inverted = results.copy()
    inverted.loc[test, "value"] = 1.0 - inverted.loc[test, "value"]
    assert choose(validation_scores(inverted, plan)) == chosen
    # ... while validation rows decide it: make one other fedavg point best on validation.
    other = next(c for c in plan.search.cells if c.values["train.lr"] != chosen["fedavg"]["train.lr"])
    boosted = results.copy()
    pick = (
        (boosted.cell == other.id)
        & (boosted.algorithm == "fedavg@0")
        & (boosted.split == "val")
        & (boosted.metric == "global_acc")
    )
    boosted.loc[pick, "value"] = 2.0
    assert choose(validation_scores(boosted, plan))["fedavg"] == {"train.lr": other.values["train.lr"]}


def test_ties_go_to_the_first_point_in_grid_order(tmp_path):
    plan = plan_tune(None, _items(tmp_path, "algorithms=fedavg"), ["train.lr=0.01,0.02"], search_seeds=[0])
    results = _results(plan, np.random.default_rng(1))
    results.loc[results.split == "val", "value"] = 0.5
    assert choose(validation_scores(results, plan)) == {"fedavg": {"train.lr": 0.01}}


@pytest.mark.slow
def test_a_tuned_run_is_reproducible_and_resumes(tmp_path, capsys):
    def tune(out: str) -> tuple[dict, pd.DataFrame]:
        argv = [
            "tune",
            *sets(_items(tmp_path, "algorithms=fedavg,fedprox", "seed=0,1", f"out={tmp_path / out}")),
            "--grid",
            "train.lr=0.01,0.05",
            "--space",
            "fedprox.mu=0.01",
            "--search-seeds",
            "0",
            "--name",
            "t",
        ]
        assert run_sim.main(argv) == 0
        root = tmp_path / out
        chosen = json.loads((root / "tunes" / "t" / "chosen.json").read_text())
        final = pd.read_parquet(root / "sweeps" / "t-final" / "results.parquet")
        keep = final[(final.client_id >= 0)].sort_values(["algorithm", "seed", "round", "client_id", "split", "metric"])
        return chosen, keep[["algorithm", "seed", "round", "client_id", "split", "metric", "value"]].reset_index(
            drop=True
        )

    a_chosen, a = tune("a")
    report = (tmp_path / "a" / "tunes" / "t" / "report.md").read_text()
    assert "Test accuracy is never read to choose" in report and "**(chosen)**" in report
    assert "Δ global vs fedavg" in report
    b_chosen, b = tune("b")
    assert a_chosen == b_chosen and set(a_chosen) == {"fedavg", "fedprox"}
    pd.testing.assert_frame_equal(a, b)
    capsys.readouterr()
    tune("a")  # again: every cell is finished, nothing reruns
    out = capsys.readouterr().out
    assert "all 2 cells finished earlier" in out


def test_the_report_names_the_commits_the_runs_recorded_not_the_one_at_the_end(tmp_path):
    """A tune outlives edits: its report's git line is what each run recorded when it started."""
    import json

    from sim.config import load_config
    from sim.orchestration.sweep import Cell, Sweep
    from sim.orchestration.tune import _recorded_commits

    cells = []
    for i, commit in enumerate(["aaa", "bbb", "aaa", None]):
        cfg = load_config(None, [f"out={tmp_path}", f"run_id=c{i}"])
        cell = Cell(id=f"c{i}", values={}, cfg=cfg)
        cell.dir.mkdir()
        (cell.dir / "manifest.json").write_text(json.dumps({"git_commit": commit}))
        cells.append(cell)
    unrun = Cell(id="never", values={}, cfg=load_config(None, [f"out={tmp_path}", "run_id=never"]))
    sweeps = [Sweep("s", tmp_path, {}, cells[:2], None, []), Sweep("f", tmp_path, {}, [*cells[2:], unrun], None, [])]
    assert _recorded_commits(sweeps) == ["aaa", "bbb"]
