"""Name → algorithm class. Registering a method touches no engine code.

Built-in methods live in `baselines/` and `algorithms/warmfed/`; they register when imported,
and `_load_builtins` imports them the first time anyone asks the registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from sim.typed import ConfigError

if TYPE_CHECKING:
    from algorithms.base import Algorithm

A = TypeVar("A", bound="type[Algorithm]")
_REGISTRY: dict[str, type[Algorithm]] = {}
_BUILTIN_MODULES = ("baselines", "algorithms.warmfed")
_loaded = False


def register(name: str) -> Callable[[A], A]:
    """Class decorator: `@register("fedavg")`."""

    def decorate(cls: A) -> A:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(
                f"algorithm name {name!r} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def algorithm_names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_algorithm(name: str) -> type[Algorithm]:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown algorithm {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


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
