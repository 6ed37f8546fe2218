"""Name -> algorithm class, the face of the floor's registry (sim/plugins.py) that methods use.

A method registers with `@register("name")`; it is found because its module sits in a scanned
package (`baselines/`, `algorithms/`), so registering touches no list and no engine code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from sim import plugins
from sim.plugins import algorithm_names, expand_algorithms

if TYPE_CHECKING:
    from algorithms.base import Algorithm

__all__ = ["algorithm_names", "expand_algorithms", "get_algorithm", "register"]

A = TypeVar("A", bound="type[Algorithm]")


def register(name: str) -> Callable[[A], A]:
    """Class decorator: `@register("fedavg")`."""
    return plugins.register_algorithm(name)


def get_algorithm(name: str) -> type[Algorithm]:
    return plugins.get_algorithm(name)
