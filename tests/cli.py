"""The command line as the tests drive it: `--set` lists, run_sim.py in a subprocess or in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import run_sim
from tests.faults import crash_env

ROOT = Path(__file__).resolve().parents[1]


def sets(items: Iterable[str]) -> list[str]:
    """`["a=1", "b=2"]` -> `["--set", "a=1", "--set", "b=2"]`."""
    return [arg for item in items for arg in ("--set", item)]


def cli(args: list[str], env_extra: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`run_sim.py ARGS` in a subprocess; a fault-injection setting the test process inherited is
    dropped, so only `env_extra` (e.g. `crash_env(k)`) can make it crash."""
    env = {k: v for k, v in os.environ.items() if k not in crash_env(0)}
    env = {**env, "RAY_USAGE_STATS_ENABLED": "0", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "run_sim.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """`run_sim.main(argv)` in this process: (exit code, stdout, stderr)."""
    code = run_sim.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err
