"""The in-memory dataset every format produces, and the one error type for bad data input.

Every format ends in the same `ArrayDataset` so partitioners, models and actors never care
where the pixels came from; one float32 NCHW array in [-1, 1] is also what Ray's object
store shares zero-copy between actors.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sim.errors import UserError


class DatasetError(UserError, ValueError):
    """Bad dataset input; the message names the problem, the path, and the expected layout or allowed values."""


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Images, labels and domain ids of one dataset, plus an optional public (server-side) part.

    The arrays are made read-only on construction: built datasets are cached per process and
    shared through Ray's object store (which hands out read-only arrays anyway), so an
    accidental in-place edit must fail loudly here rather than corrupt every later user.
    `eq=False`: comparing arrays element-wise in `__eq__` is ambiguous; compare fingerprints.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    domains: np.ndarray
    class_names: tuple[str, ...]
    domain_names: tuple[str, ...]
    public: ArrayDataset | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "domain_names", tuple(str(d) for d in self.domain_names))
        self._validate()
        for arr in (self.images, self.labels, self.domains):
            arr.setflags(write=False)

    @property
    def nbytes(self) -> int:
        """Bytes of all arrays, the public part included."""
        own = self.images.nbytes + self.labels.nbytes + self.domains.nbytes
        return own + (self.public.nbytes if self.public is not None else 0)

    def _validate(self) -> None:
        where = f"dataset {self.name!r}"
        img, lab, dom = self.images, self.labels, self.domains
        if not isinstance(img, np.ndarray) or img.dtype != np.float32 or img.ndim != 4:
            raise DatasetError(f"{where}: images must be a float32 array of shape (N, C, H, W)")
        if not img.flags.c_contiguous:
            raise DatasetError(f"{where}: images must be C-contiguous")
        n = img.shape[0]
        for key, arr in (("labels", lab), ("domains", dom)):
            if not isinstance(arr, np.ndarray) or arr.dtype != np.int64 or arr.shape != (n,):
                raise DatasetError(f"{where}: {key} must be an int64 array of shape ({n},)")
        if not self.class_names or not self.domain_names:
            raise DatasetError(f"{where}: class_names and domain_names must not be empty")
        if n and (lab.min() < 0 or lab.max() >= len(self.class_names)):
            raise DatasetError(f"{where}: labels must index class_names (0..{len(self.class_names) - 1})")
        if n and (dom.min() < 0 or dom.max() >= len(self.domain_names)):
            raise DatasetError(f"{where}: domains must index domain_names (0..{len(self.domain_names) - 1})")
        if img.size and (img.min() < -1.0 or img.max() > 1.0):
            raise DatasetError(f"{where}: image values must lie in [-1, 1]")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def fingerprint(self) -> str:
        """Content hash, so partitions and caches keyed on it follow the data, not the params that made it.

        Hashing a large set (CIFAR-10 is ~740 MB of float32) takes a second, so the result is
        memoised on the instance (object.__setattr__: the dataclass is frozen, the arrays read-only).
        """
        cached = self.__dict__.get("_fingerprint")
        if cached is not None:
            return cached
        h = hashlib.sha256()
        meta = {
            "name": self.name,
            "class_names": list(self.class_names),
            "domain_names": list(self.domain_names),
            "shape": list(self.images.shape),
        }
        h.update(json.dumps(meta, sort_keys=True).encode())
        for arr in (self.images, self.labels, self.domains):
            h.update(np.ascontiguousarray(arr).data)
        h.update((self.public.fingerprint() if self.public is not None else "-").encode())
        digest = h.hexdigest()[:16]
        object.__setattr__(self, "_fingerprint", digest)
        return digest

    def __repr__(self) -> str:
        pub = f", public={len(self.public)}" if self.public is not None else ""
        return (
            f"ArrayDataset({self.name!r}, n={len(self)}, image_shape={self.image_shape}, "
            f"classes={self.num_classes}, domains={list(self.domain_names)}{pub})"
        )


def require_path(path: str | None, dataset: str, layout: str, *, directory: bool = True) -> Path:
    """The dataset's root as a Path, or a DatasetError saying what is missing and the layout expected."""
    if path is None:
        raise DatasetError(f"data.path is required for dataset {dataset!r} ({layout})")
    root = Path(path).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset path does not exist: {root}")
    if directory and not root.is_dir():
        raise DatasetError(f"dataset path is not a directory: {root} ({layout})")
    return root
