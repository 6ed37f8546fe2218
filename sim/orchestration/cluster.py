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
import subprocess
import uuid
from dataclasses import dataclass

import ray

from sim.config import RunConfig
from sim.errors import ResourceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolPlan:
    size: int
    num_cpus: float
    num_gpus: float
    server_num_cpus: float = 0.0
    server_num_gpus: float = 0.0

    def actor_options(self) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}

    def server_options(self) -> dict:
        return {"num_cpus": self.server_num_cpus, "num_gpus": self.server_num_gpus}


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
    plan_pool(cfg, available=total, total=total, server_node=total)


def _quiet_default_auth(record: logging.LogRecord) -> bool:
    return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


_reaper: subprocess.Popen | None = None  # held for the driver's life: its pipe closing is the signal


def _watch_private_ray() -> None:
    """Start the reaper (sim.orchestration.reaper) for the Ray this process just started; the one
    of an earlier private Ray (a sweep starts several) is released to clean up after it."""
    global _reaper
    from sim.orchestration.reaper import start_reaper

    if _reaper is not None and _reaper.stdin is not None:
        _reaper.stdin.close()
    raylet = _private_ray_process("raylet")
    if raylet is None:  # a Ray whose private layout differs: no reaper, Ray's own timeouts
        log.debug("no raylet process handle; agents are left to Ray's own 60 s timeout")
        return
    _reaper = start_reaper(raylet.pid)


def _private_ray_process(kind: str) -> subprocess.Popen | None:
    """The handle of one of the processes `ray.init` started here (Ray's private layout; None if it differs)."""
    node = getattr(ray._private.worker, "_global_node", None)
    try:
        return getattr(node, "all_processes", {})[kind][0].process
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


def _stop_autoscaler_monitor() -> None:
    """Kill the autoscaler monitor of a Ray this process started: a single-machine Ray has nothing
    to autoscale, and the monitor holds ~50 MiB (PSS) for the whole run."""
    monitor = _private_ray_process("monitor")
    if monitor is not None and monitor.poll() is None:
        monitor.kill()
        monitor.wait(timeout=5)


def shutdown() -> None:
    """`ray.shutdown()` for a Ray this process started, a second sooner.

    Ray stops its autoscaler monitor after the GCS, with a SIGTERM whose handler reports to that
    GCS, which is gone: the monitor waits out Ray's 1 s grace period and is then killed (1.0 of the
    1.4 s a shutdown took). `connect` has normally killed it already; if not, it goes first here.
    """
    _stop_autoscaler_monitor()
    ray.shutdown()


def connect(cfg: RunConfig, run_id: str) -> bool:
    """Start a local Ray (address None) or attach to one; returns True if this call started it."""
    if ray.is_initialized():
        return False
    from sim.orchestration import interrupts

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
        _watch_private_ray()
        _stop_autoscaler_monitor()
    interrupts.install()  # ray.init replaced the SIGTERM handler
    return True


def server_heavy(cfg: RunConfig) -> bool:
    """True when an algorithm of the run trains or samples models on the server (`Algorithm.server_heavy`)."""
    from sim.config import algorithm_spec, run_algorithms

    return any(getattr(algorithm_spec(cfg, name)[0], "server_heavy", False) for name in run_algorithms(cfg))


def driver_node_resources() -> dict[str, float]:
    """Total resources of the node this driver runs on, where the server actor is pinned."""
    here = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == here:
            return dict(node.get("Resources", {}))
    return {}


def gpu_share(gpus: float, actors: int) -> float:
    """An equal GPU share for `actors` that Ray can place: a fraction that divides one GPU (1/k), so
    k actors pack onto each GPU; with a single partly free GPU, an equal split of what is free."""
    whole = math.floor(gpus + 1e-9)
    if actors <= 0 or gpus <= 0:
        return 0.0
    if whole == 0:
        return gpus / actors
    return 1.0 if actors <= whole else 1.0 / math.ceil(actors / whole)


def gpu_room(gpus: float, share: float) -> int:
    """Actors of `share` GPU that fit on `gpus` GPUs, each fraction on one GPU (Ray never splits one
    actor over two GPUs, so 0.4 packs twice per GPU, not 2.5 times)."""
    if share >= 1.0:
        return math.floor(gpus / share + 1e-9)
    whole = math.floor(gpus + 1e-9)
    rest = gpus - whole
    return whole * math.floor(1.0 / share + 1e-9) + math.floor(rest / share + 1e-9)


