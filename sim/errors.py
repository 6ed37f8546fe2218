"""The errors that mean "your input is wrong" (printed as one line), as opposed to bugs (tracebacks)."""

from __future__ import annotations


def _user_errors() -> tuple[type[BaseException], ...]:
    from actors.pool import ClientTaskError
    from sim.cluster import ResourceError
    from sim.data import DatasetError
    from sim.partition import PartitionError
    from sim.typed import ConfigError

    errors: list[type[BaseException]] = [ConfigError, DatasetError, PartitionError, ResourceError, ClientTaskError]
    try:
        from algorithms.warmfed.errors import WARMFED_ERRORS

        errors += list(WARMFED_ERRORS)
    except ImportError:
        pass
    return tuple(errors)


USER_ERRORS = _user_errors()
