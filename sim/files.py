"""Crash-safe file writes: a reader (or a resumed run) sees the old file or the whole new one, never half.

Every write-to-temp-then-rename in the simulator goes through `replacing`; the temporary name
is `<name>.tmp<pid>`, which the checkpoint pruning recognises as debris of an interrupted write.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def replacing(path: Path, *, fsync: bool = False) -> Iterator[Path]:
    """A temporary path next to `path` to write; renamed over `path` when the block succeeds,
    removed when it fails. `fsync`: flush the file to disk first (checkpoints must survive a crash)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes | memoryview) -> str:
    """Write `data` durably (fsync before the rename); returns its sha256 for a checkpoint's meta."""
    with replacing(path, fsync=True) as tmp:
        tmp.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def write_text(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: Any) -> None:
    """Indented JSON; values JSON cannot hold (paths, dates) are written as their str()."""
    write_text(path, json.dumps(data, indent=2, default=str))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checkpoints and partitions verify with it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
