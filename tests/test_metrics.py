"""Metrics are declared once (sim/metrics.py) and every metric an algorithm returns reaches the results."""

from __future__ import annotations

import math

import pytest

from sim.metrics import Metric, declare_metric, metric
from sim.orchestration.progress import round_line
from tests.conftest import small_overrides


def test_the_progress_line_shows_validation_combined_as_declared():
    rows = [
        (0, "val", "n", 30.0),
        (1, "val", "n", 10.0),
        (0, "val", "global_acc", 0.9),
        (1, "val", "global_acc", 0.3),  # pooled over samples: (0.9*30 + 0.3*10) / 40 = 0.75
        (0, "val", "personal_acc", 0.5),
        (1, "val", "personal_acc", 0.7),  # mean over clients: 0.6
        (0, "test", "global_acc", 0.0),  # test is not streamed while validation exists
        (1, "val", "personal_acc", math.nan),
    ]
    assert round_line("fedavg", 0, 3, rows) == "fedavg seed 0 round 3 (val): global 0.750 personal 0.600"
    test_only = [(0, "test", "personal_acc", 0.25)]  # no validation split: test, labelled so
    assert round_line("local", 1, 0, test_only) == "local seed 1 round 0 (test): personal 0.250"


def test_a_metric_has_one_declaration():
    assert metric("global_acc").higher_is_better is True and metric("train_loss").higher_is_better is False
    assert metric("never-declared") == Metric("never-declared")  # kept, averaged, no direction
    assert declare_metric("alpha", description="APFL: the client's mixing weight of its local model") == metric("alpha")
    with pytest.raises(ValueError, match="declared twice"):
        declare_metric("alpha", higher_is_better=True)


def test_every_metric_an_algorithm_returns_reaches_the_results(ray_local, tmp_path):
    from sim import run

    table = run({"algorithms": ["apfl", "fedrep"]}, small_overrides(tmp_path))
    train = table[table.split == "train"]
    apfl = train[train.algorithm == "apfl"]
    assert set(apfl.metric) == {"train_loss", "train_steps", "alpha"}
    alpha = apfl[apfl.metric == "alpha"]
    assert sorted(alpha["round"].unique()) == [1, 2] and (alpha.value == 0.25).all()  # the fixed default α
    assert (alpha.groupby("round").size() == 4).all()  # clients_per_round=4, every one reports it
    fedrep = train[train.algorithm == "fedrep"]
    assert {"train_loss", "train_steps", "head_loss"} <= set(fedrep.metric)
