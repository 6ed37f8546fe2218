"""Dataset registry and built-in formats; importing this package registers them all."""

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

# Imported for their registration side effect.
from sim.data import cifar10, digits_domains, font_digits, image_folder, parquet  # noqa: F401  isort: skip

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
