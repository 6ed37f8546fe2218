"""Where a round's time goes: FedAvg at one scale, read back from Ray's task timeline.

    .venv/bin/python benchmarks/round_timeline.py [--clients 10000] [--per-round 100] [--rounds 5] [--set KEY=VALUE]

Starts a local Ray itself (so that `ray.timeline()` can be read before shutdown), runs the
comparison, and prints per round-1.. averages:

- per task kind (train_many, fold, evaluate, ...): count, Ray's argument deserialization,
  execution and output storing, in ms;
- per client in the training tasks: execution ms per client (compare with one process alone:
  `make bench`'s plain loop);
- per actor: the share of each round's training phase it spent executing tasks (busy), the rest
  being waits for arguments, dispatch and the round's ends.

Issue 12's question is how far the engine's rounds are from the physical limit; this says which
part of the gap is the actors' own work and which is Ray moving data around.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("task:deserialize_arguments", "task:execute", "task:store_outputs")


def summarize(events: list[dict[str, Any]], train_s: float, clients_per_task: float) -> list[str]:
    """Lines of the per-kind table and the per-actor busy share, from a Chrome-trace event list.

    `train_s`: the training phases' wall time (the run's metrics); `clients_per_task`: a round's
    clients over its training tasks. Ray may leave some tasks out of its timeline (a bounded event
    buffer), so shares are of the tasks it kept."""
    methods = sorted((e for e in events if e.get("cat", "").startswith("task::") and "dur" in e), key=_ts)
    by_worker: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for e in methods:
        by_worker[e["tid"]].append(e)
    # Ray's task:* phases carry no method name: give each the method event of its worker that follows
    # it (argument deserialization) or encloses/precedes it (execution, output storing).
    phase_ms: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for e in sorted((e for e in events if e.get("name") in PHASES), key=_ts):
        own = by_worker.get(e["tid"], [])
        if e["name"] == "task:deserialize_arguments":
            match = next((m for m in own if _ts(m) >= _ts(e) - 1), None)
        else:
            match = next((m for m in reversed(own) if _ts(m) <= _ts(e) + 1), None)
        if match is not None:
            phase_ms[(match["name"], e["name"])].append(e["dur"] / 1e3)
    lines = [f"{'task':>14} {'n':>5} {'args ms':>8} {'run ms':>8} {'store ms':>9}"]
    for kind in sorted({k for k, _ in phase_ms}, key=lambda k: -sum(phase_ms[(k, PHASES[1])] or [0])):
        n = len(phase_ms[(kind, PHASES[1])])
        cells = [statistics.mean(phase_ms[(kind, p)]) if phase_ms[(kind, p)] else float("nan") for p in PHASES]
        lines.append(f"{kind:>14} {n:5d} {cells[0]:8.2f} {cells[1]:8.2f} {cells[2]:9.2f}")
    train = [e for e in methods if e["name"] == "train_many"]
    if train:
        per_task = statistics.mean(e["dur"] for e in train) / 1e3
        lines.append(
            f"train_many: {per_task / clients_per_task:.2f} ms of execution per client ({clients_per_task:.1f} a task)"
        )
        for worker, own in sorted(by_worker.items()):
            busy = sum(e["dur"] for e in own if e["name"] == "train_many") / 1e3
            if busy:
                lines.append(
                    f"actor {worker[-8:]}: executing training tasks {busy / (train_s * 1e3):.0%} of the training phases"
                )
    return lines


def _ts(event: dict[str, Any]) -> float:
    return float(event["ts"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--copies", type=int, default=7)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    args = parser.parse_args()

    # Workers report task events every second by default, and the run kills its actors at the end:
    # a short interval loses (almost) none of the last tasks' events.
    os.environ.setdefault("RAY_task_events_report_interval_ms", "100")
    import ray

    from sim.config import load_config
    from sim.orchestration.runner import run_comparison
    from sim.results import RUN_LEVEL, read_metrics

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")  # a private Ray: its timeline
    try:
        with tempfile.TemporaryDirectory() as out:
            cfg = load_config(
                None,
                [
                    "algorithms=fedavg",
                    f"num_clients={args.clients}",
                    f"clients_per_round={args.per_round}",
                    f"rounds={args.rounds}",
                    "partition.min_size=3",
                    f"data.copies={args.copies}",
                    "eval.max_clients=100",
                    "progress=false",
                    f"out={out}",
                    f"cache_dir={out}/cache",
                    "run_id=timeline",
                    *args.set,
                ],
            )
            run_dir = run_comparison(cfg).run_dir
            df = read_metrics(run_dir).to_pandas()
            time.sleep(1.0)  # the driver's and server's last reports
            events = ray.timeline()
    finally:
        ray.shutdown()
    run = df[(df.client_id == RUN_LEVEL) & (df["round"] >= 1)]
    train_s = float(run[run.metric == "train_s"].value.sum())
    updates = float(run[run.metric == "clients"].value.sum())
    print(f"FedAvg, {args.clients} clients, {args.per_round}/round, {args.rounds} rounds on 2 CPUs")
    print(f"training phase: {updates / train_s:.0f} client updates/s ({train_s / args.rounds * 1e3:.0f} ms a round)")
    # the cut follows measured times (engine.tasks_per_actor): the rounds' own record of it
    tasks = float(run[run.metric == "train_tasks"].value.sum())
    for line in summarize(events, train_s, updates / tasks):
        print(line)


if __name__ == "__main__":
    main()
