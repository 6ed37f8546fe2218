"""Resuming restores the server's state: a crashed run ends with the numbers of an undisturbed one.

The older resume tests crash inside Local-only (no server state at all) or only check that a
round was not recomputed, so a resume that forgot to load the server's checkpoint passed them.
Here the crashes hit FedAvg (global weights) and SCAFFOLD (weights and the server control
variate, plus per-client control variates in the state store), the second algorithm of the
comparison crashes too, and a sweep cell crashes; every resumed table is compared row by row
with one undisturbed run of the same config. Clients per round < clients, so the resumed
rounds also depend on the round's client selection.

The CLI runs in subprocesses attached to the session's Ray (`ray.address`), crashed by the
engine's fault injection (exit 17 after round k).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from sim.config import load_config
from sim.orchestration.runner import run_comparison
from sim.results import outcome_frame, read_metrics
from tests.cli import cli, sets
from tests.conftest import session_address
from tests.faults import crash_env

# Pinned (defaults may change): 4 clients, 2 a round, 3 rounds, one domain of the digits, a narrow model.
SMALL = [
    "num_clients=4",
    "clients_per_round=2",
    "rounds=3",
    "seed=0",
    "progress=false",
    "model.width=8",
    "data.domains=[plain]",
    "train.batch_size=32",
    "train.lr=0.05",
    "train.momentum=0.9",
    "train.local_epochs=1",
    "ray.pool_size=1",
    "client_resources.num_cpus=1",
    "checkpoint_every=1",
]
ALGORITHMS = "fedavg,scaffold"


def _rounds(run_dir: Path, algorithm: str) -> list[int]:
    df = read_metrics(run_dir).to_pandas()
    return sorted(set(df[df.algorithm == algorithm]["round"]))


@pytest.fixture(scope="module")
def undisturbed(ray_local, tmp_path_factory) -> pd.DataFrame:
    """The reference: the same comparison run once without interruption."""
    tmp = tmp_path_factory.mktemp("undisturbed")
    cfg = load_config(
        None,
        [*SMALL, f"algorithms={ALGORITHMS}", f"out={tmp / 'results'}", f"cache_dir={tmp / 'cache'}", "run_id=straight"],
    )
    frame = outcome_frame(run_comparison(cfg).run_dir)
    assert set(frame.algorithm) == {"fedavg", "scaffold"}
    assert sorted(set(frame["round"])) == [0, 1, 2, 3]
    return frame


@pytest.mark.slow
def test_crashes_in_both_algorithms_of_a_comparison_resume_to_the_undisturbed_numbers(ray_local, undisturbed, tmp_path):
    address = session_address(ray_local)
    items = [
        *SMALL,
        f"algorithms={ALGORITHMS}",
        f"out={tmp_path / 'results'}",
        f"cache_dir={tmp_path / 'cache'}",
        f"ray.address={address}",
        "run_id=crashed",
    ]
    run_dir = tmp_path / "results" / "crashed"

    first = cli(["run", *sets(items)], crash_env(2))  # FedAvg dies after round 2
    assert first.returncode == 17, first.stderr[-2000:]
    assert _rounds(run_dir, "fedavg") == [0, 1, 2] and _rounds(run_dir, "scaffold") == []

    # FedAvg resumes at round 3 from its round-2 server state; SCAFFOLD, second, dies after round 1
    second = cli(["run", "--resume", str(run_dir)], crash_env(1))
    assert second.returncode == 17, second.stderr[-2000:]
    assert _rounds(run_dir, "fedavg") == [0, 1, 2, 3] and _rounds(run_dir, "scaffold") == [0, 1]

    third = cli(["run", "--resume", str(run_dir)])  # SCAFFOLD resumes at round 2
    assert third.returncode == 0, third.stderr[-2000:]
    pd.testing.assert_frame_equal(outcome_frame(run_dir), undisturbed)


@pytest.mark.slow
def test_a_crashed_sweep_cell_resumes_to_the_undisturbed_numbers(ray_local, undisturbed, tmp_path):
    address = session_address(ray_local)
    items = [*SMALL, f"out={tmp_path / 'out'}", f"ray.address={address}"]
    argv = ["sweep", *sets(items), "--grid", f"algorithms={ALGORITHMS}", "--name", "resume"]
    crashed = cli(argv, crash_env(2))  # the first cell dies after round 2
    assert crashed.returncode == 17, crashed.stderr[-2000:]
    cells = tmp_path / "out" / "sweeps" / "resume" / "cells"
    (interrupted,) = [d for d in cells.iterdir() if d.is_dir()]
    assert not (interrupted / "done.json").exists()
    (algorithm,) = set(read_metrics(interrupted).to_pandas().algorithm)
    assert _rounds(interrupted, algorithm) == [0, 1, 2]

    resumed = cli(argv)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    done = [d for d in cells.iterdir() if (d / "done.json").exists()]
    assert len(done) == 2 and interrupted in done
    frames = pd.concat([outcome_frame(d) for d in done])
    frames = frames.sort_values(["algorithm", "seed", "round", "client_id", "split", "metric"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(frames, undisturbed)
