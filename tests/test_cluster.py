"""A real two-node Ray cluster on this machine (tests/ray_cluster.py): `ray job submit` as a user
submits, several runs at once, and a worker node killed mid-run — the run goes back to its last
checkpoint on the surviving node's actors and ends with the numbers of an undisturbed run.

One cluster serves the module (the node-loss tests come last; a killed worker node is started
again before the next test). `out` is on the shared local disk.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from sim.results import outcome_frame, read_metrics
from tests.cli import sets
from tests.conftest import run_in_process
from tests.ray_cluster import RAY, TwoNodes, two_node_cluster

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def _cluster():
    with two_node_cluster() as cluster:
        yield cluster


@pytest.fixture()
def cluster(_cluster: TwoNodes) -> TwoNodes:
    """The module's cluster, with both nodes up."""
    _cluster.ensure_two_nodes()
    return _cluster


def _items(out: Path, address: str, *extra: str) -> list[str]:
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
        f"out={out / 'results'}",
        f"cache_dir={out / 'cache'}",
        *extra,
    ]


def _undisturbed(tmp_path_factory, name: str, *extra: str) -> pd.DataFrame:
    """The same config run alone on the session's local Ray, in-process: the numbers do not depend
    on the cluster or the actor count, and no driver process or cluster node is spent on it."""
    items = [i for i in _items(tmp_path_factory.mktemp(name), "", *extra) if not i.startswith("ray.address=")]
    return outcome_frame(run_in_process([*items, f"run_id={name}"]))


@pytest.fixture(scope="module")
def straight(ray_local, tmp_path_factory) -> pd.DataFrame:
    """The undisturbed reference of both node-loss tests (they run the same config)."""
    return _undisturbed(tmp_path_factory, "straight")


def _driver(cluster: TwoNodes, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run_sim.py"), "run", *args],
        cwd=ROOT,
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _submit_cmd(cluster: TwoNodes, submission_id: str, items: list[str]) -> list[str]:
    """`ray job submit --working-dir . -- python run_sim.py run ...`, exactly as a user types it."""
    return [
        RAY,
        "job",
        "submit",
        "--address",
        cluster.dashboard,
        "--submission-id",
        submission_id,
        "--working-dir",
        str(ROOT),
        "--",
        sys.executable,
        "run_sim.py",
        "run",
        *sets(items),
    ]


SUBMIT = [
    "ray.address=auto",
    "rounds=2",
    "num_clients=4",
    "clients_per_round=4",
    "algorithms=fedavg",
    "progress=false",
    "partition.scheme=iid",
    "model.width=8",
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


# ------------------------------------------------------------------------------- ray job submit
@pytest.mark.slow
def test_job_submit_runs_on_the_cluster_and_logs_where_results_went(cluster, tmp_path):
    out = tmp_path / "results"
    done = subprocess.run(
        _submit_cmd(cluster, "wf-one", [*SUBMIT, f"out={out}"]),
        cwd=ROOT,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "Job 'wf-one' succeeded" in done.stdout + done.stderr
    run_dir = _results_dir(done.stdout)
    _check_run(run_dir, out)

    # The job's own logs (kept by the cluster) say where the results went.
    logs = subprocess.run(
        [RAY, "job", "logs", "--address", cluster.dashboard, "wf-one"],
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
            _submit_cmd(cluster, f"wf-pair-{i}", [*SUBMIT, f"out={out}"]),
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
            cluster.dashboard,
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
    namespaces: dict[str, set[str]] = {}
    for actor in json.loads(listed.stdout):
        namespaces.setdefault(actor["ray_namespace"], set()).add(actor["job_id"])
    pair = {ns: ids for ns, ids in namespaces.items() if any(d.name in ns for d in dirs)}
    assert len(pair) == 2 and all(len(ids) == 1 for ids in pair.values()), namespaces


# ------------------------------------------------------------------------------- several runs
SOAK = ["rounds=2", "algorithms=fedavg,local", "client_resources.num_cpus=1"]


@pytest.mark.slow
def test_several_runs_at_once_on_one_cluster_each_end_correct(ray_local, cluster, tmp_path_factory, tmp_path):
    """A soak: two comparisons started together on one two-node cluster (each asks for every CPU,
    so one waits for the other); each ends with the numbers of the same run made alone, in its
    own directory."""
    procs = [_driver(cluster, sets([*_items(tmp_path, cluster.address, *SOAK), f"run_id=soak{i}"])) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-4000:]
    reference = _undisturbed(tmp_path_factory, "alone", *SOAK)
    for i in range(2):
        run_dir = tmp_path / "results" / f"soak{i}"
        assert set(read_metrics(run_dir).to_pandas().run_id) == {f"soak{i}"}
        pd.testing.assert_frame_equal(outcome_frame(run_dir), reference)


# ------------------------------------------------------------------------------- node loss (last: they kill the worker node)
@pytest.mark.slow
def test_a_worker_node_dies_mid_run_and_the_run_ends_as_an_undisturbed_one(cluster, straight, tmp_path):
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

    proc = _driver(cluster, sets([*_items(tmp_path, cluster.address), "run_id=hit"]))
    killer = threading.Thread(target=kill_after_round_1, daemon=True)
    killer.start()
    _, err = proc.communicate(timeout=300)
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
def test_node_loss_under_ray_job_submit(cluster, straight, tmp_path):
    """The same through the Ray Jobs CLI, as a user submits to a cluster."""
    ck = tmp_path / "results" / "job" / "checkpoints" / "fedavg" / "seed0"
    proc = subprocess.Popen(
        _submit_cmd(cluster, "wf-node-loss", [*_items(tmp_path, "auto"), "run_id=job"]),
        cwd=ROOT,
        env=cluster.env,
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
