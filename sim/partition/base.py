"""Core types of the partition module: the error, split fractions, the Partition and the scheme registry.

A partition is stored as flat index arrays plus offsets (CSR layout) rather than a list of
per-client arrays: at 10,000 clients that is three arrays instead of 30,000 small objects,
and it round-trips through Parquet without a Python loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np

from sim.errors import UserError

SPLITS: tuple[str, ...] = ("train", "val", "test")


class PartitionError(UserError, ValueError):
    """Bad input, an impossible request, or a corrupt/mismatched file; the message names the culprit."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class SplitFractions:
    """Per-client fractions held out for validation and test; the remainder is train.

    Test must be > 0 because every client is evaluated on its own test split (personalized
    accuracy); validation may be 0.
    """

    val: float = 0.1
    test: float = 0.2

    def __post_init__(self) -> None:
        for name in ("val", "test"):
            value = getattr(self, name)
            if not _is_number(value):
                raise PartitionError(f"split.{name}: expected a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not (self.val >= 0.0):
            raise PartitionError(f"split.val must be >= 0, got {self.val}")
        if not (self.test > 0.0):
            raise PartitionError(f"split.test must be > 0 (every client needs a test split), got {self.test}")
        if not (self.val + self.test < 1.0):
            raise PartitionError(
                f"split.val + split.test must be < 1 (train needs the remainder), got {self.val} + {self.test}"
            )

    @classmethod
    def coerce(cls, value: SplitFractions | Mapping[str, Any] | None) -> SplitFractions:
        """Accept the dataclass, a {'val':..,'test':..} mapping (config / manifest) or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"val", "test"})
            if unknown:
                raise PartitionError(f"split: unknown key {unknown[0]!r}; allowed keys: test, val")
            return cls(**dict(value))
        raise PartitionError(f"split: expected SplitFractions or a mapping with val/test, got {value!r}")


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class Partition:
    """Which sample indices each client holds, per split.

    `indices[split]` is every client's indices concatenated in client order (ascending sample
    index within a client); client j owns `indices[split][offsets[split][j]:offsets[split][j+1]]`.
    `client_domain[j]` is the domain holding a strict majority of client j's samples, or -1.
    `meta` is the canonical build specification (scheme, params, seed, ...), informational.
    """

    num_clients: int
    indices: Mapping[str, np.ndarray]
    offsets: Mapping[str, np.ndarray]
    client_domain: np.ndarray
    key: str
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [s for s in SPLITS if s not in self.indices or s not in self.offsets]
        if missing:
            raise PartitionError(f"Partition: missing split(s) {missing}; expected {list(SPLITS)}")
        idx = {s: _readonly(self.indices[s]) for s in SPLITS}
        off = {s: _readonly(self.offsets[s]) for s in SPLITS}
        for s in SPLITS:
            if off[s].shape != (self.num_clients + 1,) or off[s][0] != 0 or off[s][-1] != idx[s].size:
                raise PartitionError(f"Partition: offsets of split {s!r} inconsistent with {self.num_clients} clients")
        object.__setattr__(self, "indices", MappingProxyType(idx))
        object.__setattr__(self, "offsets", MappingProxyType(off))
        object.__setattr__(self, "client_domain", _readonly(self.client_domain))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise PartitionError(f"split: unknown split {split!r}; allowed: {', '.join(SPLITS)}")

    def client_indices(self, client_id: int, split: str = "train") -> np.ndarray:
        """Sample indices of one client (a read-only view, no copy)."""
        self._check_split(split)
        if not (0 <= int(client_id) < self.num_clients):
            raise PartitionError(f"client_id: {client_id} out of range [0, {self.num_clients})")
        off = self.offsets[split]
        return self.indices[split][off[client_id] : off[client_id + 1]]

    def sizes(self, split: str = "train") -> np.ndarray:
        """Samples per client in `split`, shape (num_clients,)."""
        self._check_split(split)
        return np.diff(self.offsets[split])

    def client_ids(self, split: str = "train") -> np.ndarray:
        """Owner client of every entry of `indices[split]` (vectorized helper for statistics)."""
        return np.repeat(np.arange(self.num_clients, dtype=np.int64), self.sizes(split))

    def label_counts(self, labels: np.ndarray, num_classes: int, split: str = "train") -> np.ndarray:
        """Per-client class histogram, shape (num_clients, num_classes), int64."""
        self._check_split(split)
        labels = np.asarray(labels)
        idx = self.indices[split]
        if idx.size and int(idx.max()) >= labels.shape[0]:
            raise PartitionError(
                f"labels: has {labels.shape[0]} entries but the partition indexes up to {int(idx.max())}"
            )
        flat = self.client_ids(split) * num_classes + labels[idx].astype(np.int64)
        return np.bincount(flat, minlength=self.num_clients * num_classes).reshape(self.num_clients, num_classes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Partition):
            return NotImplemented
        return (
            self.num_clients == other.num_clients
            and self.key == other.key
            and dict(self.meta) == dict(other.meta)
            and np.array_equal(self.client_domain, other.client_domain)
            and all(np.array_equal(self.indices[s], other.indices[s]) for s in SPLITS)
            and all(np.array_equal(self.offsets[s], other.offsets[s]) for s in SPLITS)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable-looking arrays inside: not hashable

    def __reduce__(self) -> tuple[Any, ...]:
        # mappingproxy cannot be pickled; Ray ships partitions to actors by pickling
        return (
            Partition,
            (self.num_clients, dict(self.indices), dict(self.offsets), self.client_domain, self.key, dict(self.meta)),
        )


# ----------------------------------------------------------------------------- scheme registry


@dataclass(frozen=True)
class SchemeInput:
    """What a scheme sees: the label/domain arrays and the size every client must reach.

    `min_total` already includes the held-out val/test samples, so a scheme only has to
    guarantee `min_total` samples per client and never needs to know about splits.
    """

    labels: np.ndarray
    domains: np.ndarray
    num_classes: int
    num_domains: int
    num_clients: int
    min_total: int
    min_size: int  # the train minimum, only for error messages


class Scheme(Protocol):
    """A partition scheme: returns the owner client of every sample (-1 = unused)."""

    def assign(self, data: SchemeInput, params: Any, rng: np.random.Generator) -> np.ndarray: ...


@dataclass(frozen=True)
class _Entry:
    name: str
    params_cls: type
    scheme: Scheme


_SCHEMES: dict[str, _Entry] = {}


def register_scheme(name: str, params_cls: type) -> Callable[[type], type]:
    """Class decorator: register a scheme class (instantiated without arguments) under `name`."""
    if not dataclasses.is_dataclass(params_cls):
        raise TypeError(f"register_scheme({name!r}): params_cls must be a dataclass")

    def deco(cls: type) -> type:
        if name in _SCHEMES:
            raise ValueError(f"partition scheme {name!r} registered twice")
        _SCHEMES[name] = _Entry(name, params_cls, cls())
        cls.name = name  # type: ignore[attr-defined]
        cls.Params = params_cls  # type: ignore[attr-defined]
        return cls

    return deco


def _ensure_builtin() -> None:
    # Schemes register themselves when imported: any module of sim/partition/ may define one.
    from sim.plugins import scan

    scan("sim.partition")


def scheme_names() -> list[str]:
    _ensure_builtin()
    return sorted(_SCHEMES)


def _entry(name: str) -> _Entry:
    _ensure_builtin()
    if not isinstance(name, str) or name not in _SCHEMES:
        raise PartitionError(f"scheme: unknown partition scheme {name!r}; registered: {', '.join(sorted(_SCHEMES))}")
    return _SCHEMES[name]


def scheme_params_cls(name: str) -> type:
    return _entry(name).params_cls


def get_scheme(name: str) -> Scheme:
    return _entry(name).scheme


def resolve_params(scheme: str, params: Mapping[str, Any] | Any | None) -> Any:
    """Turn None / a mapping / a params dataclass into the scheme's validated params dataclass.

    Mapping values are type-checked strictly (sim.typed), so `alpha: "0.1"` or a misspelt key
    is an error rather than a silent default.
    """
    from sim.typed import ConfigError, from_mapping

    cls = scheme_params_cls(scheme)
    if params is None:
        params = {}
    if isinstance(params, cls):
        return params
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        raise PartitionError(f"params: scheme {scheme!r} expects {cls.__name__}, got {type(params).__name__}")
    if not isinstance(params, Mapping):
        raise PartitionError(f"params: expected a mapping or {cls.__name__} for scheme {scheme!r}, got {params!r}")
    try:
        return from_mapping(cls, params, prefix=f"partition.{scheme}")
    except PartitionError:
        raise
    except (ConfigError, TypeError, ValueError) as exc:
        raise PartitionError(str(exc)) from exc
