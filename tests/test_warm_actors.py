"""Actors kept warm between the comparisons of one process (sim/orchestration/warm_actors.py):
the next comparison with the same plan takes them (same processes, same numbers as cold
actors), another plan gets fresh ones, and release() gives their CPUs back."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest

from sim.orchestration import warm_actors
from sim.results import outcome_frame
from tests.conftest import run_in_process, small_overrides


def _pids(run_dir) -> set[int]:
    devices = json.loads((run_dir / "manifest.json").read_text())["devices"]
    return {int(d["pid"]) for d in devices.values()}


def test_the_next_comparison_takes_the_warm_actors_and_gets_the_same_numbers(ray_local, tmp_path):
    assert warm_actors.keeping()  # the session fixture keeps actors, as a sweep does
    items = ["algorithms=scaffold", "rounds=2", "model.width=8", "run_id=r"]  # client and server state
    warm_actors.release()
    cold = run_in_process(small_overrides(tmp_path / "cold", *items))
    warm = run_in_process(small_overrides(tmp_path / "warm", *items))
    assert _pids(warm) == _pids(cold)  # the same server and client processes
    pd.testing.assert_frame_equal(outcome_frame(warm), outcome_frame(cold))

    other = run_in_process(small_overrides(tmp_path / "other", *items, "client_resources.num_cpus=0.5"))
    assert not _pids(other) & _pids(cold)  # another pool plan: the warm actors were killed, new ones started
    pd.testing.assert_frame_equal(outcome_frame(other), outcome_frame(cold))  # 4 half-CPU actors, same bits

    warm_actors.release()
    deadline = time.monotonic() + 30
    while ray_local.available_resources().get("CPU", 0.0) < 2.0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray_local.available_resources().get("CPU", 0.0) == 2.0  # released: the session Ray is free again


def test_a_pool_of_another_size_is_grown_or_cut_from_the_warm_actors(ray_local, tmp_path):
    items = ["algorithms=scaffold", "rounds=1", "model.width=8", "run_id=r"]
    warm_actors.release()
    one = run_in_process(small_overrides(tmp_path / "one", *items, "ray.pool_size=1"))
    two = run_in_process(small_overrides(tmp_path / "two", *items, "ray.pool_size=2"))
    again = run_in_process(small_overrides(tmp_path / "again", *items, "ray.pool_size=1"))
    assert len(_pids(one)) == 2 and len(_pids(two)) == 3 and _pids(one) < _pids(two)  # server + client kept
    assert _pids(again) == _pids(one)  # the newest client actor went
    for run in (two, again):
        pd.testing.assert_frame_equal(outcome_frame(run), outcome_frame(one))


def test_a_failed_comparison_parks_nothing(ray_local, tmp_path, monkeypatch):
    import sim.orchestration.runner as runner

    def broken(self):
        raise RuntimeError("injected")

    run_in_process(small_overrides(tmp_path / "ok", "algorithms=fedavg", "rounds=1", "model.width=8"))
    assert warm_actors.with_parked({}).get("CPU", 0.0) > 0  # parked after a clean end
    monkeypatch.setattr(runner.Simulation, "execute", broken)
    with pytest.raises(RuntimeError, match="injected"):
        run_in_process(small_overrides(tmp_path / "bad", "algorithms=fedavg", "rounds=1", "model.width=8"))
    assert warm_actors.with_parked({}) == {}  # actors of a failed comparison are killed, not handed on
