"""Several clients per actor task: partial sums in the actor give the server the same aggregate.

A round's clients go out in runs (`train_chunks`, cut by the pool size); an actor trains a run
and sums its updates over the fixed tree of client positions, and the server merges the
partials. These tests check the parts in process (no Ray) and the whole through the engine:
however a round is cut, the numbers are the same bits.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from actors.client import ClientWorker
from actors.server import ServerWorker
from algorithms.base import Aggregator, Broadcast, ClientUpdate, RunContext, model_weights
from sim.config import algorithm_spec, load_config
from sim.data import load_dataset
from sim.models import ModelSpec
from sim.orchestration.engine import TASKS_PER_ACTOR, tasks_per_actor, train_chunks
from sim.orchestration.partition_build import partition_for
from sim.orchestration.runner import run_comparison
from sim.results import outcome_frame, read_metrics
from tests.conftest import small_overrides


def test_train_chunks_cut_the_round_into_consecutive_runs_of_about_equal_cost():
    rng = np.random.default_rng(0)
    for n, tasks in ((1, 8), (4, 8), (10, 8), (100, 8), (1000, 4), (1000, 400), (10_000, 64)):
        clients = np.sort(rng.choice(20_000, size=n, replace=False))
        costs = rng.integers(1, 500, size=n).astype(float)
        chunks = train_chunks(clients, costs, tasks)
        assert min(n, tasks) // 2 <= len(chunks) <= min(n, tasks)  # fewer only where a client outweighs a share
        if n >= 10 * tasks:
            assert len(chunks) == tasks
        assert np.array_equal(np.concatenate([c for _, c in chunks]), clients)
        assert [start for start, _ in chunks] == list(np.cumsum([0] + [len(c) for _, c in chunks[:-1]]))
        share = costs.sum() / len(chunks)
        position = {int(c): i for i, c in enumerate(clients)}
        for _, chunk in chunks:  # a run overshoots its share by at most one client
            assert costs[[position[int(c)] for c in chunk]].sum() <= share + costs.max() + 1e-6
    assert train_chunks(np.arange(0), np.zeros(0), 8) == []


def _update(cid: int, weight: float, seed: int) -> ClientUpdate:
    g = torch.Generator().manual_seed(seed)
    return ClientUpdate(
        cid, {"w": torch.randn(50, generator=g) * 10 ** (cid % 5), "b": torch.randn(3, generator=g)}, weight
    )


def _cut_sum(updates: list[ClientUpdate], cuts: list[int]) -> Aggregator:
    """The server's aggregator after merging one partial per run between consecutive cuts."""
    server = Aggregator()
    edges = [0, *cuts, len(updates)]
    for a, b in itertools.pairwise(edges):
        part = Aggregator(a)
        for u in updates[a:b]:
            part.add(u)
        server.merge(part)
    return server


def test_any_cut_of_the_round_gives_the_same_bits():
    rng = np.random.default_rng(1)
    like = {"w": torch.zeros(50), "b": torch.zeros(3), "untouched": torch.ones(2)}
    for n in (1, 2, 3, 7, 16, 33, 100):
        updates = [_update(c, float(rng.integers(1, 90)), seed=c) for c in range(n)]
        one_by_one = Aggregator()
        for u in updates:
            one_by_one.add(u)
        reference = one_by_one.mean(like)
        for _ in range(5):
            k = int(rng.integers(0, n))
            cuts = sorted(rng.choice(np.arange(1, n), size=min(k, n - 1), replace=False).tolist()) if n > 1 else []
            cut = _cut_sum(updates, cuts)
            assert (cut.count, cut.total) == (one_by_one.count, one_by_one.total) == (n, sum(u.weight for u in updates))
            mean = cut.mean(like)
            assert all(torch.equal(mean[k], reference[k]) for k in like), (n, cuts)
        exact = sum(u.weight * u.payload["w"].double() for u in updates) / sum(u.weight for u in updates)
        torch.testing.assert_close(reference["w"], exact.float(), rtol=1e-6, atol=1e-6)
        assert torch.equal(reference["untouched"], like["untouched"])
        assert len(one_by_one._stack) == bin(n).count("1")  # O(log n) pending sums, never one per client


