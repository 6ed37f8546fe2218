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

log = logging.getLogger(__name__)


class ResourceError(RuntimeError):
    """The cluster cannot host the requested client actors."""


@dataclass(frozen=True)
class PoolPlan:
    size: int
    num_cpus: float
    num_gpus: float

    def actor_options(self) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


def starts_local_ray(cfg: RunConfig) -> bool:
    """True when `connect` will start a private Ray on this machine (no address, none in RAY_ADDRESS)."""
    return not ray.is_initialized() and not cfg.ray.address and not os.environ.get("RAY_ADDRESS")


def local_gpus() -> int:
    """GPUs a Ray started here would see (torch honours CUDA_VISIBLE_DEVICES as Ray does)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_local_resources(cfg: RunConfig) -> None:
    """Before Ray starts: a request this machine can never satisfy fails as the live check would."""
    if not starts_local_ray(cfg):
        return
    total = {"CPU": float(cfg.ray.num_cpus or os.cpu_count() or 1), "GPU": float(local_gpus())}
    plan_pool(cfg, available=total, total=total)


def _quiet_default_auth(record: logging.LogRecord) -> bool:
    return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


def connect(cfg: RunConfig, run_id: str) -> bool:
    """Start a local Ray (address None) or attach to one; returns True if this call started it."""
    if ray.is_initialized():
        return False
    from sim import interrupts

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    namespace = cfg.ray.namespace or f"warmfed-sim-{run_id}-{uuid.uuid4().hex[:6]}"
    kwargs: dict = {"namespace": namespace, "logging_level": logging.WARNING, "log_to_driver": True}
    if not starts_local_ray(cfg):
        ray.init(address=cfg.ray.address, **kwargs)
    else:
        # A Ray only this process uses: token authentication stays on (Ray's default for a local
        # start); only Ray's notice that it turned it on is dropped.
        auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
        auth_log.addFilter(_quiet_default_auth)
        try:
            # "local": a new Ray even when `ray start` left one on this machine (ray.init would attach)
            ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, **kwargs)
        finally:
            auth_log.removeFilter(_quiet_default_auth)
    interrupts.install()  # ray.init replaced the SIGTERM handler
    return True


def plan_pool(
    cfg: RunConfig, available: dict[str, float] | None = None, total: dict[str, float] | None = None
) -> PoolPlan:
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
    total_cpus = float(total.get("CPU", 0.0))
    if res.num_cpus > total_cpus:
        raise ResourceError(
            f"client_resources.num_cpus={res.num_cpus} but the Ray cluster has only {total_cpus:g} CPUs "
            f"({cpus:g} free); lower client_resources.num_cpus"
        )

    def room(resources: dict[str, float]) -> int:
        n = int(math.floor(float(resources.get("CPU", 0.0)) / res.num_cpus + 1e-9))
        if gpus_each > 0:
            n = min(n, int(math.floor(float(resources.get("GPU", 0.0)) / gpus_each + 1e-9)))
        return n

    free_now, ever = room(available), min(room(total), cfg.num_clients)
    if ever < 1:
        raise ResourceError("no client actor fits in the Ray cluster's resources")
    if cfg.ray.pool_size is not None:
        if cfg.ray.pool_size > ever:
            raise ResourceError(
                f"ray.pool_size={cfg.ray.pool_size} actors of {res.num_cpus} CPU / {gpus_each} GPU do not fit: "
                f"the cluster has room for {ever}"
            )
        size = cfg.ray.pool_size
    else:
        size = max(1, min(free_now, cfg.num_clients))
    if size > free_now:
        # Placeable, but other work (another run on a shared cluster) holds the resources now:
        # the actors wait for them instead of failing the run.
        log.warning(
            "%d of %d client actors wait for resources held by other work on the Ray cluster", size - free_now, size
        )
    return PoolPlan(size=size, num_cpus=res.num_cpus, num_gpus=gpus_each)
