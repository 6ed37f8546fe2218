"""Crash-safe file writes (checkpoints, the server state): a reader never sees half a file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def write_atomic(path: Path, data: bytes | memoryview) -> str:
    """Write `data` under a temporary name, flush it to disk and rename: readers see the old file
    or the whole new one. Returns the data's sha256."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()