def test_partials_out_of_client_order_are_refused():
    server = Aggregator()
    late = Aggregator(3)
    late.add(_update(3, 1.0, seed=3))
    with pytest.raises(ValueError, match="expected one starting at position 0, got one starting at 3"):
        server.merge(late)


def _worker_and_run(tmp_path) -> tuple[ClientWorker, RunContext]:
    cfg = load_config(
        None, [f"out={tmp_path}", f"cache_dir={tmp_path / 'cache'}", "num_clients=6", "clients_per_round=6"]
    )
    data = load_dataset(cfg.dataset, cfg.data)
    partition, _ = partition_for(cfg, data, 0)
    spec = ModelSpec(data.image_shape[0], data.num_classes, data.image_shape[1], cfg.model.width)
    run = RunContext(
        num_clients=6,
        clients_per_round=6,
        rounds=1,
        seed=0,
        train=cfg.train,
        model_name=cfg.model.name,
        model_spec=spec,
        cache_dir=str(tmp_path),
        run_dir=str(tmp_path),
    )
    cls, params = algorithm_spec(cfg, "fedavg")
    worker = ClientWorker(data)
    worker.configure(cls(params, run), partition, run, str(tmp_path / "state"))
    return worker, run


def _served_mean(run: RunContext, algorithm, folds) -> dict[str, torch.Tensor]:
    server = ServerWorker(threads=1)
    server.configure(algorithm, run)
    server.begin_round()
    for item in folds:
        server.fold(item)
    server.finish_round()
    return server.state.weights


def test_a_chunk_trains_each_client_as_alone_and_the_server_gets_the_same_mean(tmp_path):
    worker, run = _worker_and_run(tmp_path)
    torch.manual_seed(0)
    message = Broadcast(model_weights(run.build_model()))
    clients = [0, 2, 3, 5]
    alone = [worker.train(c, 1, message, -1) for c in clients]
    partial, infos = worker.train_many(clients, 0, 1, message, [-1] * 4)
    assert isinstance(partial, Aggregator) and partial.count == 4
    assert [i["client_id"] for i in infos] == clients
    assert [i["metrics"]["train_loss"] for i in infos] == [info["metrics"]["train_loss"] for _, info in alone]
    one_by_one = _served_mean(run, worker.algorithm, [[u] for u, _ in alone])
    chunked = _served_mean(run, worker.algorithm, [partial])
    for key, value in one_by_one.items():
        assert torch.equal(value, chunked[key]), key  # the same adds in the same order

    # An algorithm whose server needs every update alone gets them as a list, unchanged.
    worker.algorithm.partial_aggregator = lambda start: None
    updates, _ = worker.train_many(clients, 0, 1, message, [-1] * 4)
    assert [u.client_id for u in updates] == clients
    for (u, _), v in zip(alone, updates, strict=True):
        assert all(torch.equal(u.payload[k], v.payload[k]) for k in u.payload)
    listed = _served_mean(run, worker.algorithm, [updates[:3], updates[3:]])
    assert all(torch.equal(listed[k], one_by_one[k]) for k in listed)


def test_results_are_bit_identical_however_the_pool_cuts_the_rounds(ray_local, tmp_path):
    frames = []
    for pool, cpus in ((1, 1.0), (2, 1.0), (3, 0.5)):  # 4, 8 and 12 tasks for 12 clients a round
        cfg = load_config(
            None,
            small_overrides(
                tmp_path,
                "algorithms=fedavg,ditto",
                "model.width=8",  # the bits, not the accuracy, are under test
                "num_clients=12",
                "clients_per_round=12",
                f"ray.pool_size={pool}",
                f"client_resources.num_cpus={cpus}",
                f"run_id=pool{pool}",
            ),
        )
        frames.append(outcome_frame(run_comparison(cfg).run_dir))
    assert set(frames[0].metric) >= {"global_acc", "personal_acc", "train_loss", "bytes_up"}
    for other in frames[1:]:
        pd.testing.assert_frame_equal(frames[0], other)


