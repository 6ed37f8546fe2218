"""SIGINT (Ctrl-C) and SIGTERM (a scheduler, `ray job stop`) end a run cleanly.

The signal abandons the round in flight: checkpoints are written atomically and last (see
sim/orchestration/checkpoints.py), so the newest one on disk is whole and a resume redoes only that round.
The run then shuts down what it started of Ray and the command prints one line saying where it
stopped and how to resume, exiting 128 + the signal number (130, 143).

`ray.init` installs its own SIGTERM handler (and Ray's core worker a crash dump for it), so
`sim.orchestration.cluster.connect` installs these handlers again once Ray is up.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(BaseException):
    """Raised in the main thread by the signal handler; a BaseException so that no `except Exception`
    on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.printed = False

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def line(self) -> str:
        """The one line the command prints: where the run stopped and how to resume it."""
        run_dir, where = status.run_dir, status.where() if status.where else None
        if run_dir is None:
            return f"interrupted ({signal.Signals(self.signum).name}) before the run started; nothing to resume"
        command = status.resume or f"run_sim.py run --resume {run_dir}"
        where = where or "the start of the run"
        return f"interrupted {'after' if where.startswith('round') else 'at'} {where}; resume with: {command}"


class _Status:
    """What the line says, kept current by the runner (the handler may have to print it at once)."""

    run_dir: Path | None = None
    where: Callable[[], str | None] | None = None
    resume: str | None = None  # a sweep's own resume command
    signum: int | None = None  # the signal received, once one has been


status = _Status()
_active = False
_fired = False


def _handler(signum: int, frame: FrameType | None) -> None:
    global _fired
    if _fired:
        os._exit(128 + signum)  # a second signal while cleaning up: the user insists
    _fired = True
    status.signum = signum
    exc = RunInterrupted(signum)
    # Printed now: a SIGTERM sent to the whole process group also stops a Ray started here, and
    # Ray may end this process before the orderly shutdown below gets to print anything.
    print(exc.line(), file=sys.stderr, flush=True)
    exc.printed = True
    raise exc


def install() -> None:
    """(Re)install the handlers if `catch_signals` is active in this process (no-op otherwise)."""
    if _active and threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _handler)


@contextmanager
def catch_signals() -> Iterator[None]:
    """Turn SIGINT/SIGTERM into RunInterrupted inside the block; restores the previous handlers."""
    global _active, _fired
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    _active, _fired = True, False
    status.run_dir = status.where = status.resume = status.signum = None
    install()
    try:
        yield
    finally:
        _active = False
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
