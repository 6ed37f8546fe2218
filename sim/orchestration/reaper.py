"""Take down the agents of a private local Ray when the driver that started it dies abruptly.

Ray ties its GCS, raylet and workers to the driver's life, but the raylet's two agents
(dashboard agent, runtime-env agent) notice a killed raylet only to report it to the GCS
that died with it -- a call Ray gives 60 s -- so after a ``kill -9``'d driver they linger a
minute, holding ports and memory (issue 14). The reaper is a small stdlib + psutil process
started beside the private Ray: it keeps a list of the raylet's children while the driver
lives, and when the pipe from the driver closes (however the driver ended) it gives them a
moment to leave on their own, then kills what remains. It never touches a cluster this run
merely attached to.

    python -m sim.orchestration.reaper RAYLET_PID   (stdin: a pipe whose write end the driver holds)
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time

import psutil

__all__ = ["start_reaper", "main"]

_REFRESH_S = 1.0  # how often the raylet's children are listed while the driver lives
_GRACE_S = 2.0  # after the driver is gone: time for the agents to exit by themselves


def start_reaper(raylet_pid: int) -> subprocess.Popen:
    """Start the reaper for the Ray whose raylet is ``raylet_pid``; the driver holds the pipe's write end
    (closing with the driver, however it ends)."""
    return subprocess.Popen(
        [sys.executable, "-m", "sim.orchestration.reaper", str(raylet_pid)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the driver's process group must not stop the reaper first
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )


def _children(raylet: psutil.Process) -> dict[int, float]:
    """{pid: create_time} of the raylet's descendants (create_time guards against a reused pid)."""
    out: dict[int, float] = {}
    with contextlib.suppress(psutil.Error):
        for child in raylet.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                out[child.pid] = child.create_time()
    out.pop(os.getpid(), None)  # never itself, whoever its parent is
    return out


def _alive(known: dict[int, float]) -> list[psutil.Process]:
    procs = []
    for pid, created in known.items():
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE:
                procs.append(p)
    return procs


def _driver_gone(timeout: float) -> bool:
    """True once stdin (the driver's pipe) reaches end of file."""
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    return bool(ready) and not os.read(sys.stdin.fileno(), 4096)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        raylet = psutil.Process(int(args[0]))
    except (IndexError, ValueError, psutil.Error):
        return 2
    known: dict[int, float] = {}
    while not _driver_gone(_REFRESH_S):
        known.update(_children(raylet))
    deadline = time.monotonic() + _GRACE_S
    while (left := _alive(known)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
