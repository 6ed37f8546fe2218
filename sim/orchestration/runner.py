"""A comparison run: every algorithm × every seed on the same data, partitions and actor pool.

The run directory is the unit a user keeps: the resolved config, a manifest (versions, git
commit, partition hashes, seeds), metrics, checkpoints and the report. Running the same
directory again resumes it: finished (algorithm, seed) pairs are skipped, the interrupted one
continues from its checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import logging
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import ray

from actors.client import ClientActor
from actors.pool import ActorPool, NodeLostError
from actors.server import ServerActor
from algorithms.base import RunContext
from sim.callbacks import load_callbacks
from sim.config import (
    RunConfig,
    algorithm_spec,
    dump_config,
    resolved,
    run_algorithms,
    stored_config_matches,
)
from sim.data import ArrayDataset, forget_dataset, load_dataset
from sim.files import write_json, write_text
from sim.models import ModelSpec
from sim.orchestration import warm_actors
from sim.orchestration.cluster import check_local_resources, connect, plan_pool, shutdown
from sim.orchestration.engine import Simulation
from sim.orchestration.interrupts import status as interrupt_status
from sim.orchestration.partition_build import partition_for
from sim.orchestration.progress import Progress
from sim.results import ResultsWriter
from sim.typed import ConfigError, to_mapping

log = logging.getLogger(__name__)

#: Datasets at least this large live once, in Ray's object store: the driver reads that copy
#: and frees its own (smaller ones, and every dataset of a sweep, stay cached in-process).
SHARE_ONLY_BYTES = 64 * 2**20

#: Node losses one (algorithm, seed) survives by resuming from its checkpoint before the run gives up.
MAX_NODE_LOSSES = 3

_PACKAGES = ("torch", "ray", "numpy", "pyarrow", "diffusers", "peft", "scikit-learn", "warmfed-sim")


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    report_path: Path | None


def new_run_id(cfg: RunConfig) -> str:
    digest = hashlib.sha256(dump_config(cfg).encode()).hexdigest()[:6]
    return f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{digest}"


def claim_run_id(out: Path, cfg: RunConfig) -> str:
    """A fresh run id whose directory this process creates: mkdir is atomic, so two runs started
    in the same second with the same config (two jobs on one cluster) never share a directory."""
    out.mkdir(parents=True, exist_ok=True)
    base = new_run_id(cfg)
    for attempt in range(1, 1000):
        run_id = base if attempt == 1 else f"{base}-{attempt}"
        try:
            (out / run_id).mkdir()
            return run_id
        except FileExistsError:
            continue
    raise ConfigError(f"cannot create a new run directory under {out}")


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class RunLock:
    """An exclusive lock on a run directory for as long as a run uses it.

    flock is released by the kernel when the process dies, however it dies (kill -9 included),
    so a crashed run never leaves a stale lock; NFS (v4, or v3 with lockd) honours it across
    machines. The file names the holder for the refusal message."""

    def __init__(self, run_dir: Path) -> None:
        import fcntl

        self.path = run_dir / "run.lock"
        self._file = open(self.path, "a+")  # noqa: SIM115 -- held open for the run: the flock lives as long as the handle
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                log.warning("cannot lock %s (%s): concurrent runs of this run_id are not prevented", self.path, exc)
                return
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise ConfigError(
                f"run directory {run_dir} is in use by a running run ({holder}); wait for it, or choose another run_id"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()


def prepare_run_dir(cfg: RunConfig) -> tuple[RunConfig, Path, RunLock, bool]:
    """Fix the run id and absolute paths, lock the directory and write (or check, when resuming)
    the resolved config. Returns (config, directory, lock, whether this call created the run)."""
    out = str(Path(cfg.out).resolve())
    cfg_has_id = cfg.run_id is not None
    run_id = cfg.run_id or claim_run_id(Path(out), cfg)
    cache = str(Path(cfg.cache_dir).resolve()) if cfg.cache_dir else None
    cfg = replace(cfg, run_id=run_id, out=out, cache_dir=cache)
    run_dir = Path(out) / run_id
    created = True  # claim_run_id made it
    if cfg_has_id:
        try:
            run_dir.mkdir(parents=True)
            created = True
        except FileExistsError:
            created = False
    lock = RunLock(run_dir)
    try:
        config_path = run_dir / "config.yaml"
        if config_path.exists():
            if not stored_config_matches(config_path, cfg):
                raise ConfigError(
                    f"run directory {run_dir} holds a run with a different config; "
                    f"choose another run_id (or out) or resume it with `run_sim.py run --resume {run_dir}`"
                )
            return cfg, run_dir, lock, False
        write_text(config_path, dump_config(cfg))
        return cfg, run_dir, lock, created
    except BaseException:
        lock.release()
        raise


def check_writable(directory: Path, key: str) -> None:
    """`out` / `cache_dir` must be a directory this process can write: one line, before anything else."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{key}={directory}: cannot write there ({exc.strerror or exc}); set {key} to a directory you can write"
        ) from None


