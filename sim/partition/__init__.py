"""Non-IID partitions of a dataset over federated clients, content-addressed on disk.

Input is only the label and domain arrays of a dataset (plus its fingerprint); output is a
`Partition` of sample indices per client and split. See `build_partition`, `PartitionStore`
and `describe`. Schemes: iid, dirichlet, shards, quantity, domain, domain-dirichlet.
"""

from sim.partition.base import (
    SPLITS,
    Partition,
    PartitionError,
    SplitFractions,
    register_scheme,
    resolve_params,
    scheme_names,
    scheme_params_cls,
)
from sim.partition.build import build_partition, min_total_per_client, partition_key, split_counts
from sim.partition.schemes import (
    DirichletParams,
    DomainDirichletParams,
    DomainParams,
    IIDParams,
    QuantityParams,
    ShardsParams,
)
from sim.partition.stats import describe, heterogeneity, plot_heatmap
from sim.partition.store import PartitionStore

__all__ = [
    "SPLITS",
    "DirichletParams",
    "DomainDirichletParams",
    "DomainParams",
    "IIDParams",
    "Partition",
    "PartitionError",
    "PartitionStore",
    "QuantityParams",
    "ShardsParams",
    "SplitFractions",
    "build_partition",
    "describe",
    "heterogeneity",
    "min_total_per_client",
    "partition_key",
    "plot_heatmap",
    "register_scheme",
    "resolve_params",
    "scheme_names",
    "scheme_params_cls",
    "split_counts",
]
