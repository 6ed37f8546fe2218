"""`cifar10`: the CIFAR-10 "python version" batches from local disk (never downloaded here).

All batches are pooled into one set: train/test splits are made per client by the
partitioner, so the official test batch is just more data unless excluded.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sim.data.assemble import make_dataset
from sim.data.base import ArrayDataset, DatasetError, require_path
from sim.data.images import resize_nchw, uint8_to_float
from sim.data.registry import register_dataset

NAME = "cifar10"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
LAYOUT = (
    "expected the extracted cifar-10-batches-py directory with data_batch_1..data_batch_5, test_batch and batches.meta"
)


@dataclass(frozen=True)
class Cifar10Params:
    path: str | None = None
    image_size: int = 32
    include_test_batch: bool = True
    max_samples: int | None = None

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise DatasetError(f"data.image_size must be >= 1, got {self.image_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise DatasetError(f"data.max_samples must be >= 1 or null, got {self.max_samples}")


def _unpickle(path: Path, keys: tuple[bytes, ...]) -> dict:
    """Load one batch file. These are pickles: only point `data.path` at files you trust."""
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as exc:  # pickle raises many types on a damaged file
        raise DatasetError(f"cannot read CIFAR-10 file {path}: {exc}") from exc
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        have = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DatasetError(f"CIFAR-10 file {path} lacks keys {[k.decode() for k in keys]}; has {have}")
    return obj


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path, (b"data", b"labels"))
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise DatasetError(
            f"CIFAR-10 file {path}: expected data of shape (n, 3072) and n labels, "
            f"got data {data.shape} and {labels.shape[0]} labels"
        )
    # Rows are channel-major (1024 red, 1024 green, 1024 blue; each row-major), i.e. already CHW.
    return data.reshape(-1, 3, 32, 32), labels


@register_dataset(NAME, Cifar10Params)
def build_cifar10(p: Cifar10Params) -> ArrayDataset:
    root = require_path(p.path, NAME, LAYOUT)
    wanted = list(TRAIN_FILES) + ([TEST_FILE] if p.include_test_batch else []) + [META_FILE]
    missing = [f for f in wanted if not (root / f).is_file()]
    if missing:
        raise DatasetError(f"CIFAR-10 files missing in {root}: {', '.join(missing)}; {LAYOUT}")

    class_names = tuple(
        n.decode() if isinstance(n, bytes) else str(n)
        for n in _unpickle(root / META_FILE, (b"label_names",))[b"label_names"]
    )
    chunks, label_chunks, total = [], [], 0
    for fname in wanted[:-1]:
        if p.max_samples is not None and total >= p.max_samples:
            break  # the batches are already shuffled, so the first n samples are a fair subset
        data, labels = _read_batch(root / fname)
        if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise DatasetError(f"CIFAR-10 file {root / fname}: labels outside 0..{len(class_names) - 1}")
        chunks.append(data)
        label_chunks.append(labels)
        total += labels.size
    data = np.concatenate(chunks)[: p.max_samples]
    labels = np.concatenate(label_chunks)[: p.max_samples]
    images = resize_nchw(uint8_to_float(data), p.image_size)
    return make_dataset(NAME, images, labels, class_names, None, None, str(root))
