"""Scale: more digits for thousands of clients, bounded per-actor state caches, stateful methods at 1,000 clients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.state_store import ClientStateStore
from algorithms.base import PersonalState
from sim.config import load_config
from sim.data import DatasetError, load_dataset
from sim.orchestration.runner import run_comparison
from sim.results import read_metrics
from tests.conftest import small_overrides


def test_digits_copies_adds_distinct_renders_and_keeps_one_copy_identical():
    one = load_dataset("digits-domains", cache=False)
    same = load_dataset("digits-domains", {"copies": 1}, cache=False)
    assert same.fingerprint() == one.fingerprint() and np.array_equal(same.images, one.images)

    two = load_dataset("digits-domains", {"copies": 2, "domains": ["plain", "colored"]}, cache=False)
    n = len(one) // len(one.domain_names)  # client digits per domain
    assert len(two) == 2 * 2 * n
    assert np.array_equal(np.bincount(two.domains), [2 * n, 2 * n])
    for d, domain in enumerate(("plain", "colored")):
        first, second = two.images[2 * d * n : (2 * d + 1) * n], two.images[(2 * d + 1) * n : (2 * d + 2) * n]
        assert np.array_equal(first, one.images[one.domain_names.index(domain) * n :][:n])  # copy 0 = today's
        assert np.array_equal(two.labels[2 * d * n : (2 * d + 1) * n], two.labels[(2 * d + 1) * n : (2 * d + 2) * n])
        assert (
            np.abs(first - second).reshape(n, -1).max(1) > 0
        ).mean() > 0.8  # fresh shifts (1 in 9 repeats) / colours
    with pytest.raises(DatasetError, match="data.copies must be >= 1"):
        load_dataset("digits-domains", {"copies": 0}, cache=False)


def test_state_cache_is_bounded_in_bytes(tmp_path):
    store = ClientStateStore(tmp_path, cache_size=256, cache_bytes=3 * 4000)
    for client in range(10):  # a typed client state: its tensors count, as a dict's would
        store.save(client, 1, PersonalState({"w": torch.full((1000,), float(client))}), previous=-1)
    assert len(store._cache) == 3 and store._held == 12000
    back = store.load(0, 1)  # evicted states come back from disk, as they were saved
    assert isinstance(back, PersonalState) and float(back.personal["w"][0]) == 0.0
    store.save(9, 2, {"personal": {"w": torch.zeros(1000)}}, previous=1)
    store.save(9, 3, {"personal": {"w": torch.zeros(1000)}}, previous=2)
    # old versions stay on disk (sim/orchestration/checkpoints.py removes them once no kept checkpoint names them)
    assert sorted(p.name for p in tmp_path.rglob("9_r*.pt")) == ["9_r1.pt", "9_r2.pt", "9_r3.pt"]
    assert store._held == sum(4000 for _ in store._cache)


@pytest.mark.slow
def test_local_only_at_1000_clients(ray_local, tmp_path):
    """A stateful method with per-client models at 1,000 clients: states only for trained clients,
    on disk under the run, and a seeded evaluation subset."""
    cfg = load_config(
        None,
        small_overrides(
            tmp_path,
            "algorithms=local",
            "num_clients=1000",
            "clients_per_round=20",
            "rounds=2",
            "partition.min_size=3",
            "eval.max_clients=40",
            "model.width=8",
        ),
    )
    run_dir = run_comparison(cfg).run_dir
    df = read_metrics(run_dir).to_pandas()
    trained = df[df.metric == "train_loss"]
    assert trained.groupby("round").client_id.nunique().to_dict() == {1: 20, 2: 20}
    personal = df[(df.metric == "personal_acc") & (df.split == "test")]
    assert personal.groupby("round").client_id.nunique().to_dict() == {0: 40, 1: 40, 2: 40}
    states = list((run_dir / "client_state" / "local" / "seed0").rglob("*.pt"))
    owners = {int(p.stem.split("_r")[0]) for p in states}
    assert owners == set(trained.client_id) and len(states) == len(trained)


@pytest.mark.slow
def test_fedavg_and_stateful_pfl_at_10000_clients(ray_local, tmp_path):
    """10,000 clients fit the built-in data with copies and a small minimum size; rounds touch only
    their clients and evaluation a seeded subset; stateful pFL (Ditto's personal models, FedRep's
    heads) keeps state only for the clients that trained, on disk under the run."""
    cfg = load_config(
        None,
        small_overrides(
            tmp_path,
            "algorithms=fedavg,ditto,fedrep",
            "num_clients=10000",
            "clients_per_round=20",
            "rounds=2",
            "partition.min_size=3",
            "data.copies=7",
            "eval.max_clients=50",
            "model.width=8",
        ),
    )
    run_dir = run_comparison(cfg).run_dir
    df = read_metrics(run_dir).to_pandas()
    for algorithm in ("fedavg", "ditto", "fedrep"):
        rows = df[df.algorithm == algorithm]
        trained = rows[rows.metric == "train_loss"]
        assert trained.groupby("round").client_id.nunique().to_dict() == {1: 20, 2: 20}
        acc = rows[(rows.metric == "personal_acc") & (rows.split == "test")]
        assert acc.groupby("round").client_id.nunique().to_dict() == {0: 50, 1: 50, 2: 50}
        assert acc.client_id.max() > 1000  # the subset is drawn from all 10,000 clients
        states = list((run_dir / "client_state" / algorithm / "seed0").rglob("*.pt"))
        if algorithm == "fedavg":
            assert not states
        else:
            assert {int(p.stem.split("_r")[0]) for p in states} == set(trained.client_id)
