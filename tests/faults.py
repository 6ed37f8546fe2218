"""Fault injection for the crash-and-resume tests, as a callback of the CLI process under test
(sim/callbacks.py), so that no test hook lives in the engine."""

from __future__ import annotations

import os

from sim.callbacks import CALLBACKS_ENV, Callback, RoundEnd

CRASH_ROUND_ENV = "WARMFED_SIM_TEST_CRASH_AFTER_ROUND"


class CrashAfterRound(Callback):
    """Exits the process hard (as `kill -9` would, no clean-up) once round k is written and checkpointed."""

    def __init__(self) -> None:
        self.round = int(os.environ[CRASH_ROUND_ENV])

    def on_round_end(self, event: RoundEnd) -> None:
        if event.round == self.round:
            os._exit(17)


def crash_env(after_round: int) -> dict[str, str]:
    """The environment that makes a run_sim.py subprocess die after `after_round`."""
    return {CALLBACKS_ENV: "tests.faults:CrashAfterRound", CRASH_ROUND_ENV: str(after_round)}
