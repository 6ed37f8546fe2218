"""Shared fixtures: one local Ray for the whole session (starting Ray costs seconds)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def init_local_ray() -> None:
    """The tests' shared Ray: two CPUs, no GPU."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="warmfed-sim-tests")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        init_local_ray()
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
        f"out={tmp_path / 'results'}",
        f"cache_dir={tmp_path / 'cache'}",
        *extra,
    ]