def test_a_new_client_gets_one_personalization_budget_not_two(tmp_path):
    """FedAvg-FT's newcomer is its fine-tuned model as is; FedAvg's newcomer adapts the global model."""
    worker, run = _worker_and_run(tmp_path)
    torch.manual_seed(0)
    message = Broadcast(model_weights(run.build_model()))
    cfg = load_config(None, [f"out={tmp_path}", "num_clients=6"])
    fedavg_rows = worker.evaluate_new_clients([1], 1, message, 2, 512)
    fedavg_personal = worker.evaluate([1], 1, message, [-1], 512)
    cls, params = algorithm_spec(cfg, "fedavg-ft")
    worker.configure(cls(params, run), worker.partition, run, str(tmp_path / "state_ft"))
    ft_new = dict(((s, m), v) for _, s, m, v in worker.evaluate_new_clients([1], 1, message, 2, 512))
    ft_personal = dict(((s, m), v) for _, s, m, v in worker.evaluate([1], 1, message, [-1], 512))
    for split in ("val", "test"):
        assert ft_new[split, "new_client_acc"] == ft_personal[split, "personal_acc"]
    # FedAvg's newcomer did adapt: its scores are not the global model's
    fedavg_new = dict(((s, m), v) for _, s, m, v in fedavg_rows)
    fedavg_global = dict(((s, m), v) for _, s, m, v in fedavg_personal)
    assert any(fedavg_new[s, "new_client_acc"] != fedavg_global[s, "global_acc"] for s in ("val", "test"))


def test_the_server_folds_on_one_thread_and_keeps_its_threads_for_the_rest(tmp_path, monkeypatch):
    """Folds run while the client actors train: a multi-threaded addition would wait for their cores."""
    before = torch.get_num_threads()
    worker, run = _worker_and_run(tmp_path)
    try:
        server = ServerWorker(threads=2)
        server.configure(worker.algorithm, run)
        server.begin_round()
        seen: list[int] = []
        merge = Aggregator.merge
        monkeypatch.setattr(
            Aggregator, "merge", lambda self, other: (seen.append(torch.get_num_threads()), merge(self, other))[1]
        )
        torch.manual_seed(0)
        partial, _ = worker.train_many([0, 1], 0, 1, Broadcast(model_weights(run.build_model())), [-1, -1])
        server.fold(partial)
        assert seen == [1]
        assert torch.get_num_threads() == 2  # restored for the server's own phases (fine-tuning, sampling)
    finally:
        torch.set_num_threads(before)  # a process-wide setting: leave it as the next test expects


def test_tasks_per_actor_shrinks_to_keep_a_task_worth_its_fixed_cost():
    assert tasks_per_actor(None, 100, 2) == TASKS_PER_ACTOR  # nothing measured yet
    assert tasks_per_actor(0.003, 100, 2) == 1  # 10,000-client updates: 0.15 s an actor, one task
    assert tasks_per_actor(0.009, 100, 2) == 2  # 0.45 s an actor: two tasks of at least 0.2 s
    assert tasks_per_actor(0.08, 100, 2) == TASKS_PER_ACTOR  # plenty of work: the most tasks
    assert tasks_per_actor(0.003, 100, 0) == 1


def test_the_engine_cuts_later_rounds_by_the_measured_client_time(ray_local, tmp_path):
    """Round 1 goes out in the most tasks; once the clients' updates are measured (milliseconds
    here), fewer, larger tasks follow (any cut gives the same bits: the test above)."""
    cfg = load_config(
        None,
        small_overrides(
            tmp_path,
            "algorithms=fedavg",
            "model.width=8",
            "num_clients=200",  # ~36 samples a client: a few milliseconds an update, far below a task's worth
            "clients_per_round=8",
            "eval.max_clients=8",
            "rounds=3",
            "ray.pool_size=1",
            "run_id=measured",
        ),
    )
    run_dir = run_comparison(cfg).run_dir
    df = read_metrics(run_dir).to_pandas()
    tasks = df[df.metric == "train_tasks"].set_index("round").value
    assert tasks[1] == TASKS_PER_ACTOR
    assert tasks[2] == tasks[3] == 1
    assert "train_tasks" not in set(outcome_frame(run_dir).metric)  # a measurement, like the seconds
