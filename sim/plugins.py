"""Extension discovery: a plug-in is a module in one of the scanned packages, found without an import list.

A new baseline is a file in `baselines/`, a new dataset a file in `sim/data/`, a new partition
scheme a file in `sim/partition/`; the module registers itself with the decorator of its kind
(`algorithms.registry.register`, `sim.data.register_dataset`, `sim.partition.register_scheme`)
when the scan imports it. Other installed packages plug in the same way by being named in
WARMFED_SIM_PLUGINS (comma-separated package names, scanned for every kind).

The algorithm name registry lives here, on the floor, so the config schema can check
`algorithms` / `algo.<name>.*` without importing the algorithm API; the API's
`algorithms.registry` is the face plug-ins use.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sim.errors import ConfigError

PLUGINS_ENV = "WARMFED_SIM_PLUGINS"
ALGORITHM_PACKAGES = ("baselines", "algorithms")

C = TypeVar("C", bound=type)
_ALGORITHMS: dict[str, type[Any]] = {}


def scan(*packages: str) -> None:
    """Import every module directly inside each package (and the WARMFED_SIM_PLUGINS ones), so
    their registration decorators run. Cheap when repeated: imported modules are cached."""
    extra = [p.strip() for p in os.environ.get(PLUGINS_ENV, "").split(",") if p.strip()]
    for name in [*packages, *extra]:
        package = importlib.import_module(name)
        for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
            if not info.name.startswith("_"):
                importlib.import_module(f"{name}.{info.name}")


def register_algorithm(name: str) -> Callable[[C], C]:
    """Class decorator: `@register("fedavg")` (re-exported by algorithms.registry)."""

    def decorate(cls: C) -> C:
        old = _ALGORITHMS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"algorithm name {name!r} is registered twice ({old.__name__}, {cls.__name__})")
        cls.name = name  # type: ignore[attr-defined]
        _ALGORITHMS[name] = cls
        return cls

    return decorate


def algorithm_names() -> list[str]:
    scan(*ALGORITHM_PACKAGES)
    return sorted(_ALGORITHMS)


def get_algorithm(name: str) -> type[Any]:
    scan(*ALGORITHM_PACKAGES)
    try:
        return _ALGORITHMS[name]
    except KeyError:
        raise ConfigError(f"unknown algorithm {name!r}; registered: {', '.join(sorted(_ALGORITHMS))}") from None


def expand_algorithms(names: Sequence[str]) -> list[str]:
    """Resolve `all` to every registered algorithm and check each name."""
    out: list[str] = []
    for name in names:
        chosen = algorithm_names() if name == "all" else [name]
        for n in chosen:
            get_algorithm(n)
            if n not in out:
                out.append(n)
    return out
