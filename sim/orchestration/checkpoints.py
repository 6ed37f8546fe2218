"""Checkpoints that cannot strand a run.

Per (algorithm, seed), round r is three files: `server_r{r}.pt` (the server actor's state),
`versions_r{r}.npy` (the state-store version of every client) and `meta_r{r}.json`, written
last, holding the sha256 of the other two. Every file is written to a temporary name, flushed
and renamed, so a crash or an interrupt at any point leaves the previous checkpoint whole.
The newest `keep` checkpoints stay on disk; on load each is verified against its digests, and
a torn or corrupt one is set aside (renamed `*.corrupt`) with a one-line notice, falling back
to the previous one.

Per-client state (actors/state_store.py) is versioned by the round that wrote it and nobody
else deletes it: after each checkpoint, a client's states older than the version the oldest
kept checkpoint names are removed. So whichever checkpoint a resume falls back to, every
client state it points at is still there.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sim.files import sha256_file, write_atomic
from sim.typed import ConfigError

FORMAT = 2
_META = re.compile(r"^meta_r(\d+)\.json$")
_STATE = re.compile(r"^(\d+)_r(-?\d+)\.pt$")  # actors/state_store.py: <cid // 1000>/<cid>_r<version>.pt


class CheckpointError(ConfigError):
    """Checkpoints exist but none can be used: a one-line error saying how to restart."""


@dataclass
class Checkpoint:
    round: int
    versions: np.ndarray
    server_path: Path
    done: bool = False


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and all of Windows) cannot sync a directory
    finally:
        os.close(fd)


def _stderr_notice(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class CheckpointStore:
    def __init__(
        self,
        directory: Path,
        keep: int = 2,
        state_dir: Path | None = None,
        notice: Callable[[str], None] = _stderr_notice,
    ) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint_keep must be >= 1, got {keep}")
        self.dir = Path(directory)
        self.keep = keep
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.notice = notice
        self.guard: Callable[[], None] | None = None  # raises when a round must not be checkpointed (a node died)
        self.last_round: int | None = None  # newest round whose checkpoint is on disk (for the interrupt line)
        self._floor: np.ndarray | None = None  # client-state versions the oldest kept checkpoint names

    # ------------------------------------------------------------------------------ writing
    def save(self, round: int, server: Any, versions: np.ndarray, done: bool) -> None:
        import ray

        if self.guard is not None:
            self.guard()
        self.dir.mkdir(parents=True, exist_ok=True)
        server_name, versions_name = f"server_r{round}.pt", f"versions_r{round}.npy"
        saved = server.save.remote(str(self.dir / server_name))
        server_digest = ray.get(saved) if isinstance(saved, ray.ObjectRef) else saved  # a plain worker in tests
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(versions, dtype=np.int64))
        versions_digest = write_atomic(self.dir / versions_name, buffer.getvalue())
        meta = {
            "format": FORMAT,
            "round": round,
            "done": done,
            "sha256": {server_name: server_digest, versions_name: versions_digest},
        }
        write_atomic(self.dir / f"meta_r{round}.json", json.dumps(meta, indent=1).encode())
        _fsync_dir(self.dir)
        self.last_round = round
        self._prune(round)

    def _rounds(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _META.match(p.name)))

    def _prune(self, newest: int) -> None:
        """Keep the newest `keep` checkpoints; then drop client states none of them can need."""
        rounds = [r for r in self._rounds() if r <= newest]
        kept = rounds[-self.keep :]
        (self.dir / "meta.json").unlink(missing_ok=True)  # a checkpoint of the older format, now superseded
        for r in rounds[: -self.keep]:
            (self.dir / f"meta_r{r}.json").unlink(missing_ok=True)  # first: a half-pruned checkpoint is never offered
        for path in self.dir.iterdir():
            file_round = _file_round(path.name)
            if file_round is not None and file_round <= newest and (file_round not in kept or ".tmp" in path.name):
                path.unlink(missing_ok=True)  # pruned checkpoints, and files of writes that never finished
        if self.state_dir is None or not kept:
            return
        floor = np.load(self.dir / f"versions_r{kept[0]}.npy")
        previous, self._floor = self._floor, floor
        if previous is not None and len(previous) == len(floor):
            changed = np.flatnonzero(previous != floor)
            if len(changed):
                self._drop_states(floor, clients=set(changed.tolist()))

    def _drop_states(self, floor: np.ndarray, clients: set[int] | None = None, newer_than: int | None = None) -> None:
        """Remove client states below `floor[client]` (or above `newer_than`: rounds a resume redoes),
        and temporary files of writes that never finished. `clients`: only these (None: all)."""
        root = self.state_dir
        if root is None or not root.is_dir():
            return
        subdirs = {f"{c // 1000:04d}" for c in clients} if clients is not None else None
        for sub in os.scandir(root):
            if not sub.is_dir() or (subdirs is not None and sub.name not in subdirs):
                continue
            for entry in os.scandir(sub.path):
                m = _STATE.match(entry.name)
                if m is None:
                    if ".tmp" in entry.name and clients is None:
                        os.unlink(entry.path)
                    continue
                cid, version = int(m.group(1)), int(m.group(2))
                if cid >= len(floor) or (clients is not None and cid not in clients):
                    continue
                if version < floor[cid] or (newer_than is not None and version > newer_than):
                    os.unlink(entry.path)

    # ------------------------------------------------------------------------------ reading
    def load(self) -> tuple[Checkpoint, bool] | None:
        """The newest checkpoint that verifies (with its `done` flag); None when there is none at all.

        Each one skipped is renamed `*.corrupt` with a notice naming it; if some existed but
        none verifies, CheckpointError says how to restart."""
        rounds = self._rounds()
        if not rounds:
            return self._load_legacy()
        problems: list[str] = []
        for r in reversed(rounds):
            checkpoint, problem = self._verify(r)
            if checkpoint is None:
                problems.append(problem)
                self._set_aside(r)
                continue
            if problems:
                self.notice(f"notice: {'; '.join(problems)}; resuming from round {r} ({checkpoint.server_path})")
            self.last_round = r
            self._restore_states(checkpoint)
            return checkpoint, checkpoint.done
        raise CheckpointError(
            f"no usable checkpoint in {self.dir} ({'; '.join(problems)}); to restart this algorithm and seed "
            f"from round 0, remove {self.dir} and resume again"
        )

    def _verify(self, r: int) -> tuple[Checkpoint | None, str]:
        meta_path = self.dir / f"meta_r{r}.json"
        try:
            meta = json.loads(meta_path.read_text())
            digests = dict(meta["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            return None, f"checkpoint {meta_path} is unreadable"
        for name, expected in digests.items():
            path = self.dir / name
            if not path.is_file():
                return None, f"checkpoint file {path} is missing"
            if sha256_file(path) != expected:
                return None, f"checkpoint file {path} is corrupt (checksum mismatch)"
        versions = np.load(self.dir / f"versions_r{r}.npy")
        return Checkpoint(r, versions, self.dir / f"server_r{r}.pt", bool(meta.get("done", False))), ""

    def _set_aside(self, r: int) -> None:
        """Keep a bad checkpoint's files for inspection under `*.corrupt`; never offer it again."""
        for name in (f"meta_r{r}.json", f"server_r{r}.pt", f"versions_r{r}.npy"):
            path = self.dir / name
            if path.exists():
                os.replace(path, path.with_name(path.name + ".corrupt"))

    def _restore_states(self, checkpoint: Checkpoint) -> None:
        """States from rounds after the checkpoint are redone by the resumed run: drop them, with
        anything older than every kept checkpoint needs."""
        rounds = [r for r in self._rounds() if r <= checkpoint.round][-self.keep :]
        floor = np.load(self.dir / f"versions_r{rounds[0]}.npy") if rounds else checkpoint.versions
        self._floor = floor
        self._drop_states(floor, newer_than=checkpoint.round)

    def _load_legacy(self) -> tuple[Checkpoint, bool] | None:
        """A run directory written before checkpoints carried checksums: one `meta.json`."""
        meta = self.dir / "meta.json"
        if not meta.exists():
            return None
        info = json.loads(meta.read_text())
        r = int(info["round"])
        self.last_round = r
        checkpoint = Checkpoint(
            r, np.load(self.dir / f"versions_r{r}.npy"), self.dir / f"server_r{r}.pt", bool(info["done"])
        )
        return checkpoint, checkpoint.done


def _file_round(name: str) -> int | None:
    """The round of a checkpoint file (`server_r3.pt`, `versions_r3.npy`, `meta_r3.json`, or a temporary of one)."""
    m = re.match(r"^(?:server|versions|meta)_r(\d+)\.(?:pt|npy|json)(?:\.tmp\d+)?$", name)
    return int(m.group(1)) if m else None
