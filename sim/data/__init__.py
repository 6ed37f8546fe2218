"""Dataset registry; each format is a module of this package, found by the registry's scan (sim/plugins.py)."""

from sim.data.base import ArrayDataset, DatasetError
from sim.data.registry import (
    clear_dataset_cache,
    dataset_names,
    dataset_params_cls,
    forget_dataset,
    load_dataset,
    make_params,
    register_dataset,
)

__all__ = [
    "ArrayDataset",
    "DatasetError",
    "clear_dataset_cache",
    "dataset_names",
    "dataset_params_cls",
    "forget_dataset",
    "load_dataset",
    "make_params",
    "register_dataset",
]
