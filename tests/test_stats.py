"""Paired differences to a reference: the mean over seeds, the bootstrap interval, wins, worst-decile labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sim.orchestration.report import summary_table, worst_label
from sim.stats import paired_against, paired_difference


def test_one_seed_two_clients_the_interval_is_the_two_client_differences():
    # Resampling 2 clients: the mean difference is d1, (d1+d2)/2 or d2 with probabilities 1/4, 1/2,
    # 1/4, so the 2.5 % and 97.5 % percentiles are exactly d1 and d2.
    p = paired_difference([(np.array([0.9, 0.5]), np.array([0.8, 0.2]), None)])
    assert p.mean == pytest.approx(0.2)  # ((0.1) + (0.3)) / 2
    assert p.low == pytest.approx(0.1) and p.high == pytest.approx(0.3)
    assert (p.wins, p.seeds) == (1, 1)


def test_constant_difference_has_a_zero_width_interval_and_counts_wins_per_seed():
    seeds = [
        (np.array([0.7, 0.6, 0.9]), np.array([0.6, 0.5, 0.8]), None),  # +0.1 on every client
        (np.array([0.4, 0.3, 0.6]), np.array([0.5, 0.4, 0.7]), None),
    ]  # -0.1 on every client
    p = paired_difference(seeds)
    assert p.mean == pytest.approx(0.0, abs=1e-12)
    assert p.low == pytest.approx(0.0, abs=1e-12) and p.high == pytest.approx(0.0, abs=1e-12)
    assert (p.wins, p.seeds) == (1, 2)
    assert p.text() == "+0.000 [+0.000, +0.000] (1/2)"


def test_pooled_weights_and_the_interval_is_seeded():
    acc, ref, n = np.array([1.0, 0.0]), np.array([0.0, 0.0]), np.array([3.0, 1.0])
    assert paired_difference([(acc, ref, n)]).mean == pytest.approx(0.75)  # pooled: 3 of 4 samples right
    assert paired_difference([(acc, ref, None)]).mean == pytest.approx(0.5)  # client mean
    rng = np.random.default_rng(5)
    seeds = [(rng.random(12), rng.random(12), None) for _ in range(3)]
    assert paired_difference(seeds) == paired_difference(seeds)
    wide = paired_difference(seeds)
    assert wide.low < wide.mean < wide.high
    with pytest.raises(ValueError, match="same"):
        paired_difference([(np.array([1.0]), np.array([1.0, 0.0]), None)])


def _metrics(per_algo: dict[str, list[list[float]]], clients: int) -> pd.DataFrame:
    rows = []
    for algo, seeds in per_algo.items():
        for seed, accs in enumerate(seeds):
            for cid, acc in enumerate(accs[:clients]):
                for split in ("val", "test"):
                    rows += [(algo, seed, 1, cid, split, "personal_acc", acc), (algo, seed, 1, cid, split, "n", 10.0)]
    return pd.DataFrame(rows, columns=["algorithm", "seed", "round", "client_id", "split", "metric", "value"])


def test_summary_table_pairs_each_method_with_the_reference_on_the_same_clients():
    df = _metrics({"fedavg": [[0.5] * 12, [0.6] * 12], "ditto": [[0.7] * 12, [0.5] * 12]}, 12)
    table = summary_table(df, reference="fedavg").set_index("algorithm")
    column = "Δ personal vs fedavg [95% CI] (wins)"
    assert table.loc["fedavg", column] == "(reference)"
    assert table.loc["ditto", column] == "+0.050 [+0.050, +0.050] (1/2)"
    assert "worst-10% personal" in table.columns
    assert column not in summary_table(df, reference="nothing-like-it").columns


def test_worst_decile_needs_ten_clients_else_it_is_the_worst_client():
    assert worst_label(10) == "worst-10% personal" and worst_label(9) == "worst client personal"
    df = _metrics({"fedavg": [[0.1, 0.9, 0.8, 0.7]]}, 4)
    table = summary_table(df)
    assert "worst client personal" in table.columns and table["worst client personal"].iloc[0] == "0.100"


def test_paired_against_skips_seeds_the_reference_did_not_run():
    scores = pd.DataFrame(
        {
            "algorithm": ["a", "a", "r"],
            "seed": [0, 1, 0],
            "client_id": [0, 0, 0],
            "personal_acc": [0.9, 0.1, 0.5],
            "n": [1.0, 1.0, 1.0],
        }
    )
    p = paired_against(scores, "r", "personal_acc")["a"]
    assert p.seeds == 1 and p.mean == pytest.approx(0.4)


def test_domain_table_groups_clients_by_their_partition_domain_at_the_validation_round():
    from sim.orchestration.report import domain_table

    rows = []
    # round 1 is best on validation; round 2 would be best on test and must not be used
    for seed in (0, 1):
        for rnd, val, test in ((1, 0.9, [0.2, 0.4, 0.6, 0.8]), (2, 0.1, [1.0] * 4)):
            for cid in range(4):
                rows += [
                    ("warmfed", seed, rnd, cid, "val", "personal_acc", val),
                    ("warmfed", seed, rnd, cid, "test", "personal_acc", test[cid] + 0.1 * seed),
                    ("warmfed", seed, rnd, cid, "test", "global_acc", test[cid]),
                    ("warmfed", seed, rnd, cid, "test", "n", 10.0 * (cid + 1)),
                ]
    df = pd.DataFrame(rows, columns=["algorithm", "seed", "round", "client_id", "split", "metric", "value"])
    manifest = {
        "dataset": {"domain_names": ["stripes", "frame"]},
        "partitions": {"0": {"client_domain": [0, 0, 1, 1]}, "1": {"client_domain": [1, 1, 0, 0]}},
    }
    table = domain_table(df, manifest).set_index("algorithm")
    # seed 0: stripes = clients 0,1 -> global (0.2*10+0.4*20)/30 = 0.333, personal mean 0.3
    # seed 1: stripes = clients 2,3 -> global (0.6*30+0.8*40)/70 = 0.714, personal mean 0.8
    assert table.loc["warmfed", "stripes"] == "0.524 ± 0.269 / 0.550 ± 0.354"
    assert list(table.columns) == ["stripes", "frame"]
    assert domain_table(df, {"dataset": {"domain_names": ["one"]}, "partitions": {}}).empty
