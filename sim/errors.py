"""The errors that mean "your input is wrong" (printed as one line), as opposed to bugs (tracebacks).

Every such error derives from UserError, wherever it is raised (config, data, partitions, cluster,
a plug-in), so the CLI catches the one base class and needs no list of them.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the key, file or value and what is allowed; no traceback."""


class ConfigError(UserError, ValueError):
    """A config value is missing, unknown, or of the wrong type; the message names the key."""


class ResourceError(UserError, RuntimeError):
    """The cluster cannot host the requested client actors."""
