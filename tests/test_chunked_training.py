"""Several clients per actor task: partial sums in the actor give the server the same aggregate.

A round's clients travel in fixed chunks (`train_chunks`); an actor trains a chunk and folds its
updates into one partial aggregate, which the server merges. These tests check the parts in
process (no Ray) and the whole through the engine: chunked results do not depend on the pool
size, and equal one-client-per-task results up to float64 summation order.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from actors.client import ClientWorker
from actors.server import ServerWorker
from algorithms.base import Aggregator, ClientUpdate, RunContext, model_weights
from sim.config import algorithm_spec, load_config
from sim.data import load_dataset
from sim.engine import train_chunks
from sim.models import ModelSpec
from sim.partition_build import partition_for
from sim.results import outcome_frame
from sim.runner import run_comparison
from tests.conftest import small_overrides


def test_train_chunks_cover_the_round_in_id_order():
    for n in (1, 4, 10, 100, 1000, 10_000):
        clients = np.arange(n) * 7
        chunks = train_chunks(clients)
        assert np.array_equal(np.concatenate(chunks), clients)
        assert max(len(c) for c in chunks) <= 16
        assert len(chunks) >= min(n, 16)  # enough tasks to balance a small pool
    assert [len(c) for c in train_chunks(np.arange(10))] == [1] * 10  # small rounds: one client per task
    assert [len(c) for c in train_chunks(np.arange(100))] == [6] * 16 + [4]
    assert [c.tolist() for c in train_chunks(np.array([2, 5, 9, 11]), per_task=3)] == [[2, 5, 9], [11]]


def _update(cid: int, weight: float, seed: int) -> ClientUpdate:
    g = torch.Generator().manual_seed(seed)
    return ClientUpdate(cid, {"w": torch.randn(50, generator=g), "b": torch.randn(3, generator=g)}, weight)


def test_merged_partials_equal_one_aggregator_over_all_updates():
    updates = [_update(c, float(c + 1), seed=c) for c in range(7)]
    whole = Aggregator()
    for u in updates:
        whole.add(u)
    merged = Aggregator()
    for chunk in ([0, 1, 2], [3], [4, 5, 6]):
        part = Aggregator()
        for c in chunk:
            part.add(updates[c])
        merged.merge(part)
    like = {"w": torch.zeros(50), "b": torch.zeros(3), "untouched": torch.ones(2)}
    assert (merged.count, merged._total) == (whole.count, whole._total) == (7, 28.0)
    a, b = whole.mean(like), merged.mean(like)
    for key in ("w", "b"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert torch.equal(b["untouched"], like["untouched"])
    expected_w = sum(u.weight * u.payload["w"].double() for u in updates) / 28.0
    torch.testing.assert_close(b["w"], expected_w.float(), rtol=0, atol=1e-6)


def _worker_and_run(tmp_path) -> tuple[ClientWorker, RunContext]:
    cfg = load_config(None, [f"out={tmp_path}", f"cache_dir={tmp_path / 'cache'}", "num_clients=6", "clients_per_round=6"])
    data = load_dataset(cfg.dataset, cfg.data)
    partition, _ = partition_for(cfg, data, 0)
    spec = ModelSpec(data.image_shape[0], data.num_classes, data.image_shape[1], cfg.model.width)
    run = RunContext(num_clients=6, clients_per_round=6, rounds=1, seed=0, train=cfg.train,
                     model_name=cfg.model.name, model_spec=spec, cache_dir=str(tmp_path), run_dir=str(tmp_path))
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
    return server.state["weights"]


def test_a_chunk_trains_each_client_as_alone_and_the_server_gets_the_same_mean(tmp_path):
    worker, run = _worker_and_run(tmp_path)
    torch.manual_seed(0)
    message = {"weights": model_weights(run.build_model())}
    clients = [0, 2, 3, 5]
    alone = [worker.train(c, 1, message, -1) for c in clients]
    partial, infos = worker.train_many(clients, 1, message, [-1] * 4)
    assert isinstance(partial, Aggregator) and partial.count == 4
    assert [i["client_id"] for i in infos] == clients
    assert [i["train_loss"] for i in infos] == [info["train_loss"] for _, info in alone]
    one_by_one = _served_mean(run, worker.algorithm, [[u] for u, _ in alone])
    chunked = _served_mean(run, worker.algorithm, [partial])
    for key, value in one_by_one.items():
        assert torch.equal(value, chunked[key]), key  # the same adds in the same order

    # An algorithm whose server needs every update alone gets them as a list, unchanged.
    worker.algorithm.partial_aggregator = lambda: None
    updates, _ = worker.train_many(clients, 1, message, [-1] * 4)
    assert [u.client_id for u in updates] == clients
    for (u, _), v in zip(alone, updates):
        assert all(torch.equal(u.payload[k], v.payload[k]) for k in u.payload)
    listed = _served_mean(run, worker.algorithm, [updates[:3], updates[3:]])
    assert all(torch.equal(listed[k], one_by_one[k]) for k in listed)


def test_chunked_rounds_do_not_depend_on_pool_size_and_match_one_client_per_task(ray_local, tmp_path):
    frames = {}
    for name, per_task, pool, cpus in (("c3p1", 3, 1, 1.0), ("c3p2", 3, 2, 1.0), ("c1p2", 1, 2, 1.0)):
        cfg = load_config(None, small_overrides(
            tmp_path, "algorithms=fedavg,ditto", f"ray.clients_per_task={per_task}", f"ray.pool_size={pool}",
            f"client_resources.num_cpus={cpus}", f"run_id={name}"))
        frames[name] = outcome_frame(run_comparison(cfg).run_dir)
    pd.testing.assert_frame_equal(frames["c3p1"], frames["c3p2"])  # bit for bit
    chunked, single = frames["c3p2"], frames["c1p2"]
    assert set(chunked.metric) >= {"global_acc", "personal_acc", "train_loss", "bytes_up"}
    pd.testing.assert_frame_equal(chunked.drop(columns="value"), single.drop(columns="value"))
    np.testing.assert_allclose(chunked.value.to_numpy(), single.value.to_numpy(), rtol=1e-4, atol=1e-4)
