"""From the run config to a stored partition: the glue between `partition.*` keys and the store.

Only the fields the chosen scheme declares are passed to it, so changing `partition.alpha`
does not change the hash (and the stored file) of a `shards` partition.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from sim.config import RunConfig
from sim.partition import PartitionStore, SplitFractions, scheme_params_cls


def scheme_params(cfg: RunConfig) -> dict[str, Any]:
    wanted = {f.name for f in dataclasses.fields(scheme_params_cls(cfg.partition.scheme))}
    return {name: getattr(cfg.partition, name) for name in sorted(wanted)}


def partition_for(cfg: RunConfig, dataset: Any, seed: int) -> tuple[Any, Path]:
    """Build or load the partition this (config, seed) uses; every algorithm of the run shares it."""
    p = cfg.partition
    store = PartitionStore(cfg.cache_path / "partitions")
    partition, path, _ = store.get_or_build(
        dataset.labels,
        dataset.domains,
        dataset.num_classes,
        dataset.num_domains,
        scheme=p.scheme,
        params=scheme_params(cfg),
        num_clients=cfg.num_clients,
        seed=p.seed if p.seed is not None else seed,
        min_size=p.min_size,
        split=SplitFractions(val=p.val_fraction, test=p.test_fraction),
        dataset_fingerprint=dataset.fingerprint(),
    )
    return partition, path
