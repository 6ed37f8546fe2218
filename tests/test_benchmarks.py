"""The benchmark scripts still run (their figures are read by people, so a broken script would
go unnoticed until someone needs it): each at a toy size, checking the lines it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import session_address

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_engine_vs_plain_prints_both_ratios(ray_local):
    # attached to the session's Ray: the script, not a Ray start, is under test
    address = session_address(ray_local)
    out = _run("engine_vs_plain.py", "--clients", "12", "--per-round", "4", "--rounds", "2", "--ray-address", address)
    match = re.search(
        r"ratio engine/plain: wall ([\d.]+) \(rounds only ([\d.]+)\)\s+memory RSS ([\d.]+) \(PSS ([\d.]+)\)", out
    )
    assert match, out
    assert all(float(v) > 0 for v in match.groups())
    assert re.search(r"plain \(1 thread\): whole run", out), out
    eff = re.search(r"parallel efficiency: plain-1-thread rounds / engine rounds / (\d+) cores = ([\d.]+);", out)
    assert eff and int(eff.group(1)) >= 1 and float(eff.group(2)) > 0, out


@pytest.mark.slow
def test_scale_prints_a_row_per_algorithm_and_scale():
    out = _run(
        "scale.py",
        "--scales",
        "50:5",
        "--rounds",
        "1",
        "--eval-clients",
        "10",
        "--copies",
        "1",
        "--algorithms",
        "fedavg,ditto",
    )
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["fedavg"], ["ditto"])]
    assert [r[0] for r in rows] == ["fedavg", "ditto"], out
    state_mib = {r[0]: float(r[-1]) for r in rows}
    assert state_mib["fedavg"] == 0.0 and state_mib["ditto"] > 0.0  # Ditto keeps personal models on disk


@pytest.mark.slow
def test_round_timeline_splits_the_training_tasks():
    out = _run("round_timeline.py", "--clients", "50", "--per-round", "10", "--rounds", "2", "--copies", "1")
    assert re.search(r"training phase: \d+ client updates/s", out), out
    row = re.search(r"^\s+train_many\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert row and int(row.group(1)) >= 1 and float(row.group(3)) > 0, out  # tasks were seen and took time
    assert re.search(r"train_many: [\d.]+ ms of execution per client", out), out
    assert len(re.findall(r"^actor \w+: executing training tasks \d+% of the training phases$", out, re.M)) == 2, out
