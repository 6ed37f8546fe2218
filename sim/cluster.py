"""Connecting to Ray and sizing the client-actor pool from what the cluster can really place.

Ray actors hold their resources for life, and an actor that cannot be placed waits forever
without an error. So the pool is sized from `ray.available_resources()`, and a request the
cluster can never satisfy (a GPU share with no GPU, more CPUs per client than any node has)
is refused at once with a message that names the config key.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from dataclasses import dataclass

import ray

from sim.config import RunConfig


class ResourceError(RuntimeError):
    """The cluster cannot host the requested client actors."""


@dataclass(frozen=True)
class PoolPlan:
    size: int
    num_cpus: float
    num_gpus: float

    def actor_options(self) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


def connect(cfg: RunConfig, run_id: str) -> bool:
    """Start a local Ray (address None) or attach to one; returns True if this call started it."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    namespace = cfg.ray.namespace or f"warmfed-sim-{run_id}-{uuid.uuid4().hex[:6]}"
    kwargs: dict = {"namespace": namespace, "logging_level": logging.WARNING, "log_to_driver": True}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **kwargs)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, **kwargs)
    return True


def plan_pool(cfg: RunConfig, available: dict[str, float] | None = None, total: dict[str, float] | None = None) -> PoolPlan:
    """How many client actors of the configured size fit now; refuses impossible requests."""
    available = dict(ray.available_resources() if available is None else available)
    total = dict(ray.cluster_resources() if total is None else total)
    res = cfg.client_resources
    cluster_gpus = float(total.get("GPU", 0.0))
    cpus = float(available.get("CPU", 0.0))
    if res.num_gpus == "auto":
        gpus_each = 0.0
        if cluster_gpus > 0:
            slots = max(1, int(cpus // res.num_cpus))
            gpus_each = min(1.0, float(available.get("GPU", 0.0)) / min(slots, cfg.num_clients))
    else:
        gpus_each = float(res.num_gpus)
        if gpus_each > 0 and cluster_gpus == 0:
            raise ResourceError(
                f"client_resources.num_gpus={gpus_each} but the Ray cluster has no GPUs; "
                "set client_resources.num_gpus to 0, or to 'auto' to use GPUs only where they exist"
            )
    if res.num_cpus > cpus:
        raise ResourceError(
            f"client_resources.num_cpus={res.num_cpus} but only {cpus:g} CPUs are free in the Ray cluster; "
            "lower client_resources.num_cpus"
        )
    size = int(math.floor(cpus / res.num_cpus + 1e-9))
    if gpus_each > 0:
        size = min(size, int(math.floor(float(available.get("GPU", 0.0)) / gpus_each + 1e-9)))
    size = min(size, cfg.num_clients)
    if cfg.ray.pool_size is not None:
        if cfg.ray.pool_size > size:
            raise ResourceError(
                f"ray.pool_size={cfg.ray.pool_size} actors of {res.num_cpus} CPU / {gpus_each} GPU do not fit: "
                f"the cluster has room for {size}"
            )
        size = cfg.ray.pool_size
    if size < 1:
        raise ResourceError("no client actor fits in the Ray cluster's free resources")
    return PoolPlan(size=size, num_cpus=res.num_cpus, num_gpus=gpus_each)
