"""A real two-node Ray cluster on this machine, for the tests of tests/test_cluster.py.

`ray start --head` (with the dashboard, for `ray job submit`) plus `ray start --address`, loopback
only, distinct ports, token auth off, fast health checks so a dead node is declared within about
a second. A killed worker node is started again for the next test, so one cluster serves the
whole module (a cluster start costs tens of seconds on two cores).

Teardown stops *this* cluster's processes by pid (the `ray start --block` processes, their trees
and anything else living under its temp dir) rather than with `ray stop --force`: that command
kills every Ray process on the machine, including other test sessions' and other users' clusters.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil
import pytest

RAY = str(Path(sys.executable).with_name("ray"))  # the venv's ray CLI, next to its python
HEALTH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 300,
    "health_check_timeout_ms": 300,
    "health_check_failure_threshold": 3,
}
COMMON = [
    "--block",
    "--node-ip-address=127.0.0.1",
    "--num-cpus=1",
    "--disable-usage-stats",
    "--object-store-memory=150000000",
]


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _processes_of(roots_of: list[subprocess.Popen], temp: Path) -> list[psutil.Process]:
    """The `ray start` processes' trees plus anything whose command line names the temp dir."""
    found: dict[int, psutil.Process] = {}
    roots = []
    for popen in roots_of:
        with contextlib.suppress(psutil.Error):
            roots.append(psutil.Process(popen.pid))
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(temp) in " ".join(proc.info["cmdline"] or []):
                roots.append(proc)
        except psutil.Error:
            pass
    for root in roots:
        try:
            for proc in [root, *root.children(recursive=True)]:
                found[proc.pid] = proc
        except psutil.Error:
            pass
    return list(found.values())


@dataclass
class TwoNodes:
    temp: Path
    env: dict[str, str]
    log: IO[str]
    ports: dict[str, int]
    head: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def address(self) -> str:
        """The GCS address drivers attach to (`ray.address=...`)."""
        return f"127.0.0.1:{self.ports['gcs']}"

    @property
    def dashboard(self) -> str:
        """The job-submission address."""
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    @property
    def worker(self) -> subprocess.Popen:
        return self.workers[-1]

    def _popen(self, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            [RAY, "start", *args, *COMMON],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self) -> None:
        p = self.ports
        self.head = self._popen(
            [
                "--head",
                f"--port={p['gcs']}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={p['dashboard']}",
                f"--temp-dir={self.temp}",
                f"--ray-client-server-port={p['client']}",
                f"--dashboard-agent-listen-port={p['agent_head']}",
                f"--system-config={json.dumps(HEALTH)}",
            ]
        )
        self.wait_alive(1)
        self.start_worker()
        self._wait_jobs_api()

    def start_worker(self) -> None:
        self.workers.append(
            self._popen([f"--address={self.address}", f"--dashboard-agent-listen-port={self.ports['agent_worker']}"])
        )
        self.wait_alive(2)

    def ensure_two_nodes(self) -> None:
        """Start the worker node again if a test killed it."""
        if self.worker.poll() is not None or not psutil.pid_exists(self.worker.pid):
            self.start_worker()

    def kill_worker(self) -> None:
        """The worker node dies at once: SIGKILL to its raylet, object store, agents and actors."""
        root = psutil.Process(self.worker.pid)
        procs = [root, *root.children(recursive=True)]
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(procs, timeout=10)
        self.worker.wait(timeout=10)

    def tail(self) -> str:
        self.log.flush()
        return (self.temp / "nodes.log").read_text()[-3000:]

    def wait_alive(self, n: int) -> None:
        """Until `ray status` lists `n` active nodes (a dead node leaves that list at once)."""
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.head is not None and self.head.poll() is None, self.tail()
            done = subprocess.run(
                [RAY, "status", f"--address={self.address}"], env=self.env, capture_output=True, text=True, timeout=60
            )
            active = done.stdout.split("Active:")[-1].split("Pending:")[0]
            if done.returncode == 0 and active.count("node_") >= n:
                return
            time.sleep(1)
        pytest.fail(f"{n} Ray nodes did not come up:\n{self.tail()}")

    def _wait_jobs_api(self) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.dashboard}/api/jobs/", timeout=5) as r:
                if r.status == 200:
                    return
            time.sleep(1)
        pytest.fail(f"the job API did not come up:\n{self.tail()}")

    def stop(self) -> None:
        popens = [p for p in [self.head, *self.workers] if p is not None]
        procs = _processes_of(popens, self.temp)
        for popen in reversed(popens):
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes on SIGTERM
        _, alive = psutil.wait_procs(procs, timeout=20)
        for proc in alive + _processes_of(popens, self.temp):
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        self.log.close()
        shutil.rmtree(self.temp, ignore_errors=True)


@contextlib.contextmanager
def two_node_cluster():
    """Start the cluster; always stop it."""
    temp = Path(tempfile.mkdtemp(prefix="wfmn-", dir="/tmp"))  # short: Ray's unix sockets live under it
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}  # loopback only
    env.pop("RAY_ADDRESS", None)
    names = ("gcs", "dashboard", "client", "agent_head", "agent_worker")
    log = open(temp / "nodes.log", "w")  # noqa: SIM115 -- the Ray processes write to it until stop() closes it
    cluster = TwoNodes(temp, env, log, dict(zip(names, free_ports(len(names)), strict=True)))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
