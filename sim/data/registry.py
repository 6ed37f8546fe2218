"""Name → (params dataclass, builder) registry, with an in-process cache of built datasets.

Formats register themselves on import (`sim/data/__init__.py` imports them all), so config
validation can list names and check `data.*` keys against each format's params dataclass
before anything is loaded.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from sim.data.base import ArrayDataset, DatasetError
from sim.memory import release_free_heap
from sim.plugins import scan
from sim.typed import ConfigError, from_mapping

Builder = Callable[[Any], ArrayDataset]

_REGISTRY: dict[str, tuple[type, Builder]] = {}

# Datasets can be large (CIFAR-10 is ~740 MB as float32), so keep only a few; the usual hit is
# the same dataset requested by several steps of one run or by several runs of a comparison.
_CACHE_SIZE = 4
_cache: OrderedDict[tuple[str, Any], ArrayDataset] = OrderedDict()
_cache_lock = threading.Lock()


def register_dataset(name: str, params_cls: type) -> Callable[[Builder], Builder]:
    """Decorator: register `fn(params) -> ArrayDataset` under `name` with its frozen params dataclass."""
    dataclass_params = getattr(params_cls, "__dataclass_params__", None)  # set on every dataclass
    if dataclass_params is None or not dataclass_params.frozen:
        raise TypeError(f"register_dataset({name!r}): params_cls must be a frozen dataclass")

    def decorate(fn: Builder) -> Builder:
        old = _REGISTRY.get(name)
        # Re-registering the same function (a module reload) is harmless; a second format claiming the name is a bug.
        if old is not None and (old[1].__module__, old[1].__qualname__) != (fn.__module__, fn.__qualname__):
            raise DatasetError(f"dataset name {name!r} is already registered by {old[1].__module__}")
        _REGISTRY[name] = (params_cls, fn)
        return fn

    return decorate


def dataset_names() -> list[str]:
    scan("sim.data")
    return sorted(_REGISTRY)


def _entry(name: str) -> tuple[type, Builder]:
    scan("sim.data")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r}; registered datasets: {', '.join(dataset_names())}") from None


def dataset_params_cls(name: str) -> type:
    return _entry(name)[0]


def make_params(name: str, params: Mapping[str, Any] | Any | None = None) -> Any:
    """Typed params for dataset `name` from a mapping (as in `data:` of a config), an instance, or None (defaults)."""
    params_cls = dataset_params_cls(name)
    if params is None:
        return params_cls()
    if isinstance(params, params_cls):
        return params
    if isinstance(params, Mapping):
        try:
            return from_mapping(params_cls, params, prefix="data")
        except ConfigError as exc:
            if isinstance(exc.__cause__, DatasetError):  # the params' own check, already worded for the user
                raise exc.__cause__ from None
            raise DatasetError(f"dataset {name!r}: {exc}") from exc
    raise DatasetError(
        f"dataset {name!r}: params must be a mapping or a {params_cls.__name__}, got {type(params).__name__}"
    )


def load_dataset(name: str, params: Mapping[str, Any] | Any | None = None, *, cache: bool = True) -> ArrayDataset:
    """Build (or fetch from the in-process cache) dataset `name`.

    The cache is keyed by (name, params); a file-based dataset edited on disk during the
    process is not noticed — pass cache=False or call `clear_dataset_cache()` in that case.
    """
    builder = _entry(name)[1]
    typed = make_params(name, params)
    try:
        key: tuple[str, Any] | None = (name, typed)
        hash(key)
    except TypeError:  # a params field holding a list or dict: build without caching
        key = None
    if cache and key is not None:
        with _cache_lock:
            if key in _cache:
                _cache.move_to_end(key)
                return _cache[key]
    ds = builder(typed)
    if not isinstance(ds, ArrayDataset):
        raise TypeError(f"dataset builder for {name!r} returned {type(ds).__name__}, not ArrayDataset")
    release_free_heap()  # the builder's temporaries would otherwise stay resident for the whole run
    if cache and key is not None:
        with _cache_lock:
            _cache[key] = ds
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    return ds


def forget_dataset(dataset: ArrayDataset) -> None:
    """Drop `dataset` from the in-process cache (a caller that keeps one copy elsewhere, such as
    Ray's object store, frees this one)."""
    with _cache_lock:
        for key in [k for k, v in _cache.items() if v is dataset]:
            del _cache[key]


def clear_dataset_cache() -> None:
    with _cache_lock:
        _cache.clear()
