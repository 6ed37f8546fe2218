"""Shared fixtures: one local Ray for the whole session (starting Ray costs seconds)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Two test workers share two cores with their Ray actors: a test's own torch work (reference
# trainings, judges) takes one thread, as every actor does, instead of oversubscribing the cores.
torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules with the most slow tests first: each runs whole on one worker (--dist
    loadfile), and a long module handed out last leaves the other worker idle at the end."""
    slow: dict[str, int] = {}
    for item in items:
        slow[item.module.__name__] = slow.get(item.module.__name__, 0) + int(
            item.get_closest_marker("slow") is not None
        )
    items.sort(key=lambda item: -slow[item.module.__name__])  # stable: each module keeps its order


def init_local_ray() -> None:
    """The tests' shared Ray: two CPUs, no GPU."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="warmfed-sim-tests")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from sim.orchestration.warm_actors import keeping_actors

    if not ray.is_initialized():
        init_local_ray()
    with keeping_actors():  # in-process runs hand their actors on to the next, as a sweep's cells do
        yield ray
    ray.shutdown()


def small_overrides(tmp_path, *extra: str) -> list[str]:
    """A seconds-long run: few clients, two rounds, no progress bars, cache and results in tmp."""
    return [
        "num_clients=6",
        "clients_per_round=4",
        "rounds=2",
        "progress=false",
        "train.batch_size=32",
        "server_resources.threads=1",  # two test workers share two cores: no oversubscribed server
        f"out={tmp_path / 'results'}",
        f"cache_dir={tmp_path / 'cache'}",
        *extra,
    ]


def session_address(ray) -> str:
    """The session Ray's address, for a CLI subprocess to join it. The actors an in-process run
    left warm are released first: the subprocess needs their CPUs."""
    from sim.orchestration.warm_actors import release

    release()
    return ray.get_runtime_context().gcs_address


def attached(ray, items: list[str]) -> list[str]:
    """Overrides that make a CLI subprocess join the session's Ray instead of starting its own
    (a Ray start costs seconds; only tests about the Ray a run starts need their own)."""
    return [*items, f"ray.address={session_address(ray)}"]


def run_in_process(items: list[str]):
    """An undisturbed reference run on the session's Ray; returns its run directory."""
    from sim.config import load_config
    from sim.orchestration.runner import run_comparison

    return run_comparison(load_config(None, items)).run_dir
