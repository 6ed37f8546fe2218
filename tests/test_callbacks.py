"""Callbacks (sim/callbacks.py): the config's come back on resume, the process's
(WARMFED_SIM_CALLBACKS) do not; every hook sees every round once, in order; bad paths are one
clear error before anything is written."""

from __future__ import annotations

import json

import pytest

import run_sim
from sim.callbacks import CALLBACKS_ENV, Callback, RoundEnd, RunInfo
from sim.config import ConfigError, load_config
from sim.orchestration.runner import run_comparison
from sim.results import read_metrics
from tests.conftest import small_overrides

EVENTS: list[tuple] = []


class Recorder(Callback):
    def on_run_start(self, run: RunInfo, start_round: int) -> None:
        EVENTS.append(("start", run.algorithm, start_round))

    def on_round_start(self, run: RunInfo, round: int) -> None:
        EVENTS.append(("begin", run.algorithm, round))

    def on_round_end(self, event: RoundEnd) -> None:
        EVENTS.append(("end", event.run.algorithm, event.round, event.checkpointed, event.last))

    def on_run_end(self, run: RunInfo) -> None:
        EVENTS.append(("done", run.algorithm))


class FailAfterRoundOne(Callback):
    def on_round_end(self, event: RoundEnd) -> None:
        if event.run.algorithm == "fedprox" and event.round == 1:
            raise RuntimeError("injected")


def test_hooks_in_order_and_only_the_configs_callbacks_come_back_on_resume(ray_local, tmp_path, monkeypatch, capsys):
    EVENTS.clear()
    items = small_overrides(
        tmp_path,
        "algorithms=fedavg,fedprox",
        "rounds=2",
        "model.width=8",
        "run_id=cb",
        "callbacks=tests.test_callbacks:Recorder,sim.callbacks:JsonlLogger",
    )
    monkeypatch.setenv(CALLBACKS_ENV, "tests.test_callbacks:FailAfterRoundOne")
    with pytest.raises(RuntimeError, match="injected"):
        run_comparison(load_config(None, items))
    assert [
        ("start", "fedavg", 0),
        *[e for r in (0, 1, 2) for e in (("begin", "fedavg", r), ("end", "fedavg", r, True, r == 2))],
        ("done", "fedavg"),
        ("start", "fedprox", 0),
        *[e for r in (0, 1) for e in (("begin", "fedprox", r), ("end", "fedprox", r, True, False))],
    ] == EVENTS
    EVENTS.clear()
    monkeypatch.delenv(CALLBACKS_ENV)
    run_dir = tmp_path / "results" / "cb"
    assert run_sim.main(["run", "--resume", str(run_dir)]) == 0, capsys.readouterr().err[-2000:]
    # fedavg finished earlier: no hook; fedprox resumes after its round-1 checkpoint
    assert EVENTS == [
        ("start", "fedprox", 2),
        ("begin", "fedprox", 2),
        ("end", "fedprox", 2, True, True),
        ("done", "fedprox"),
    ]

    lines = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [(d["algorithm"], d["round"]) for d in lines] == [("fedavg", r) for r in (0, 1, 2)] + [
        ("fedprox", r) for r in (0, 1, 2)
    ]
    df = read_metrics(run_dir).to_pandas()
    test = df[(df.split == "test") & (df.algorithm == "fedavg") & (df["round"] == 2)]
    acc, n = (
        test[test.metric == "global_acc"].set_index("client_id").value,
        test[test.metric == "n"].set_index("client_id").value,
    )
    assert lines[2]["test/global_acc"] == pytest.approx(float((acc * n).sum() / n.sum()))
    assert lines[2]["wall_s"] > 0


@pytest.mark.parametrize(
    "spec, words",
    [
        ("no_such_module_xyz:Logger", ["cannot import", "no_such_module_xyz"]),
        ("sim.callbacks:Nope", ["has no", "Nope"]),
        ("sim.callbacks", ["module:attribute"]),
        ("sim.callbacks:RunInfo.__name__", ["str", "not a Callback"]),
    ],
)
def test_a_bad_callback_is_one_line_before_anything_is_written(tmp_path, capsys, spec, words):
    code = run_sim.main(["run", "--set", f"callbacks={spec}", "--set", f"out={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2 and all(w in err for w in words), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
    with pytest.raises(ConfigError):  # refused where the config is read
        load_config(None, [f"callbacks={spec}"])
