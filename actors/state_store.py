"""Per-client state (personal layers, control variates, LoRA) kept out of the driver.

A state is the algorithm's `ClientState` dataclass (algorithms/base.py), pickled whole by
torch.save; the store itself takes any picklable object.

States are files under the run directory, written by whichever actor trained the client and
read by whichever actor trains or evaluates it next; an in-actor LRU cache saves the reads.
Each write is a new *version* (the round it was made in), and the driver only tracks one small
integer per client, so the cache can never serve a stale state and a resumed run can go back
to the versions its checkpoint names.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from sim.files import replacing


class ClientStateStore:
    def __init__(self, root: str | Path, cache_size: int = 256, cache_bytes: int = 64 << 20) -> None:
        self.root = Path(root)
        self.cache_size = cache_size
        # Bounded in bytes too: with thousands of clients a client rarely comes back to the same actor
        # soon, and 256 states of a larger model (a ResNet's are ~3 MB) would pin ~GBs per actor.
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._sizes: dict[tuple[int, int], int] = {}
        self._held = 0

    def _path(self, client_id: int, version: int) -> Path:
        return self.root / f"{client_id // 1000:04d}" / f"{client_id}_r{version}.pt"

    def load(self, client_id: int, version: int) -> Any | None:
        """The state written at `version` (None when the client has none yet: version < 0)."""
        if version < 0:
            return None
        key = (client_id, version)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        path = self._path(client_id, version)
        if not path.exists():
            raise FileNotFoundError(f"client {client_id} state version {version} is missing: {path}")
        state = torch.load(path, map_location="cpu", weights_only=False)
        self._remember(key, state)
        return state

    def save(self, client_id: int, version: int, state: Any, previous: int) -> None:
        """Write atomically; older versions stay: `previous` (the state this one replaces) drops out
        of the cache, and files go only when no kept checkpoint names them (sim/orchestration/checkpoints.py)."""
        path = self._path(client_id, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp:
            torch.save(state, tmp)
        self._forget((client_id, previous))
        self._remember((client_id, version), state)

    def _forget(self, key: tuple[int, int]) -> None:
        if self._cache.pop(key, None) is not None:
            self._held -= self._sizes.pop(key, 0)

    def _remember(self, key: tuple[int, int], state: Any) -> None:
        self._forget(key)
        self._cache[key] = state
        self._sizes[key] = _nbytes(state)
        self._held += self._sizes[key]
        while self._cache and (len(self._cache) > self.cache_size or self._held > self.cache_bytes):
            self._forget(next(iter(self._cache)))


def _nbytes(state: Any) -> int:
    """Bytes of the tensors and arrays in a (nested) state."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if hasattr(state, "nbytes") and isinstance(state.nbytes, int):
        return int(state.nbytes)
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return sum(_nbytes(getattr(state, f.name)) for f in dataclasses.fields(state))
    if isinstance(state, dict):
        return sum(_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_nbytes(v) for v in state)
    return 0
