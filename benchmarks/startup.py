"""Start-up cost: from `run_sim.py run` to the first client update.

    .venv/bin/python benchmarks/startup.py [--repeats 3] [--address ADDRESS]

Runs `run_sim.py run` (FedAvg, 10 clients, one round) in a fresh process each time and
timestamps, from just before the process is spawned:

- `ray up`:     the "N client actors" note: Python and imports, data, partition, ray.init, pool plan;
- `round 0`:    the round-0 summary line: client actors started and configured, round-0 evaluation;
- `1st update`: round 1 starts dispatching client updates (`RoundOneMark`, a callback the
  benchmark adds to the run's process through WARMFED_SIM_CALLBACKS);
- `exit`:       the process ends (one round, report, Ray shutdown).

`imports` is `python -c "import run_sim, sim.orchestration.runner, actors.client"` alone, for reference. With
`--address` the runs attach to a running cluster (`ray.address=...`) instead of starting Ray.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sim.callbacks import CALLBACKS_ENV, Callback, RunInfo  # noqa: E402

MARK_FILE_ENV = "WARMFED_SIM_BENCH_ROUND1_FILE"


class RoundOneMark(Callback):
    """Writes the wall clock into MARK_FILE_ENV's file when round 1 of the first run starts."""

    def on_round_start(self, run: RunInfo, round: int) -> None:
        path = Path(os.environ[MARK_FILE_ENV])
        if round == 1 and not path.exists():
            path.write_text(repr(time.time()))


MARKS = (("ray up", "client actors ("), ("round 0", " round 0 ("))


def imports_time() -> float:
    start = time.time()
    subprocess.run(
        [sys.executable, "-c", "import run_sim, sim.orchestration.runner, actors.client"], cwd=ROOT, check=True
    )
    return time.time() - start


def one_run(address: str | None, out: str) -> dict[str, float]:
    first = Path(out) / "first_train"
    first.unlink(missing_ok=True)
    sets = [
        "algorithms=fedavg",
        "num_clients=10",
        "clients_per_round=10",
        "rounds=1",
        "partition.scheme=iid",
        "progress=true",
        f"out={out}",
        f"cache_dir={out}/cache",
    ]
    if address:
        sets.append(f"ray.address={address}")
    cmd = [sys.executable, str(ROOT / "run_sim.py"), "run", *[a for s in sets for a in ("--set", s)]]
    env = {
        **os.environ,
        CALLBACKS_ENV: "benchmarks.startup:RoundOneMark",
        MARK_FILE_ENV: str(first),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: dict[str, float] = {}
    tail: list[str] = []
    for line in proc.stderr:  # text mode: tqdm's \r refreshes arrive as lines too
        now = time.time()
        tail = (tail + [line])[-20:]
        for name, marker in MARKS:
            if name not in seen and marker in line:
                seen[name] = now - t0
    proc.wait()
    seen["exit"] = time.time() - t0
    if proc.returncode != 0 or not first.exists():
        raise SystemExit(f"run failed ({proc.returncode}):\n{''.join(tail)}")
    seen["1st update"] = float(first.read_text()) - t0
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--address", help="attach to this running Ray cluster instead of starting one")
    args = parser.parse_args()
    print(f"imports alone: {imports_time():.1f} s")
    cols = ["ray up", "round 0", "1st update", "exit"]
    print(f"{'run':>4} " + " ".join(f"{c:>10}" for c in cols) + "   (seconds since the process was spawned)")
    runs = []
    with tempfile.TemporaryDirectory() as out:
        for i in range(args.repeats):
            r = one_run(args.address, out)
            runs.append(r)
            print(f"{i + 1:>4} " + " ".join(f"{r.get(c, float('nan')):>10.1f}" for c in cols), flush=True)
    print("median " + " ".join(f"{statistics.median(r.get(c, float('nan')) for r in runs):>10.1f}" for c in cols))


if __name__ == "__main__":
    main()