def plan_pool(
    cfg: RunConfig,
    available: dict[str, float] | None = None,
    total: dict[str, float] | None = None,
    server_node: dict[str, float] | None = None,
) -> PoolPlan:
    """How many client actors of the configured size fit now beside the server actor (whose share
    is taken first); refuses impossible requests before any actor starts.

    `server_node`: total resources of the node the server is pinned to (the driver's; `total` when
    `total` is given, as for a Ray about to start on this machine)."""
    if server_node is None:  # given totals describe one node; the live cluster is asked where the driver is
        server_node = total if total is not None else driver_node_resources()
    available = dict(ray.available_resources() if available is None else available)
    total = dict(ray.cluster_resources() if total is None else total)
    server_node = dict(server_node)
    res, srv = cfg.client_resources, cfg.server_resources
    cluster_gpus = float(total.get("GPU", 0.0))
    node_gpus = float(server_node.get("GPU", 0.0))
    cpus = float(available.get("CPU", 0.0))
    free_gpus = float(available.get("GPU", 0.0))
    if srv.num_gpus == "auto":
        server_auto = node_gpus > 0 and server_heavy(cfg)
        server_gpus = 0.0
    else:
        server_auto, server_gpus = False, float(srv.num_gpus)
        if server_gpus > 0 and cluster_gpus == 0:
            raise ResourceError(
                f"server_resources.num_gpus={server_gpus:g} but the Ray cluster has no GPUs; "
                "set server_resources.num_gpus to 0, or to 'auto' to use a GPU only where one exists"
            )
        if server_gpus > node_gpus:
            raise ResourceError(
                f"server_resources.num_gpus={server_gpus:g} but the driver's node, where the server actor lives, "
                f"has {node_gpus:g} GPUs; run the driver on a GPU node or lower server_resources.num_gpus"
            )
    if res.num_gpus == "auto":
        gpus_each = 0.0
        if cluster_gpus > 0:
            slots = max(1, int(cpus // res.num_cpus))
            gpus_each = min(1.0, gpu_share(free_gpus, min(slots, cfg.num_clients) + int(server_auto)))
    else:
        gpus_each = float(res.num_gpus)
        if gpus_each > 0 and cluster_gpus == 0:
            raise ResourceError(
                f"client_resources.num_gpus={gpus_each:g} but the Ray cluster has no GPUs; "
                "set client_resources.num_gpus to 0, or to 'auto' to use GPUs only where they exist"
            )
    if server_auto:  # one more actor splitting the GPUs, or a whole GPU when the clients stay on CPU
        server_gpus = gpus_each if gpus_each > 0 else min(1.0, node_gpus)
    total_cpus = float(total.get("CPU", 0.0))
    if res.num_cpus > total_cpus:
        raise ResourceError(
            f"client_resources.num_cpus={res.num_cpus} but the Ray cluster has only {total_cpus:g} CPUs "
            f"({cpus:g} free); lower client_resources.num_cpus"
        )
    if srv.num_cpus > float(server_node.get("CPU", 0.0)):
        raise ResourceError(
            f"server_resources.num_cpus={srv.num_cpus:g} but the driver's node, where the server actor lives, "
            f"has {float(server_node.get('CPU', 0.0)):g} CPUs; lower server_resources.num_cpus"
        )

    def room(resources: dict[str, float]) -> int:
        """Client actors that fit in `resources` once the server's share is taken out."""
        n = math.floor((float(resources.get("CPU", 0.0)) - srv.num_cpus) / res.num_cpus + 1e-9)
        if gpus_each > 0:
            n = min(n, gpu_room(float(resources.get("GPU", 0.0)) - server_gpus, gpus_each))
        return max(n, 0)

    free_now, ever = room(available), min(room(total), cfg.num_clients)
    if ever < 1:
        raise ResourceError(
            "no client actor fits in the Ray cluster's resources"
            + (" beside the server actor's share (server_resources)" if server_gpus or srv.num_cpus else "")
        )
    if cfg.ray.pool_size is not None:
        if cfg.ray.pool_size > ever:
            raise ResourceError(
                f"ray.pool_size={cfg.ray.pool_size} actors of {res.num_cpus} CPU / {gpus_each:g} GPU do not fit: "
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
    return PoolPlan(
        size=size, num_cpus=res.num_cpus, num_gpus=gpus_each, server_num_cpus=srv.num_cpus, server_num_gpus=server_gpus
    )