def run_context(cfg: RunConfig, dataset: ArrayDataset, seed: int, run_dir: str) -> RunContext:
    spec = ModelSpec(dataset.image_shape[0], dataset.num_classes, dataset.image_shape[1], cfg.model.width)
    return RunContext(
        num_clients=cfg.num_clients,
        clients_per_round=resolved(cfg.clients_per_round, "clients_per_round"),
        rounds=cfg.rounds,
        seed=seed,
        train=cfg.train,
        model_name=cfg.model.name,
        model_spec=spec,
        cache_dir=str(cfg.cache_path),
        run_dir=run_dir,
        dataset_fingerprint=dataset.fingerprint(),
        dataset_name=cfg.dataset,
        dataset_params=dict(cfg.data),
        class_names=tuple(dataset.class_names),
        holdout_clients=cfg.holdout_clients,
        mixed_precision=cfg.mixed_precision,
    )


def preflight(cfg: RunConfig, dataset: ArrayDataset) -> dict[int, tuple[Any, Path]]:
    """Everything knowable without Ray, checked before Ray starts or a run folder exists: the
    partition of every seed (scheme vs clients; built or found in the cache), every algorithm's
    own checks (e.g. a missing algo.warmfed.sd_model path) and, for a Ray started here, the
    machine's CPUs and GPUs against client_resources. Returns the partitions."""
    check_local_resources(cfg)
    ctx = run_context(cfg, dataset, cfg.seeds[0], str(Path(cfg.out) / "preflight"))
    for name in run_algorithms(cfg):
        cls, params = algorithm_spec(cfg, name)
        cls(params, ctx)
    return {seed: partition_for(cfg, dataset, seed) for seed in cfg.seeds}


def share_dataset(dataset: ArrayDataset, keep_cached: bool = False) -> tuple[ArrayDataset, Any]:
    """Put the dataset in the object store, where every actor reads it zero-copy. A large one is
    then read from there by the driver too, instead of being held twice (the driver's copy and
    the store's), unless `keep_cached`: a sweep's next cell reuses the driver's copy rather than
    building the dataset again."""
    ref = ray.put(dataset)
    if keep_cached or dataset.nbytes < SHARE_ONLY_BYTES:
        return dataset, ref
    forget_dataset(dataset)
    return ray.get(ref), ref


