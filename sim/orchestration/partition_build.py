"""From the run config to a stored partition: the glue between `partition.*` keys and the store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sim.config import RunConfig, partition_params
from sim.partition import PartitionStore, SplitFractions
from sim.typed import to_mapping


def scheme_params(cfg: RunConfig) -> dict[str, Any]:
    """Every field of the scheme's params, sorted: the partition's hash does not depend on how the config spelt them."""
    return dict(sorted(to_mapping(partition_params(cfg.partition)).items()))


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
