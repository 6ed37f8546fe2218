"""`ray job submit --working-dir . -- python run_sim.py run ... --set ray.address=auto` on a running cluster.

A Ray head is started on loopback for this module (its own temp dir and ports, token auth off:
nothing leaves 127.0.0.1), jobs are submitted with the Ray Jobs CLI exactly as a user would,
and the head is always stopped in the fixture's teardown.

Teardown stops *this* head's processes by pid (the `ray start --block` process, its process tree
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
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))  # the venv's ray CLI, next to its python


@dataclass(frozen=True)
class Cluster:
    address: str  # the dashboard / job-submission address
    env: dict[str, str]
    temp: Path


def _free_ports(n: int) -> list[int]:
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


def _processes_of(head: subprocess.Popen, temp: Path) -> list[psutil.Process]:
    """The head's process tree plus anything whose command line names its temp dir (and their trees)."""
    found: dict[int, psutil.Process] = {}
    roots = []
    with contextlib.suppress(psutil.Error):
        roots.append(psutil.Process(head.pid))
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


def _stop(head: subprocess.Popen, temp: Path) -> None:
    procs = _processes_of(head, temp)
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes on SIGTERM
    _, alive = psutil.wait_procs(procs, timeout=20)
    for proc in alive + _processes_of(head, temp):
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    temp = Path(tempfile.mkdtemp(prefix="wfray-", dir="/tmp"))  # short: Ray's unix sockets live under it
    gcs, dashboard, client, agent = _free_ports(4)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    log = open(temp / "head.log", "w")  # noqa: SIM115 -- the Ray processes write to it until teardown closes it
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 180
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited with {head.returncode}:\n{(temp / 'head.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{address}/api/jobs/", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not come up:\n{(temp / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
        yield Cluster(address, env, temp)
    finally:
        _stop(head, temp)
        log.close()


def _submit_cmd(cluster: Cluster, submission_id: str, out: Path, *extra: str) -> list[str]:
    sets = [
        "ray.address=auto",
        "rounds=2",
        "num_clients=4",
        "clients_per_round=4",
        "algorithms=fedavg",
        "progress=false",
        "partition.scheme=iid",
        "model.width=8",
        f"out={out}",
        *extra,
    ]
    return [
        RAY,
        "job",
        "submit",
        "--address",
        cluster.address,
        "--submission-id",
        submission_id,
        "--working-dir",
        str(ROOT),
        "--",
        sys.executable,
        "run_sim.py",
        "run",
        *[a for s in sets for a in ("--set", s)],
    ]


def _results_dir(log: str) -> Path:
    lines = [line for line in log.splitlines() if line.startswith("results: ")]
    assert lines, log[-3000:]
    return Path(lines[-1].split(":", 1)[1].strip())


def _check_run(run_dir: Path, out: Path) -> None:
    assert run_dir.parent == out and run_dir.is_dir()
    df = pd.read_parquet(run_dir / "metrics.parquet")
    acc = df[(df.metric == "global_acc") & (df.split == "test")]
    assert sorted(acc["round"].unique()) == [0, 1, 2] and sorted(acc.client_id.unique()) == [0, 1, 2, 3]
    assert (run_dir / "report.md").read_text().count("fedavg") >= 2


@pytest.mark.slow
def test_job_submit_runs_on_the_cluster_and_logs_where_results_went(cluster, tmp_path):
    out = tmp_path / "results"
    done = subprocess.run(
        _submit_cmd(cluster, "wf-one", out), cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "Job 'wf-one' succeeded" in done.stdout + done.stderr
    run_dir = _results_dir(done.stdout)
    _check_run(run_dir, out)

    # The job's own logs (kept by the cluster) say where the results went.
    logs = subprocess.run(
        [RAY, "job", "logs", "--address", cluster.address, "wf-one"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert logs.returncode == 0, logs.stderr[-2000:]
    assert f"results: {run_dir}" in logs.stdout and f"report:  {run_dir / 'report.md'}" in logs.stdout

    # The uploaded working dir holds the code but not the venv, git history, results or caches.
    packages = [
        p for p in (cluster.temp / "session_latest" / "runtime_resources" / "working_dir_files").iterdir() if p.is_dir()
    ]
    uploaded = {p.name for pkg in packages for p in pkg.iterdir()}
    assert {"run_sim.py", "sim", "actors", "algorithms"} <= uploaded
    assert not uploaded & {".venv", ".git", "results", ".pytest_cache", "__pycache__"}


@pytest.mark.slow
def test_two_concurrent_jobs_on_one_cluster_do_not_collide(cluster, tmp_path):
    # Identical configs, submitted together, with the default pool sizing: whichever job finds the
    # CPUs taken waits for them, and the two runs get distinct run ids, directories and namespaces.
    out = tmp_path / "results"
    jobs = [
        subprocess.Popen(
            _submit_cmd(cluster, f"wf-pair-{i}", out),
            cwd=ROOT,
            env=cluster.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    for job in jobs:
        log, _ = job.communicate(timeout=600)
        assert job.returncode == 0, log[-4000:]
        logs.append(log)
    dirs = [_results_dir(log) for log in logs]
    assert dirs[0] != dirs[1]
    for run_dir in dirs:
        _check_run(run_dir, out)
    assert sorted(p.name for p in out.iterdir() if p.name != "cache") == sorted(d.name for d in dirs)

    # Each run kept its actors in a namespace of its own.
    listed = subprocess.run(
        [
            RAY,
            "list",
            "actors",
            "--address",
            cluster.address,
            "--detail",
            "--format",
            "json",
            "--limit",
            "10000",
            "--filter",
            "class_name=ClientActor",
        ],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    namespaces = {}
    for actor in json.loads(listed.stdout):
        namespaces.setdefault(actor["ray_namespace"], set()).add(actor["job_id"])
    pair = {ns: jobs for ns, jobs in namespaces.items() if any(d.name in ns for d in dirs)}
    assert len(pair) == 2 and all(len(jobs) == 1 for jobs in pair.values()), namespaces


# ------------------------------------------------------------------------------- without a cluster
def test_a_busy_cluster_makes_the_pool_wait_instead_of_failing(caplog):
    from sim.config import load_config
    from sim.orchestration.cluster import ResourceError, plan_pool

    busy = {"CPU": 0.0}, {"CPU": 2.0}  # another run holds both CPUs
    with caplog.at_level("WARNING", logger="sim.orchestration.cluster"):
        plan = plan_pool(load_config(None, []), *busy)
    assert plan.size == 1 and "wait for resources" in caplog.text
    assert plan_pool(load_config(None, ["ray.pool_size=2"]), *busy).size == 2
    with pytest.raises(ResourceError, match="num_cpus"):  # never placeable: still refused at once
        plan_pool(load_config(None, ["client_resources.num_cpus=4"]), *busy)
    with pytest.raises(ResourceError, match="pool_size"):
        plan_pool(load_config(None, ["ray.pool_size=3"]), *busy)


def test_identical_runs_started_together_get_distinct_run_dirs(tmp_path):
    from sim.config import load_config
    from sim.orchestration.runner import prepare_run_dir

    cfg = load_config(None, [f"out={tmp_path}"])
    dirs = {prepare_run_dir(cfg)[1] for _ in range(3)}  # same config, same second
    assert len(dirs) == 3 and all((d / "config.yaml").exists() for d in dirs)