def run_comparison(cfg: RunConfig, progress: Progress | None = None, keep_dataset_cached: bool = False) -> RunResult:
    progress = progress or Progress(cfg.progress)
    # the fixed cost, part by part (manifest "fixed_s"; benchmarks/engine_vs_plain.py prints it)
    fixed: dict[str, float] = {}
    clock = time.perf_counter()
    names = run_algorithms(cfg)
    check_writable(Path(cfg.out), "out")
    if cfg.cache_dir:
        check_writable(Path(cfg.cache_dir), "cache_dir")
    dataset = load_dataset(cfg.dataset, cfg.data)  # bad data fails before anything is written
    partitions = preflight(cfg, dataset)
    cfg, run_dir, lock, created = prepare_run_dir(cfg)
    manifest: dict[str, Any] = {
        "run_id": cfg.run_id,
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "versions": package_versions(),
        "seeds": cfg.seeds,
        "algorithms": names,
        "host": platform.node(),
    }
    manifest["dataset"] = {
        "name": dataset.name,
        "fingerprint": dataset.fingerprint(),
        "samples": int(len(dataset.labels)),
        "domain_names": list(dataset.domain_names),
    }
    interrupt_status.run_dir = run_dir
    started_ray = False
    pool: ActorPool | None = None
    server: Any = None
    parked = False  # the actors wait in warm_actors for the next comparison of this process
    begun = False  # a run folder made by this call holds nothing worth keeping until the actors exist
    fixed["prepare"] = time.perf_counter() - clock  # data, partitions, checks, the run folder
    try:
        clock = time.perf_counter()
        started_ray = connect(cfg, run_dir.name)
        fixed["ray_start"] = time.perf_counter() - clock
        plan = plan_pool(cfg, available=warm_actors.with_parked(ray.available_resources()))
        warm = warm_actors.take(plan, dataset.fingerprint(), cfg.server_resources.threads)
        manifest["pool"] = to_mapping(plan)
        manifest["ray_address"] = cfg.ray.address or "local"
        progress.note(
            f"{plan.size} client actors ({plan.num_cpus:g} CPU, {plan.num_gpus:g} GPU each); "
            f"server {plan.server_num_cpus:g} CPU, {plan.server_num_gpus:g} GPU"
        )
        if warm is not None:
            server, pool, dataset_ref = warm.server, warm.pool, warm.dataset_ref
        else:
            dataset, dataset_ref = share_dataset(dataset, keep_dataset_cached)
            # Both start in the background (their processes import torch) while partitions are sent.
            # ray.remote turns the classes into ActorClasses; mypy still sees the plain classes
            server = ServerActor.options(**plan.server_options(), scheduling_strategy=_on_this_node()).remote(  # type: ignore[attr-defined]
                cfg.server_resources.threads
            )
            pool = ActorPool(lambda: ClientActor.options(**plan.actor_options()).remote(dataset_ref), plan.size)  # type: ignore[attr-defined]
            clock = time.perf_counter()
            ray.get([server.ping.remote(), *(actor.ping.remote() for actor in pool.actors)])
            fixed["actors"] = time.perf_counter() - clock  # waiting for them to start (torch imports)
        begun = True
        manifest["partitions"] = {}
        for seed in cfg.seeds:
            partition, part_dir = partitions[seed]
            manifest["partitions"][str(seed)] = {
                "key": partition.key,
                "path": str(part_dir),
                "client_domain": [int(d) for d in partition.client_domain],  # the report's per-domain table
            }
            write_json(run_dir / "manifest.json", manifest)
            partition_ref = ray.put(partition)
            run_ctx = run_context(cfg, dataset, seed, str(run_dir))
            for name in names:
                _execute(name, cfg, run_ctx, partition, partition_ref, pool, server, run_dir, progress, plan)
        manifest["devices"] = _devices(server, pool)
        write_json(run_dir / "manifest.json", manifest)
        ResultsWriter(run_dir, run_dir.name).consolidate()
        if warm_actors.keeping() and not started_ray and pool.size == plan.size:
            warm_actors.park(
                warm_actors.WarmActors(
                    warm_actors.session(),
                    plan,
                    dataset.fingerprint(),
                    cfg.server_resources.threads,
                    dataset_ref,
                    pool,
                    server,
                )
            )
            parked = True
    except BaseException:
        if created and not begun:
            shutil.rmtree(run_dir, ignore_errors=True)  # e.g. the attached cluster cannot host the actors
        raise
    finally:
        lock.release()
        del dataset  # may be a view into the object store, which shutdown unmaps
        if ray.is_initialized() and not parked:
            for actor in [*(pool.actors if pool else []), *([server] if server is not None else [])]:
                with contextlib.suppress(Exception):
                    ray.kill(actor)
        if started_ray:
            clock = time.perf_counter()
            shutdown()
            fixed["ray_shutdown"] = time.perf_counter() - clock
    from sim.orchestration.report import write_report

    clock = time.perf_counter()
    report = write_report(run_dir)
    fixed["report"] = time.perf_counter() - clock
    manifest["fixed_s"] = {name: round(seconds, 3) for name, seconds in fixed.items()}
    write_json(run_dir / "manifest.json", manifest)
    return RunResult(run_dir, report)


