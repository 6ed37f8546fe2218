"""One small interface for the cross-cutting work around a run: experiment trackers, traces,
fault injection. The engine calls the hooks; it knows nothing of what they do.

Two ways in, both as `module:attribute` paths to a `Callback` subclass (or any zero-argument
factory returning one):

- `callbacks: [...]` in the config: part of the run (a tracker logging every round); a resumed
  run gets them again from its stored config.
- the `WARMFED_SIM_CALLBACKS` environment variable (comma-separated): instrumentation of this
  process only (a test's crash after round k, a benchmark's timestamps), which a resumed run
  must not inherit, so it never enters the config.

Hooks run on the driver, in order, after the engine has written the round's rows and
checkpoint: a callback that raises (or exits) leaves a run that resumes from that round. The
built-in `JsonlLogger` is an example and a tracker without extra dependencies.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.results import Row
from sim.typed import ConfigError

CALLBACKS_ENV = "WARMFED_SIM_CALLBACKS"


@dataclass(frozen=True)
class RunInfo:
    """Which (algorithm, seed) run a hook is about, and where it writes."""

    algorithm: str
    seed: int
    rounds: int
    run_dir: Path


@dataclass(frozen=True)
class RoundEnd:
    """A finished round: its rows as written (client_id, split, metric, value; client -1 is the
    run level) and whether a checkpoint of it exists."""

    run: RunInfo
    round: int
    rows: list[Row]
    checkpointed: bool

    @property
    def last(self) -> bool:
        return self.round == self.run.rounds

    def run_metrics(self) -> dict[str, float]:
        """The run-level rows (wall_s, bytes_up, ...) as a dict."""
        return {name: value for client, _, name, value in self.rows if client == -1}


class Callback:
    """Override the hooks you need; each is called on the driver."""

    def on_run_start(self, run: RunInfo, start_round: int) -> None:
        """Before round `start_round` (0 for a fresh run, k + 1 when resuming after round k)."""

    def on_round_start(self, run: RunInfo, round: int) -> None:
        """Before the round's clients are dispatched (round 0: before the setup phases)."""

    def on_round_end(self, event: RoundEnd) -> None:
        """After the round's rows and checkpoint are written."""

    def on_run_end(self, run: RunInfo) -> None:
        """After the last round."""


class Callbacks(Callback):
    """Several callbacks as one: each hook calls theirs in order (what the engine holds)."""

    def __init__(self, callbacks: Sequence[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_run_start(self, run: RunInfo, start_round: int) -> None:
        for callback in self.callbacks:
            callback.on_run_start(run, start_round)

    def on_round_start(self, run: RunInfo, round: int) -> None:
        for callback in self.callbacks:
            callback.on_round_start(run, round)

    def on_round_end(self, event: RoundEnd) -> None:
        for callback in self.callbacks:
            callback.on_round_end(event)

    def on_run_end(self, run: RunInfo) -> None:
        for callback in self.callbacks:
            callback.on_run_end(run)


class JsonlLogger(Callback):
    """Appends one JSON line per round to `<run_dir>/rounds.jsonl`: algorithm, seed, round and the
    round's run-level metrics, plus the size-weighted test mean of every per-client metric."""

    def on_round_end(self, event: RoundEnd) -> None:
        sizes = {c: v for c, s, n, v in event.rows if s == "test" and n == "n"}
        sums: dict[str, list[float]] = {}
        for client, split, name, value in event.rows:
            if split == "test" and client != -1 and name != "n" and not math.isnan(value):
                total = sums.setdefault(name, [0.0, 0.0])
                weight = sizes.get(client, 1.0)
                total[0] += weight * value
                total[1] += weight
        line = {
            "algorithm": event.run.algorithm,
            "seed": event.run.seed,
            "round": event.round,
            **event.run_metrics(),
            **{f"test/{name}": s / w for name, (s, w) in sums.items() if w > 0},
        }
        with open(event.run.run_dir / "rounds.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


def load_callback(spec: str, where: str) -> Callback:
    """`module:attribute` -> an instance; ConfigError naming `where` if it is not one."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{where}: {spec!r} is not a `module:attribute` path")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{where}: cannot import {module_name!r} ({e})") from e
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{where}: {module_name!r} has no {attr!r}")
        target = getattr(target, part)
    callback = target() if callable(target) else target
    if not isinstance(callback, Callback):
        raise ConfigError(f"{where}: {spec!r} gives a {type(callback).__name__}, not a Callback")
    return callback


def load_callbacks(specs: Sequence[str]) -> list[Callback]:
    """The config's callbacks, then this process's (CALLBACKS_ENV)."""
    out = [load_callback(s, "callbacks") for s in specs]
    env = os.environ.get(CALLBACKS_ENV, "")
    out += [load_callback(s.strip(), CALLBACKS_ENV) for s in env.split(",") if s.strip()]
    return out
