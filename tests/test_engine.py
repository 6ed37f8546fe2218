"""The engine end to end on the built-in data: reproducibility, FedAvg sanity, resources."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from sim.config import load_config
from sim.orchestration.cluster import ResourceError, plan_pool
from sim.orchestration.runner import run_comparison
from sim.results import outcome_frame, read_metrics
from tests.conftest import small_overrides


def test_same_seed_same_metrics_with_1_and_4_actors(ray_local, tmp_path):
    runs = []
    for pool, cpus in ((1, 1.0), (4, 0.5)):
        cfg = load_config(
            None,
            small_overrides(
                tmp_path,
                "algorithms=fedavg,local",
                "num_clients=6",
                "clients_per_round=4",
                "rounds=2",
                "seed=0",
                f"ray.pool_size={pool}",
                f"client_resources.num_cpus={cpus}",
                f"run_id=pool{pool}",
            ),
        )
        runs.append(outcome_frame(run_comparison(cfg).run_dir))
    a, b = runs
    assert len(a) > 0 and set(a.metric) >= {"global_acc", "personal_acc", "bytes_up", "bytes_down", "train_loss"}
    pd.testing.assert_frame_equal(a, b)
    # the clients that trained are the algorithm's seeded pick for each round, and the pick changes with the round
    from baselines.fedavg import FedAvg

    trained = a[(a.algorithm == "fedavg") & (a.metric == "train_loss")].groupby("round").client_id.apply(sorted)
    picker = FedAvg(FedAvg.Params(), _run_context(seed=0))
    assert {r: trained[r] for r in (1, 2)} == {r: picker.select_clients(r, 6, 4).tolist() for r in (1, 2)}
    assert trained[1] != trained[2]


def _run_context(seed: int):
    """Enough of a RunContext for the server verbs (selection reads only the seed)."""
    from algorithms.base import RunContext
    from sim.config import TrainConfig
    from sim.models import ModelSpec

    return RunContext(
        num_clients=6,
        clients_per_round=4,
        rounds=2,
        seed=seed,
        train=TrainConfig(),
        model_name="small_cnn",
        model_spec=ModelSpec(3, 10, 16),
        cache_dir="",
        run_dir="",
    )


def test_fedprox_with_mu_zero_equals_fedavg(ray_local, tmp_path):
    cfg = load_config(None, small_overrides(tmp_path, "algorithms=fedavg,fedprox", "algo.fedprox.mu=0.0", "rounds=1"))
    df = outcome_frame(run_comparison(cfg).run_dir)
    fedavg = df[df.algorithm == "fedavg"].drop(columns="algorithm").reset_index(drop=True)
    fedprox = df[df.algorithm == "fedprox"].drop(columns="algorithm").reset_index(drop=True)
    pd.testing.assert_frame_equal(fedavg, fedprox)


def test_results_layout_and_rows(ray_local, tmp_path):
    cfg = load_config(None, small_overrides(tmp_path, "algorithms=fedavg,local", "rounds=1"))
    result = run_comparison(cfg)
    run_dir = result.run_dir
    for name in ("config.yaml", "manifest.json", "metrics.parquet", "report.md", "plots/accuracy.png"):
        assert (run_dir / name).exists(), name
    df = read_metrics(run_dir).to_pandas()
    assert list(df.columns) == ["run_id", "algorithm", "seed", "round", "client_id", "split", "metric", "value"]
    fedavg = df[df.algorithm == "fedavg"]
    for metric in ("global_acc", "personal_acc"):
        got = fedavg[(fedavg.metric == metric) & (fedavg.split == "test")]
        assert sorted(set(got["round"])) == [0, 1]
        assert sorted(set(got.client_id)) == list(range(6))
    run_rows = df[df.client_id == -1]
    assert {"bytes_up", "bytes_down", "wall_s"} <= set(run_rows.metric)
    up = run_rows[(run_rows.algorithm == "fedavg") & (run_rows.metric == "bytes_up") & (run_rows["round"] == 1)]
    assert float(up.value.iloc[0]) > 0
    local_up = run_rows[(run_rows.algorithm == "local") & (run_rows.metric == "bytes_up")]
    assert float(local_up.value.sum()) == 0.0  # Local-only never communicates
    peak = run_rows[(run_rows.metric == "client_peak_rss_mb") & (run_rows["round"] == 1)]
    assert len(peak) == 2 and (peak.value > 50).all()  # a client actor holds torch and a model: tens of MiB at least
    assert "global_acc" not in set(df[df.algorithm == "local"].metric)
    report = (run_dir / "report.md").read_text()
    assert "fedavg" in report and "personal acc" in report and "Cost of one round" in report
    assert "After the one-shot warm start" not in report  # no warm-started algorithm in this run
    # the fixed cost outside the rounds, by part (benchmarks/engine_vs_plain.py prints it)
    fixed = json.loads((run_dir / "manifest.json").read_text())["fixed_s"]
    assert {"prepare", "ray_start", "report"} <= fixed.keys() and all(v >= 0 for v in fixed.values())
    assert fixed["report"] > 0


@pytest.mark.slow
def test_fedavg_on_iid_reaches_centralized_accuracy(ray_local, tmp_path):
    from sim.data import load_dataset
    from sim.models import ModelSpec, build_model
    from sim.orchestration.partition_build import partition_for

    overrides = small_overrides(
        tmp_path,
        "algorithms=fedavg",
        "num_clients=4",
        "clients_per_round=4",
        "rounds=6",
        "partition.scheme=iid",
        "train.local_epochs=2",
        "model.width=16",
        "run_id=iid",
    )
    cfg = load_config(None, overrides)
    run_dir = run_comparison(cfg).run_dir
    df = read_metrics(run_dir).to_pandas()
    final = df[(df.metric == "global_acc") & (df.split == "test") & (df["round"] == 6)]
    sizes = df[(df.metric == "n") & (df.split == "test") & (df["round"] == 6) & (df.algorithm == "fedavg")]
    fed_acc = float(
        (final.sort_values("client_id").value.values * sizes.sort_values("client_id").value.values).sum()
        / sizes.value.sum()
    )

    # Centralized reference: the same model and data, and the same number of passes over the data
    # (6 rounds × 2 local epochs = 12 epochs over the union of the train splits).
    dataset = load_dataset(cfg.dataset, cfg.data)
    partition, _ = partition_for(cfg, dataset, 0)
    train_idx = np.concatenate([partition.client_indices(c, "train") for c in range(4)])
    test_idx = np.concatenate([partition.client_indices(c, "test") for c in range(4)])
    torch.manual_seed(0)
    spec = ModelSpec(dataset.image_shape[0], dataset.num_classes, dataset.image_shape[1], cfg.model.width)
    model = build_model("small_cnn", spec)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
    x, y = torch.from_numpy(dataset.images[train_idx]), torch.from_numpy(dataset.labels[train_idx])
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        model.train()
        order = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), 32):
            idx = order[s : s + 32]
            if len(idx) < 2:
                continue
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(dataset.images[test_idx])).argmax(1).numpy()
    central_acc = float((pred == dataset.labels[test_idx]).mean())
    print(f"fedavg iid {fed_acc:.3f} vs centralized {central_acc:.3f}")
    assert central_acc > 0.8
    assert fed_acc >= central_acc - 0.05


def test_gpu_request_without_gpus_fails_at_once():
    cfg = load_config(None, ["client_resources.num_gpus=0.25"])
    with pytest.raises(ResourceError, match="no GPUs"):
        plan_pool(cfg, available={"CPU": 2.0}, total={"CPU": 2.0})
    auto = plan_pool(load_config(None, ["client_resources.num_gpus=auto"]), {"CPU": 2.0}, {"CPU": 2.0})
    assert auto.num_gpus == 0.0 and auto.size == 2


def test_pool_is_sized_from_free_resources():
    cfg = load_config(None, ["client_resources.num_cpus=0.5"])
    assert plan_pool(cfg, {"CPU": 2.0}, {"CPU": 2.0}).size == 4
    with pytest.raises(ResourceError, match="num_cpus"):
        plan_pool(load_config(None, ["client_resources.num_cpus=4"]), {"CPU": 2.0}, {"CPU": 2.0})
    with pytest.raises(ResourceError, match="pool_size"):
        plan_pool(load_config(None, ["ray.pool_size=8"]), {"CPU": 2.0}, {"CPU": 2.0})
    gpu = plan_pool(
        load_config(None, ["algorithms=fedavg", "client_resources.num_gpus=0.5", "num_clients=10"]),  # no server share
        {"CPU": 8.0, "GPU": 1.0},
        {"CPU": 8.0, "GPU": 1.0},
    )
    assert gpu.size == 2 and gpu.num_gpus == 0.5


def test_holdout_clients_report_new_client_accuracy_and_never_train(ray_local, tmp_path):
    from sim.orchestration.report import selected_rounds, summary_table

    cfg = load_config(
        None,
        small_overrides(tmp_path, "algorithms=fedavg,local", "holdout_clients=2", "clients_per_round=4", "rounds=2"),
    )
    df = read_metrics(run_comparison(cfg).run_dir).to_pandas()
    new = df[df.metric == "new_client_acc"]
    holdouts = set(new.client_id)
    assert len(holdouts) == 2
    trained = set(df[df.metric == "train_loss"].client_id)
    assert trained and not (trained & holdouts)
    assert not (set(df[df.metric == "personal_acc"].client_id) & holdouts)
    table = summary_table(df)
    assert all(v != "n/a" for v in table["new-client acc"])
    # The summary round is the best validation round, which need not be the last.
    picks = selected_rounds(df)
    val = df[(df.metric == "personal_acc") & (df.split == "val")].groupby(["algorithm", "round"]).value.mean()
    for _, pick in picks.iterrows():
        per_round = val.loc[pick.algorithm]
        assert per_round.loc[pick["round"]] == per_round.max()


def test_holdout_must_leave_room_for_the_round():
    from sim.config import ConfigError

    with pytest.raises(ConfigError, match="holdout_clients"):
        load_config(None, ["num_clients=10", "clients_per_round=9", "holdout_clients=2"])


def test_a_large_dataset_is_held_once_in_the_object_store(ray_local, tmp_path, monkeypatch):
    import sim.orchestration.runner
    from sim.data import load_dataset

    monkeypatch.setattr(sim.orchestration.runner, "SHARE_ONLY_BYTES", 0)  # treat the built-in data as large
    cfg = load_config(None, small_overrides(tmp_path, "algorithms=fedavg", "rounds=1"))
    cached = load_dataset(cfg.dataset, cfg.data)
    kept, _ = sim.orchestration.runner.share_dataset(
        cached, keep_cached=True
    )  # a sweep's cells reuse the driver's copy
    assert kept is cached and load_dataset(cfg.dataset, cfg.data) is cached
    shared, ref = sim.orchestration.runner.share_dataset(cached)
    assert shared is not cached and not shared.images.flags.owndata  # a view of the store's copy
    assert np.array_equal(shared.images, cached.images) and shared.fingerprint() == cached.fingerprint()
    assert load_dataset(cfg.dataset, cfg.data) is not cached  # the driver's own copy left the cache
    del shared, ref
    result = run_comparison(cfg)
    assert (outcome_frame(result.run_dir).metric == "global_acc").any()
