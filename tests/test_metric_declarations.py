"""A metric declared once (sim/metrics.py) reaches the report, sweep and tuning tables, and its
declared direction decides where a best value is chosen: no table module names it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import sim.metrics
from sim.metrics import declare_metric, metric
from sim.orchestration.report import (
    other_client_columns,
    other_client_table,
    selected_rounds,
    summary_table,
    worst_label,
    write_report,
)
from sim.results import SCHEMA

COLUMNS = ["algorithm", "seed", "round", "client_id", "split", "metric", "value"]


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    """Each test declares into a copy of the registry: its declarations are gone afterwards."""
    monkeypatch.setattr(sim.metrics, "_METRICS", dict(sim.metrics._METRICS))


def _frame(extra: dict[str, float] | None = None, algorithms=("fedavg", "mine"), seeds=(0,)) -> pd.DataFrame:
    """metrics.parquet-shaped rows: 4 clients, rounds 0-2, val/test accuracies (validation best at
    round 1) and sample counts; train rows from round 1 on, with `extra` metrics for every method but fedavg
    (client c reports value + c, so the client mean is value + 1.5)."""
    rows = []
    for algo in algorithms:
        for seed in seeds:
            for rnd in (0, 1, 2):
                for cid in range(4):
                    val = (0.5, 0.8, 0.6)[rnd]
                    for split, acc in (("val", val), ("test", val - 0.1)):
                        rows += [
                            (algo, seed, rnd, cid, split, "global_acc", acc),
                            (algo, seed, rnd, cid, split, "personal_acc", acc + 0.01 * cid),
                            (algo, seed, rnd, cid, split, "n", 10.0),
                        ]
                    if rnd:
                        rows.append((algo, seed, rnd, cid, "train", "train_loss", 1.0 / rnd))
                        if algo != "fedavg":
                            rows += [
                                (algo, seed, rnd, cid, "train", k, v * rnd + cid) for k, v in (extra or {}).items()
                            ]
            rows.append((algo, seed, 1, -1, "run", "wall_s", 2.0))
    return pd.DataFrame(rows, columns=COLUMNS)


def test_a_declared_metric_gets_a_report_column_with_its_label_and_description(tmp_path):
    declare_metric("sharpness", higher_is_better=False, label="sharp", description="a test: flatness of the minimum")
    df = _frame({"sharpness": 2.0, "undeclared_thing": 5.0})
    table = other_client_table(df).set_index("algorithm")
    assert list(table.columns) == ["train_loss", "sharp"]  # declaration order; headline accuracies have their own
    assert table.loc["mine", "sharp"] == "3.500"  # round 1 (best on validation): 2.0 * 1 + mean(0..3)
    assert table.loc["fedavg", "sharp"] == "n/a"
    assert "undeclared_thing" not in table.columns  # kept in the results, summarised nowhere

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pq.write_table(
        pa.Table.from_pandas(df.assign(run_id="r")[SCHEMA.names], schema=SCHEMA), run_dir / "metrics.parquet"
    )
    report = write_report(run_dir).read_text()
    assert "## Other client metrics (round chosen on validation)" in report
    assert "| algorithm | train_loss | sharp |" in report and "| mine | 1.000 | 3.500 |" in report
    assert (
        "- sharp: a test: flatness of the minimum (`sharpness`, train split, mean over clients; lower is better)"
        in (report)
    )


def test_a_metric_on_two_splits_gets_a_column_each_and_the_declared_combination():
    declare_metric("calibration", aggregate="weighted", higher_is_better=False)
    df = _frame()
    test = df[(df.split == "test") & (df.metric == "global_acc")].assign(metric="calibration")
    test = test.assign(value=test.client_id.astype(float))
    sizes = (df.split == "test") & (df.metric == "n")
    df.loc[sizes, "value"] = (df.loc[sizes, "client_id"] + 1).astype(float)  # weights 1..4
    train = test.assign(split="train", value=7.0)
    df = pd.concat([df, test, train], ignore_index=True)
    headings = [c.heading for c in other_client_columns(df)]
    assert headings == ["train_loss", "calibration (test)", "calibration (train)"]
    table = other_client_table(df).set_index("algorithm")
    weighted = sum(c * (c + 1) for c in range(4)) / sum(range(1, 5))  # by test samples: 2.0, not the mean 1.5
    assert table.loc["fedavg", "calibration (test)"] == f"{weighted:.3f}"
    assert table.loc["fedavg", "calibration (train)"] == "7.000"


def test_a_declared_metric_reaches_the_sweep_summary(tmp_path):
    from sim.orchestration.sweep import other_client_summary, plan_sweep, write_summary

    declare_metric("sharpness", higher_is_better=False, description="a test: flatness of the minimum")
    sets = ["num_clients=4", "rounds=2", "progress=false", f"out={tmp_path / 'out'}"]
    sweep = plan_sweep(None, sets, ["algorithms=fedavg,apfl", "train.lr=0.01,0.02"], name="decl")
    parts = []
    for cell in sweep.cells:
        rows = _frame(
            {"sharpness": cell.values["train.lr"] * 100}, algorithms=(cell.values["algorithms"],), seeds=(0, 1)
        )
        parts.append(rows.assign(run_id=cell.id, cell=cell.id, **{"train.lr": cell.values["train.lr"]}))
    sweep.dir.mkdir(parents=True)
    pd.concat(parts, ignore_index=True).to_parquet(sweep.results_path)

    table, _ = other_client_summary(sweep)
    mine = table[table.algorithm == "apfl"].set_index("train.lr")
    assert mine.loc[0.01, "sharpness"] == "3.500 ± 0.000"  # final round 2: 1.0 * 2 + 1.5, both seeds
    assert mine.loc[0.02, "sharpness"] == "5.500 ± 0.000"
    assert (table[table.algorithm == "fedavg"]["sharpness"] == "n/a").all()
    _, path, _ = write_summary(sweep)
    summary = path.read_text()
    assert "## Other client metrics, final round, mean ± std over seeds" in summary
    assert "| algorithm | train.lr | seeds | train_loss | sharpness |" in summary
    assert "(`sharpness`, train split, mean over clients; lower is better)" in summary
    assert "| algorithm | train.lr | seeds | global acc | personal acc |" in summary  # the main table as before


def test_the_declared_direction_chooses_the_round():
    declare_metric("val_error", higher_is_better=False)
    declare_metric("val_score", higher_is_better=True)
    declare_metric("val_count")
    rows = []
    for rnd, value in enumerate((0.5, 0.2, 0.9, 0.2)):
        for name in ("val_error", "val_score", "val_count"):
            rows += [("m", 0, rnd, cid, "val", name, value) for cid in range(2)]
    df = pd.DataFrame(rows, columns=COLUMNS)
    assert selected_rounds(df, on=("val_error",))["round"].tolist() == [1]  # lowest; ties: the earliest round
    assert selected_rounds(df, on=("val_score",))["round"].tolist() == [2]
    assert selected_rounds(df, on=("not_reported", "val_error"))["round"].tolist() == [1]  # the first reported
    with pytest.raises(ValueError, match="no direction"):
        selected_rounds(df, on=("val_count",))


def test_the_declared_direction_chooses_the_tuning_point(tmp_path):
    from sim.orchestration.tune import choose, plan_tune, validation_scores

    declare_metric("val_error", higher_is_better=False)
    items = ["num_clients=4", "rounds=1", "progress=false", "algorithms=fedavg", f"out={tmp_path / 'out'}"]
    plan = plan_tune(None, items, ["train.lr=0.01,0.02,0.05"], search_seeds=[0])
    plan = dataclasses.replace(plan, criteria={"fedavg": "val_error"})
    rows = []
    for cell, error in zip(plan.search.cells, (0.3, 0.1, 0.2), strict=True):
        for rnd in (0, 1):
            for cid in range(2):
                rows.append((cell.id, "fedavg@0", 0, rnd, cid, "val", "val_error", error + rnd))  # round 0 best
                rows.append((cell.id, "fedavg@0", 0, rnd, cid, "test", "val_error", -error))  # never read
    results = pd.DataFrame(rows, columns=["cell", *COLUMNS])
    scores = validation_scores(results, plan)
    assert scores["val_mean"].tolist() == pytest.approx([0.3, 0.1, 0.2])  # the best (lowest) round of each
    assert choose(scores) == {"fedavg": {"train.lr": 0.02}}  # the lowest error, not the highest


def test_headline_columns_are_named_by_the_declarations():
    # A re-declared label renames every column of that metric (in a copy of the registry: see `registry`).
    sim.metrics._METRICS["personal_acc"] = dataclasses.replace(metric("personal_acc"), label="own")
    df = _frame(seeds=(0, 1))
    table = summary_table(df, reference="fedavg")
    assert {"global acc", "own acc (weighted)", "own acc (mean ± std)", "Δ own vs fedavg [95% CI] (wins)"} <= set(
        table.columns
    )
    assert worst_label(4) == "worst client own" and worst_label(4) in table.columns
    assert np.all(table["round"] == "1/1")  # chosen on validation
