"""A real multi-node Ray cluster on this machine: two nodes (separate raylets and object stores),
client actors on both, `out` on the shared local disk. A worker node is killed mid-run: the run
goes back to its last checkpoint on the surviving node's actors and ends with the numbers of an
undisturbed run. Also: several runs at once on one cluster (`ray.address=...`), each correct.

The cluster is `ray start --head` plus `ray start --address` (loopback only, distinct ports, token
auth off, fast health checks so a dead node is declared within about a second); teardown stops
only these nodes' processes, by pid (tests/test_cluster_submit.py's helpers).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import pytest

from sim.results import outcome_frame, read_metrics
from tests.conftest import run_in_process

ROOT = Path(__file__).resolve().parents[1]
HEALTH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 300,
    "health_check_timeout_ms": 300,
    "health_check_failure_threshold": 3,
}


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


def _items(tmp_path, address, run_id, *extra):
    return [
        "num_clients=8",
        "clients_per_round=8",
        "rounds=5",
        "progress=false",
        "algorithms=fedavg,local",
        "partition.scheme=iid",
        "model.width=8",
        "client_resources.num_cpus=0.5",
        f"ray.address={address}",
        f"out={tmp_path / 'results'}",
        f"cache_dir={tmp_path / 'cache'}",
        f"run_id={run_id}",
        *extra,
    ]


@dataclass
class TwoNodes:
    address: str  # the GCS address drivers attach to
    head: subprocess.Popen
    worker: subprocess.Popen
    temp: Path
    dashboard: str  # job-submission address (when started with the dashboard)

    def kill_worker(self) -> None:
        """The worker node dies at once: SIGKILL to its raylet, object store, agents and actors."""
        procs = [psutil.Process(self.worker.pid), *psutil.Process(self.worker.pid).children(recursive=True)]
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(procs, timeout=10)


@pytest.fixture()
def two_nodes(monkeypatch, request):
    """`ray start --head` plus `ray start --address` on loopback, one CPU each, distinct ports
    (with the dashboard, for `ray job submit`, when parametrized indirectly with True)."""
    from tests.test_cluster_submit import RAY, _free_ports, _stop

    dashboard = bool(getattr(request, "param", False))

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # loopback only; the drivers below inherit it
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    env = dict(os.environ)
    temp = Path(tempfile.mkdtemp(prefix="wfmn-", dir="/tmp"))
    gcs, client, agent_head, agent_worker, dash = _free_ports(5)
    ui = (
        ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"]
        if dashboard
        else ["--include-dashboard=false"]
    )
    log = open(temp / "nodes.log", "w")  # noqa: SIM115 -- the Ray processes write to it until teardown closes it
    common = [
        "--block",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        "--disable-usage-stats",
        "--object-store-memory=150000000",
    ]
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            f"--port={gcs}",
            *ui,
            f"--temp-dir={temp}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent_head}",
            f"--system-config={json.dumps(HEALTH)}",
            *common,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    worker = None
    try:
        address = f"127.0.0.1:{gcs}"
        _wait_nodes(address, 1, head, temp)
        worker = subprocess.Popen(
            [RAY, "start", f"--address={address}", f"--dashboard-agent-listen-port={agent_worker}", *common],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait_nodes(address, 2, head, temp)
        yield TwoNodes(address, head, worker, temp, f"http://127.0.0.1:{dash}")
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.wait(timeout=20)
        _stop(head, temp)
        log.close()


def _wait_nodes(address: str, n: int, head: subprocess.Popen, temp: Path) -> None:
    from tests.test_cluster_submit import RAY

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert head.poll() is None, (temp / "nodes.log").read_text()[-3000:]
        done = subprocess.run([RAY, "status", f"--address={address}"], capture_output=True, text=True, timeout=60)
        if done.returncode == 0 and done.stdout.count("node_") >= n:
            return
        time.sleep(1)
    pytest.fail(f"{n} Ray nodes did not come up:\n{(temp / 'nodes.log').read_text()[-3000:]}")


def _undisturbed(tmp_path_factory, name: str, *extra: str) -> pd.DataFrame:
    """The same config run alone on the session's local Ray, in-process: the numbers do not depend
    on the cluster or the actor count, and no driver process or cluster node is spent on it."""
    tmp = tmp_path_factory.mktemp(name)
    items = [i for i in _items(tmp, "", name, *extra) if not i.startswith("ray.address=")]
    return outcome_frame(run_in_process(items))


@pytest.fixture(scope="module")
def straight(ray_local, tmp_path_factory) -> pd.DataFrame:
    """The undisturbed reference of both node-loss tests (they run the same config)."""
    return _undisturbed(tmp_path_factory, "straight")


SOAK = ["rounds=3", "algorithms=fedavg,local", "client_resources.num_cpus=1"]


def _driver(args, env=None):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run_sim.py"), "run", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_a_worker_node_dies_mid_run_and_the_run_ends_as_an_undisturbed_one(two_nodes, straight, tmp_path):
    cluster = two_nodes
    ck = tmp_path / "results" / "hit" / "checkpoints" / "fedavg" / "seed0"
    killed: dict[str, float] = {}

    def kill_after_round_1() -> None:
        while not (ck / "meta_r1.json").exists():
            if proc.poll() is not None:
                return
            time.sleep(0.02)
        killed["at"] = time.monotonic()
        cluster.kill_worker()
        while not (ck / "meta_r2.json").exists() and proc.poll() is None:
            time.sleep(0.02)
        killed["recovered"] = time.monotonic()  # round 2 redone on the surviving actors and checkpointed

    proc = _driver(_sets(_items(tmp_path, cluster.address, "hit")))
    killer = threading.Thread(target=kill_after_round_1, daemon=True)
    killer.start()
    out, err = proc.communicate(timeout=300)
    killer.join(timeout=30)
    assert proc.returncode == 0, err[-4000:]
    assert "at" in killed, "the node was never killed"
    recovered = [line for line in err.splitlines() if "resumes from its last checkpoint" in line]
    assert recovered and "2 client actors lost" in recovered[0] and "on 2 actors" in recovered[0], err[-3000:]
    recover_s = killed["recovered"] - killed["at"]
    run_dir = tmp_path / "results" / "hit"
    manifest = (run_dir / "manifest.json").read_text()
    assert '"size": 4' in manifest  # four actors to start with: two on each node

    pd.testing.assert_frame_equal(outcome_frame(run_dir), straight)  # the same config undisturbed
    df = read_metrics(run_dir).to_pandas()
    assert sorted(df[df.algorithm == "fedavg"]["round"].unique()) == list(range(6))
    print(
        f"\nmultinode: 2 nodes x 2 actors; worker node killed after round 1 of fedavg; "
        f"{recovered[0].strip()}; {recover_s:.1f}s from the kill to round 2's checkpoint"
    )


@pytest.mark.slow
def test_several_runs_at_once_on_one_cluster_each_end_correct(ray_local, two_nodes, tmp_path_factory, tmp_path):
    """A soak: three comparisons started together on one two-node cluster (together they ask for
    more actors than it has CPUs, so they wait for each other); each ends with the numbers of the
    same run made alone, in its own directory."""
    cluster = two_nodes
    procs = [_driver(_sets(_items(tmp_path, cluster.address, f"soak{i}", *SOAK))) for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-4000:]
    reference = _undisturbed(tmp_path_factory, "alone", *SOAK)
    for i in range(3):
        run_dir = tmp_path / "results" / f"soak{i}"
        assert set(read_metrics(run_dir).to_pandas().run_id) == {f"soak{i}"}
        pd.testing.assert_frame_equal(outcome_frame(run_dir), reference)


@pytest.mark.slow
@pytest.mark.parametrize("two_nodes", [True], indirect=True)
def test_node_loss_under_ray_job_submit(two_nodes, straight, tmp_path):
    """The same through the Ray Jobs CLI, as a user submits to a cluster."""
    from tests.test_cluster_submit import RAY

    cluster = two_nodes
    ck = tmp_path / "results" / "job" / "checkpoints" / "fedavg" / "seed0"
    sets = _sets(_items(tmp_path, "auto", "job"))
    proc = subprocess.Popen(
        [
            RAY,
            "job",
            "submit",
            "--address",
            cluster.dashboard,
            "--submission-id",
            "wf-node-loss",
            "--working-dir",
            str(ROOT),
            "--",
            sys.executable,
            "run_sim.py",
            "run",
            *sets,
        ],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (ck / "meta_r1.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-4000:]
        time.sleep(0.05)
    cluster.kill_worker()
    log, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0 and "succeeded" in log, log[-4000:]
    assert "resumes from its last checkpoint" in log, log[-4000:]
    pd.testing.assert_frame_equal(outcome_frame(tmp_path / "results" / "job"), straight)
