"""A comparison run: every algorithm × every seed on the same data, partitions and actor pool.

The run directory is the unit a user keeps: the resolved config, a manifest (versions, git
commit, partition hashes, seeds), metrics, checkpoints and the report. Running the same
directory again resumes it: finished (algorithm, seed) pairs are skipped, the interrupted one
continues from its checkpoint.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import ray

from actors.client import ClientActor
from actors.pool import ActorPool
from actors.server import ServerActor
from algorithms.base import RunContext
from sim.cluster import connect, plan_pool
from sim.config import RunConfig, algorithm_spec, dump_config, load_config, run_algorithms
from sim.data import ArrayDataset, forget_dataset, load_dataset
from sim.engine import Simulation
from sim.models import ModelSpec
from sim.partition_build import partition_for
from sim.progress import Progress
from sim.results import ResultsWriter
from sim.typed import ConfigError, to_mapping

log = logging.getLogger(__name__)

#: Datasets at least this large live once, in Ray's object store: the driver reads that copy
#: and frees its own (smaller ones, and every dataset of a sweep, stay cached in-process).
SHARE_ONLY_BYTES = 64 * 2**20

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


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def prepare_run_dir(cfg: RunConfig) -> tuple[RunConfig, Path]:
    """Fix the run id and absolute paths, and write (or check, when resuming) the resolved config."""
    from dataclasses import replace

    out = str(Path(cfg.out).resolve())
    run_id = cfg.run_id or claim_run_id(Path(out), cfg)
    cache = str(Path(cfg.cache_dir).resolve()) if cfg.cache_dir else None
    cfg = replace(cfg, run_id=run_id, out=out, cache_dir=cache)
    run_dir = Path(out) / run_id
    config_path = run_dir / "config.yaml"
    if config_path.exists():
        previous = load_config(config_path)
        if dump_config(replace(previous, progress=cfg.progress)) != dump_config(cfg):
            raise ConfigError(
                f"run directory {run_dir} holds a run with a different config; "
                "choose another run_id (or out) or resume it with `run_sim.py run --resume {run_dir}`"
            )
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(dump_config(cfg))
    return cfg, run_dir


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
    names = run_algorithms(cfg)
    dataset = load_dataset(cfg.dataset, cfg.data)  # bad data fails before anything is written
    cfg, run_dir = prepare_run_dir(cfg)
    manifest: dict[str, Any] = {
        "run_id": cfg.run_id,
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "versions": package_versions(),
        "seeds": cfg.seeds,
        "algorithms": names,
        "host": platform.node(),
    }
    manifest["dataset"] = {"name": dataset.name, "fingerprint": dataset.fingerprint(), "samples": int(len(dataset.labels))}
    started_ray = connect(cfg, cfg.run_id)
    try:
        plan = plan_pool(cfg)
        manifest["pool"] = to_mapping(plan)
        manifest["ray_address"] = cfg.ray.address or "local"
        progress.note(f"{plan.size} client actors ({plan.num_cpus:g} CPU, {plan.num_gpus:g} GPU each)")
        dataset, dataset_ref = share_dataset(dataset, keep_dataset_cached)
        # Both start in the background (their processes import torch) while partitions are built.
        pool = ActorPool(lambda: ClientActor.options(**plan.actor_options()).remote(dataset_ref), plan.size)
        server = ServerActor.options(num_cpus=0).remote()
        spec = ModelSpec(dataset.image_shape[0], dataset.num_classes, dataset.image_shape[1], cfg.model.width)
        manifest["partitions"] = {}
        for seed in cfg.seeds:
            partition, part_dir = partition_for(cfg, dataset, seed)
            manifest["partitions"][str(seed)] = {"key": partition.key, "path": str(part_dir)}
            write_json(run_dir / "manifest.json", manifest)
            partition_ref = ray.put(partition)
            run_ctx = RunContext(
                num_clients=cfg.num_clients,
                clients_per_round=cfg.clients_per_round,
                rounds=cfg.rounds,
                seed=seed,
                train=cfg.train,
                model_name=cfg.model.name,
                model_spec=spec,
                cache_dir=str(cfg.cache_path),
                run_dir=str(run_dir),
                dataset_fingerprint=dataset.fingerprint(),
                dataset_name=cfg.dataset,
                dataset_params=dict(cfg.data),
                class_names=tuple(dataset.class_names),
                holdout_clients=cfg.holdout_clients,
            )
            for name in names:
                cls, params = algorithm_spec(cfg, name)
                algorithm = cls(params, run_ctx)
                algorithm.name = name  # a variant reports under its own name
                Simulation(
                    algorithm=algorithm, run=run_ctx, cfg=cfg, partition=partition, partition_ref=partition_ref,
                    pool=pool, server=server, results=ResultsWriter(run_dir, cfg.run_id), progress=progress,
                ).execute()
        ResultsWriter(run_dir, cfg.run_id).consolidate()
        for actor in [*pool.actors, server]:
            ray.kill(actor)
    finally:
        dataset = None  # may be a view into the object store, which shutdown unmaps
        if started_ray:
            ray.shutdown()
    from sim.report import write_report

    report = write_report(run_dir)
    return RunResult(run_dir, report)