def _devices(server: Any, pool: ActorPool) -> dict[str, Any]:
    """Where the server and each client actor computed (device, Ray's GPU ids, CUDA_VISIBLE_DEVICES,
    GPU memory): the record that a GPU run used the GPUs it was given."""
    from ray.exceptions import GetTimeoutError, RayActorError

    names = ["server", *(f"client{i}" for i in range(pool.size))]
    refs = [actor.device_info.remote() for actor in [server, *pool.actors]]
    devices: dict[str, Any] = {}
    for name, ref in zip(names, refs, strict=True):
        try:
            devices[name] = ray.get(ref, timeout=30)
        except (GetTimeoutError, RayActorError) as exc:
            devices[name] = {"error": type(exc).__name__}
    return devices


def _on_this_node() -> Any:
    """The server actor lives on the driver's node: a worker node's death never takes the global state."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def _execute(
    name: str,
    cfg: RunConfig,
    run_ctx: RunContext,
    partition: Any,
    partition_ref: Any,
    pool: ActorPool,
    server: Any,
    run_dir: Path,
    progress: Progress,
    plan: Any,
) -> None:
    """One (algorithm, seed); a lost Ray node sends it back to its last checkpoint on the actors left."""
    from ray.exceptions import ObjectLostError

    from sim.orchestration.cluster import ResourceError

    losses = 0
    while True:
        cls, params = algorithm_spec(cfg, name)
        algorithm = cls(params, run_ctx)
        algorithm.name = name  # a variant reports under its own name
        simulation = Simulation(
            algorithm=algorithm,
            run=run_ctx,
            cfg=cfg,
            partition=partition,
            partition_ref=partition_ref,
            pool=pool,
            server=server,
            results=ResultsWriter(run_dir, run_dir.name),
            progress=progress,
            callbacks=load_callbacks(cfg.callbacks),
        )
        simulation.checkpoints.guard = pool.check_nodes  # never checkpoint a round a dead node may have cut short
        interrupt_status.where = lambda store=simulation.checkpoints: (
            f"round {store.last_round} of {name} (seed {run_ctx.seed})"
            if store.last_round is not None
            else f"the start of {name} (seed {run_ctx.seed})"
        )
        try:
            simulation.execute()
            return
        except (NodeLostError, ObjectLostError) as exc:
            losses += 1
            lost = pool.drop_lost()
            room = _room_for(plan)
            if room > 0:
                pool.grow(min(room, plan.size - pool.size))
            if losses > MAX_NODE_LOSSES or pool.size == 0:
                raise ResourceError(
                    f"{exc} and no client actor is left to continue {name} (seed {run_ctx.seed}); "
                    f"resume with: run_sim.py run --resume {run_dir}"
                ) from None
            last = simulation.checkpoints.last_round
            log.warning(
                "%s: %d client actors lost with it; %s (seed %d) resumes from its last checkpoint "
                "(round %s) on %d actors",
                exc,
                lost,
                name,
                run_ctx.seed,
                last,
                pool.size,
            )


def _room_for(plan: Any) -> int:
    """Client actors of the plan's size that fit in the cluster's free resources now."""
    from sim.orchestration.cluster import gpu_room

    free = ray.available_resources()
    n = int(float(free.get("CPU", 0.0)) // plan.num_cpus + 1e-9) if plan.num_cpus else 0
    if plan.num_gpus:
        n = min(n, gpu_room(float(free.get("GPU", 0.0)), plan.num_gpus))
    return max(0, n)
