"""Ctrl-C and SIGTERM end a run with one line and 130 / 143, shut down the Ray it started, and the
run resumes to the numbers of an undisturbed one. Also: a truncated newest checkpoint falls back.

Only the interrupted run starts its own Ray (its shutdown is under test); the resumes and the
undisturbed references run in-process on the session's Ray, and the crashed run joins it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

import run_sim
from sim.results import outcome_frame
from tests.cli import cli, sets
from tests.conftest import attached, run_in_process, small_overrides

ROOT = Path(__file__).resolve().parents[1]


def _interrupt(tmp_path, items, sig, after_round, group):
    """Start a run in its own process group; once round `after_round` is checkpointed send `sig` to
    the group (a terminal's Ctrl-C) or to the driver alone (what docker, Kubernetes and systemd do)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run_sim.py"), "run", *sets(items)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    ck = (
        Path(next(i.split("=", 1)[1] for i in items if i.startswith("out=")))
        / "sig"
        / "checkpoints"
        / "fedavg"
        / "seed0"
    )
    deadline = time.monotonic() + 400
    while not (ck / f"meta_r{after_round}.json").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never reached the round"
        time.sleep(0.05)
    ray_procs = [p for p in psutil.Process(proc.pid).children(recursive=True)]
    titles = []
    for p in ray_procs:
        with contextlib.suppress(psutil.Error):
            titles.append(" ".join(p.cmdline()))
    if group:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err, ray_procs, titles


@pytest.fixture(scope="module")
def straight_fedavg(ray_local, tmp_path_factory) -> pd.DataFrame:
    """The undisturbed run both signal tests are compared with."""
    tmp = tmp_path_factory.mktemp("straight")
    return outcome_frame(run_in_process(small_overrides(tmp, "algorithms=fedavg", "rounds=6", "run_id=straight")))


@pytest.fixture(scope="module")
def straight_local_fedavg(ray_local, tmp_path_factory) -> pd.DataFrame:
    """The undisturbed Local-only + FedAvg run (4 rounds) the killed run is compared with."""
    tmp = tmp_path_factory.mktemp("straight_local_fedavg")
    return outcome_frame(run_in_process(small_overrides(tmp, "algorithms=local,fedavg", "rounds=4", "run_id=straight")))


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, group", [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)])
def test_a_signal_ends_the_run_in_one_line_and_it_resumes(straight_fedavg, capsys, tmp_path, sig, code, group):
    items = small_overrides(tmp_path, "algorithms=fedavg", "rounds=6", "run_id=sig")
    returncode, _, err, ray_procs, _ = _interrupt(tmp_path, items, sig, after_round=2, group=group)
    run_dir = tmp_path / "results" / "sig"
    assert returncode == code, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    last = lines[-1]
    assert last.startswith("interrupted after round ") and last.endswith(
        f"resume with: run_sim.py run --resume {run_dir}"
    )
    k = int(last.split("round ")[1].split()[0])
    assert k >= 2
    assert "Traceback" not in err and "SIGTERM received" not in err, err[-3000:]
    assert "Token authentication" not in err  # a default local run: no Ray warning noise
    # The Ray this run started is gone with it (no daemon or agent left behind).
    psutil.wait_procs(ray_procs, timeout=30)
    assert not [p for p in ray_procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    assert run_sim.main(["run", "--resume", str(run_dir)]) == 0, capsys.readouterr().err[-3000:]
    pd.testing.assert_frame_equal(outcome_frame(run_dir), straight_fedavg)


@pytest.mark.slow
def test_a_kill_9_driver_leaves_no_ray_process_behind_and_resumes(straight_fedavg, capsys, tmp_path):
    """Ray ties its GCS, raylet and workers to the driver, but its agents would linger 60 s after
    a SIGKILL (a GCS call with Ray's fixed timeout); the run's reaper takes them down at once."""
    items = small_overrides(tmp_path, "algorithms=fedavg", "rounds=6", "run_id=sig")
    returncode, _, _, ray_procs, titles = _interrupt(tmp_path, items, signal.SIGKILL, after_round=2, group=False)
    assert returncode == -signal.SIGKILL
    assert any("DashboardAgent" in t for t in titles) and any("RuntimeEnvAgent" in t for t in titles), titles
    assert any("sim.orchestration.reaper" in t for t in titles), titles
    _, alive = psutil.wait_procs(ray_procs, timeout=10)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [p.pid for p in alive]

    run_dir = tmp_path / "results" / "sig"
    assert run_sim.main(["run", "--resume", str(run_dir)]) == 0, capsys.readouterr().err[-3000:]
    pd.testing.assert_frame_equal(outcome_frame(run_dir), straight_fedavg)


@pytest.mark.slow
def test_a_killed_run_with_a_truncated_checkpoint_falls_back_and_resumes_to_the_same_numbers(
    ray_local, straight_local_fedavg, capsys, tmp_path
):
    """Local-only (per-client state) and FedAvg crash after round 3; what was written stays readable;
    the newest checkpoint of each is torn: the resume says so in one line, goes back to round 2, and
    ends as an undisturbed run. The crashed run joins the session's Ray and the resume runs
    in-process (the resume, not Ray's start, is under test)."""
    from sim.results import read_metrics
    from tests.faults import crash_env

    items = attached(ray_local, small_overrides(tmp_path, "algorithms=local,fedavg", "rounds=4"))
    crashed = cli(["run", *sets(items + ["run_id=crashed"])], crash_env(3))
    assert crashed.returncode == 17, crashed.stderr[-2000:]
    run_dir = tmp_path / "results" / "crashed"
    partial = read_metrics(run_dir).to_pandas()  # what was written before the crash stays readable
    assert sorted(set(partial[partial.algorithm == "local"]["round"])) == [0, 1, 2, 3]
    torn = run_dir / "checkpoints" / "local" / "seed0" / "server_r3.pt"
    data = torn.read_bytes()
    torn.write_bytes(data[: len(data) // 2])

    code = run_sim.main(["run", "--resume", str(run_dir)])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    notices = [line for line in err.splitlines() if line.startswith("notice: ")]
    assert len(notices) == 1 and str(torn) in notices[0] and "resuming from round 2" in notices[0], err
    pd.testing.assert_frame_equal(outcome_frame(run_dir), straight_local_fedavg)
    assert "results:" in out and "report:" in out
