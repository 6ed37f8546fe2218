"""The reaper beside a private Ray: once the driver's pipe closes it ends what the raylet started
(Ray's agents would otherwise wait 60 s on a dead GCS), and nothing else."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from sim.orchestration.reaper import start_reaper

# a stand-in raylet: a process whose child ignores SIGTERM and would sleep for minutes, as an agent does
_PARENT = (
    "import signal, subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', "
    "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)']); time.sleep(300)"
)


def _children(pid: int, n: int) -> list[psutil.Process]:
    deadline = time.monotonic() + 20
    while len(kids := psutil.Process(pid).children(recursive=True)) < n:
        assert time.monotonic() < deadline, "the stand-in never started its child"
        time.sleep(0.05)
    return kids


def test_the_raylets_descendants_die_once_the_driver_pipe_closes_and_nothing_else():
    raylet = subprocess.Popen([sys.executable, "-c", _PARENT])
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        agent = _children(raylet.pid, 1)[0]
        reaper = start_reaper(raylet.pid)
        time.sleep(1.5)  # the reaper lists the raylet's children once a second
        raylet.kill()  # the driver dies: Ray takes the raylet down with it, the agent is orphaned
        raylet.wait(10)
        assert agent.is_running()
        assert reaper.stdin is not None
        reaper.stdin.close()  # what the driver's death does to the pipe
        assert reaper.wait(15) == 0
        gone, alive = psutil.wait_procs([agent], timeout=5)
        assert gone and not alive
        assert bystander.poll() is None  # not the raylet's: untouched
    finally:
        for p in (raylet, bystander):
            p.kill()
            p.wait(10)


def test_a_bad_raylet_pid_is_refused_without_touching_anything():
    reaper = subprocess.run(
        [sys.executable, "-m", "sim.orchestration.reaper", "not-a-pid"], input=b"", capture_output=True, timeout=30
    )
    assert reaper.returncode == 2


def test_a_private_ray_runs_without_its_autoscaler_monitor_and_still_shuts_down():
    """A Ray this process starts has nothing to autoscale: `connect` kills the monitor (its memory
    for the whole run; at shutdown its SIGTERM handler would wait out a 1 s grace period reporting
    to the dead GCS), tasks still run, and `cluster.shutdown` stops the rest."""
    code = """
import ray
from sim.config import load_config
from sim.orchestration import cluster
assert cluster.connect(load_config(None, []), "monitor-test")
monitor = cluster._private_ray_process("monitor")
raylet = cluster._private_ray_process("raylet")
assert monitor is not None and raylet is not None
print(monitor.poll(), raylet.poll())
print(ray.get(ray.remote(lambda: 41 + 1).remote()))
cluster.shutdown()
print(raylet.poll() is not None, ray.is_initialized())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-3:] == ["-9 None", "42", "True False"], out.stdout + out.stderr
