"""WarmFed-Sim. The Python API is `sim.run` (see sim/api.py); the command line is `warmfed-sim` / run_sim.py.

`run` is resolved on first use so that importing a floor module (sim.config, sim.data, ...) in a
Ray worker does not import the orchestration stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sim.api import run

__all__ = ["run"]


def __getattr__(name: str) -> Any:
    if name == "run":
        from sim.api import run

        return run
    raise AttributeError(f"module 'sim' has no attribute {name!r}")
