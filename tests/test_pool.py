"""The actor pool: largest tasks first, a dead actor replaced, a failing task retried elsewhere."""

from __future__ import annotations

import os

import pytest
import ray

from actors.pool import ActorPool, ClientTaskError, Task


@ray.remote(num_cpus=0)
class Worker:
    def __init__(self) -> None:
        self.configured = None

    def ping(self) -> bool:
        return True

    def configure(self, value: str) -> bool:
        self.configured = value
        return True

    @ray.method(num_returns=2)
    def work(self, key: int, die_on: int, fail_on: int, marker: str):
        if key == die_on and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # the actor process dies mid-task, once
        if key == fail_on:
            raise ValueError(f"bad client {key}")
        return key * 10, {"key": key, "pid": os.getpid(), "configured": self.configured}


def _tasks(n, die_on=-1, fail_on=-1, marker=""):
    return [Task(k, float(k), lambda a, k=k: a.work.remote(k, die_on, fail_on, marker)) for k in range(n)]


def test_largest_first_and_all_results(ray_local):
    pool = ActorPool(Worker.remote, size=1, inflight=1)
    order = [task.key for task, _, _ in pool.run(_tasks(5))]
    assert order == [4, 3, 2, 1, 0]


def test_dead_actor_is_replaced_and_set_up_again(ray_local, tmp_path):
    pool = ActorPool(Worker.remote, size=2)
    pool.setup("configure", "run-A")
    results = {
        task.key: (ray.get(ref), info) for task, ref, info in pool.run(_tasks(8, die_on=5, marker=str(tmp_path / "m")))
    }
    assert sorted(results) == list(range(8))
    assert all(value == key * 10 for key, (value, _) in results.items())
    assert all(info["configured"] == "run-A" for _, info in results.values())  # the replacement was configured
    assert (tmp_path / "m").exists()


def test_a_task_that_raises_twice_names_the_client(ray_local):
    pool = ActorPool(Worker.remote, size=2)
    with pytest.raises(ClientTaskError, match="task 3 failed twice"):
        list(pool.run(_tasks(5, fail_on=3)))
    labelled = [
        Task(k, 1.0, lambda a, k=k: a.work.remote(k, -1, 1, ""), label=f"clients {k}, {k + 10}") for k in range(3)
    ]
    with pytest.raises(ClientTaskError, match=r"(?s)task clients 1, 11 failed twice: .*bad client 1"):
        list(pool.run(labelled))
