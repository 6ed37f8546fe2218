"""A client actor does only the work a verb needs: each split is gathered when first read, each
resident model reset when first handed out, and skipping the rest changes no number.

The counts come from spies on the worker's gather and on `load_weights`; the leak checks compare
a worker whose resident model was left in another state (trained on another client, loaded with
other weights) with a fresh one: the rows must be the same bits.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import actors.client as client_module
import algorithms.base
from algorithms.base import Algorithm, Broadcast, model_weights
from tests.test_chunked_training import _worker_and_run


@pytest.fixture
def spied(tmp_path, monkeypatch):
    """(worker, run, gathers, loads): gathers counts (client, split); loads names each loaded model."""
    worker, run = _worker_and_run(tmp_path)
    gathers: Counter = Counter()
    loads: list[str] = []
    gather = worker._gather

    def counted_gather(client_id: int, split: str):
        gathers[client_id, split] += 1
        return gather(client_id, split)

    def counted_load(model, weights):
        loads.append("resident" if model is worker.model else "scratch")
        real_load(model, weights)

    real_load = client_module.load_weights
    monkeypatch.setattr(worker, "_gather", counted_gather)
    for module in (client_module, algorithms.base):  # the actor's resets and the default local_train's load
        monkeypatch.setattr(module, "load_weights", counted_load)
    return worker, run, gathers, loads


def _message(run) -> Broadcast:
    torch.manual_seed(1)
    return Broadcast(model_weights(run.build_model()))


def test_global_evaluation_gathers_val_and_test_once_and_loads_the_model_once(spied):
    worker, run, gathers, loads = spied
    rows = worker.evaluate([0, 2, 3], 1, _message(run), [-1] * 3, batch_size=64)
    assert gathers == Counter({(c, s): 1 for c in (0, 2, 3) for s in ("val", "test")})  # no train split
    assert loads == ["resident"]  # the global weights, once for all three clients; no per-client reset
    assert {(c, s) for c, s, m, _ in rows if m == "global_acc"} == {(c, s) for c in (0, 2, 3) for s in ("val", "test")}


def test_training_gathers_only_the_train_split_and_resets_only_the_model_it_uses(spied):
    worker, run, gathers, loads = spied
    worker.train(4, 1, _message(run), -1)
    assert gathers == Counter({(4, "train"): 1})
    assert loads == ["resident"]  # the starting weights cover the whole state: no reset before them


def test_starting_weights_that_leave_part_of_the_state_out_load_after_a_reset(spied, tmp_path):
    worker, run, _, loads = spied
    algorithm = _HeadStaysHome(None, run)
    worker.configure(algorithm, worker.partition, run, str(tmp_path / "state"))
    message = Broadcast(algorithm.shared_part(_message(run).weights))
    loads.clear()
    worker.train(4, 1, message, -1)
    assert loads == ["resident", "resident"]  # the reset to the init (the head), then the broadcast body


def test_a_model_left_in_another_state_changes_no_number(tmp_path):
    message = _message(_worker_and_run(tmp_path / "a")[1])
    fresh, _ = _worker_and_run(tmp_path / "fresh")
    expected_eval = fresh.evaluate([0, 5], 1, message, [-1, -1], batch_size=64)
    fresh2, _ = _worker_and_run(tmp_path / "fresh2")
    expected_train = fresh2.train(1, 1, message, -1)

    used, _ = _worker_and_run(tmp_path / "used")
    used.train(3, 1, message, -1)  # leaves client 3's trained model resident
    assert used.evaluate([0, 5], 1, message, [-1, -1], batch_size=64) == expected_eval
    update, info = used.train(1, 1, message, -1)  # after evaluation left the global weights resident
    assert info["metrics"]["train_loss"] == expected_train[1]["metrics"]["train_loss"]
    assert all(torch.equal(update.payload[k], expected_train[0].payload[k]) for k in update.payload)


class _HeadStaysHome(Algorithm):
    """Personal head, no state yet: `personal_weights` is the broadcast body only (a partial state)."""

    personal_patterns = ("head.*",)
    has_global_model = False


def test_partial_personal_weights_are_scored_on_the_reset_model_not_on_a_stale_one(tmp_path):
    fresh, run = _worker_and_run(tmp_path / "fresh")
    algorithm = _HeadStaysHome(None, run)
    fresh.configure(algorithm, fresh.partition, run, str(tmp_path / "fresh" / "state"))
    message = Broadcast(algorithm.shared_part(_message(run).weights))
    assert message.weights and message.weights.keys() < fresh.init_weights.keys()
    expected = fresh.evaluate([2], 1, message, [-1], batch_size=64)

    used, _ = _worker_and_run(tmp_path / "used")
    used.configure(algorithm, used.partition, run, str(tmp_path / "used" / "state"))
    torch.manual_seed(7)
    client_module.load_weights(used.model, model_weights(run.build_model()))  # a head unlike the init's
    assert used.evaluate([2], 1, message, [-1], batch_size=64) == expected
