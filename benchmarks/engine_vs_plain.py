"""Engine overhead: the same FedAvg workload through the Ray engine and as a plain PyTorch loop.

    .venv/bin/python benchmarks/engine_vs_plain.py [--clients 100 --per-round 10 --rounds 5]

Prints wall time and peak memory of each and the ratio engine/plain. The reference is the
plain loop with **one** torch thread (`--plain-threads`, default 1): the work one core does, so
the engine's parallel efficiency is plain-1-thread rounds / engine rounds / cores (1.0: every
core of the machine busy with useful training, none of it lost to the engine). Both do
identical work: same data, partition, model, local epochs, and the global model evaluated on
every client's val and test splits each round.

Two wall-time ratios, because they answer different questions:
- whole run: from the call to the results, Ray start-up, actor start-up and shutdown included
  (what a user waits for on a small job);
- rounds: the training rounds 1..R only, each side timed from its own round clock (what grows
  with the job: rounds, clients, epochs). Round 1 carries each actor's first backward pass.
Memory: the summed RSS counts the torch libraries once per process; PSS shares those pages
among the processes that map them, so the engine's PSS is its real footprint. Each side runs in
a fresh interpreter (a process's peak RSS is a lifetime maximum). The last line gives the
engine's extra fixed cost and the job size from which the engine's whole run is the faster.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import psutil
import torch

RESULT_MARK = "RESULT "  # the line a measuring child process prints its figures on (JSON)


def emit_result(figures: dict) -> None:
    print(RESULT_MARK + json.dumps(figures), flush=True)


def run_fresh(script: str, argv: list[str]) -> tuple[dict | None, str]:
    """Run `script argv` in its own interpreter (a process's peak RSS is a lifetime maximum, so
    each measurement needs a fresh one); its `emit_result` figures, or None and its stderr tail."""
    done = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        return None, done.stderr[-3000:]
    return json.loads(lines[-1][len(RESULT_MARK) :]), ""


def _pss(process: psutil.Process) -> int:
    """Proportional set size: the kernel's one-line sum (smaps_rollup), not psutil's full smaps
    walk, which costs enough CPU on a 2-core machine to slow the run it measures."""
    try:
        for line in Path(f"/proc/{process.pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return process.memory_info().rss


def _process_label(process: psutil.Process) -> str:
    """A short name for a Ray process: the actor class (ray::ClientActor) or the daemon's script."""
    name = process.name()
    if name.startswith("ray::") or name in ("gcs_server", "raylet"):
        return name
    script = next((Path(a).stem for a in process.cmdline()[1:] if a.endswith(".py")), name)
    return f"ray {script}"


def _is_ray(process: psutil.Process) -> bool:
    """A process of a running Ray (daemons and workers), for runs attached to it."""
    try:
        name = process.name()
        return (
            name.startswith("ray::")
            or name in ("gcs_server", "raylet")
            or any("site-packages/ray/" in arg for arg in process.cmdline()[1:2])
        )
    except psutil.Error:
        return False


class PeakRss:
    """Samples the summed RSS (every 100 ms) and, with `pss=True`, the summed PSS (every 500 ms)
    of this process and its children (Ray's workers). The process list is refreshed every
    500 ms: walking /proc that often is what made the sampler cost the run it measures ~10 %."""

    def __init__(self, pss: bool = False, whole_ray: bool = False) -> None:
        self._whole_ray = whole_ray  # also every Ray process on the machine (attached to a running Ray)
        self.peak = 0
        self.peak_pss = 0
        self.breakdown: dict[str, int] = {}  # process name -> PSS, at the summed-PSS peak
        self._pss = pss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        tick = 0
        processes: list[psutil.Process] = [me]
        while not self._stop.is_set():
            slow_tick = tick % 5 == 0
            if slow_tick:
                processes = [me, *me.children(recursive=True)]
                if self._whole_ray:
                    processes += [p for p in psutil.process_iter() if p.pid != me.pid and _is_ray(p)]
            want_pss = self._pss and slow_tick
            total = total_pss = 0
            by_name: dict[str, int] = {}
            for p in processes:
                try:
                    total += p.memory_info().rss
                    if want_pss:
                        pss = _pss(p)
                        total_pss += pss
                        name = "driver" if p.pid == me.pid else _process_label(p)
                        by_name[name] = by_name.get(name, 0) + pss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            if total_pss > self.peak_pss:
                self.peak_pss, self.breakdown = total_pss, by_name
            tick += 1
            self._stop.wait(0.1)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def overrides(args: argparse.Namespace, out: str) -> list[str]:
    return [
        "algorithms=fedavg",
        f"num_clients={args.clients}",
        f"clients_per_round={args.per_round}",
        f"rounds={args.rounds}",
        "partition.scheme=dirichlet",
        "partition.alpha=0.5",
        "partition.min_size=20",
        f"train.local_epochs={args.local_epochs}",
        f"data.copies={args.copies}",
        "progress=false",
        f"out={out}",
        f"cache_dir={out}/cache",
        "run_id=bench",
        *([f"ray.address={args.ray_address}"] if args.ray_address else []),
    ]


@dataclass
class Measured:
    wall: float  # whole run
    rounds: float  # rounds 1..R
    rss: int
    pss: int
    eval: float  # of `rounds`, the evaluation of every client after each round
    breakdown: dict[str, int] = field(default_factory=dict)  # PSS per process at the peak (engine)
    fixed: dict[str, float] = field(default_factory=dict)  # the engine's fixed cost by part (its manifest)


def run_engine(args: argparse.Namespace, out: str) -> Measured:
    from sim.config import load_config
    from sim.orchestration.runner import run_comparison
    from sim.results import RUN_LEVEL, read_metrics

    cfg = load_config(None, overrides(args, out))
    with PeakRss(pss=True, whole_ray=bool(args.ray_address)) as mem:
        start = time.perf_counter()
        result = run_comparison(cfg)
        wall = time.perf_counter() - start
    df = read_metrics(result.run_dir).to_pandas()
    run = df[(df.client_id == RUN_LEVEL) & (df["round"] > 0)]
    rounds, evals = (float(run[run.metric == m].value.sum()) for m in ("wall_s", "eval_s"))
    fixed = json.loads((result.run_dir / "manifest.json").read_text()).get("fixed_s", {})
    round0 = float(df[(df.client_id == RUN_LEVEL) & (df["round"] == 0) & (df.metric == "wall_s")].value.sum())
    fixed = {**fixed, "round 0 (setup + evaluation)": round0}
    fixed["rest (imports, configure, results)"] = wall - rounds - sum(fixed.values())
    return Measured(wall, rounds, mem.peak, mem.peak_pss, evals, mem.breakdown, fixed)


def run_plain(args: argparse.Namespace, out: str) -> Measured:
    """The overhead-free reference: one process, one model, the same clients and epochs."""
    import torch.nn.functional as F

    from algorithms.base import Aggregator, ClientUpdate, load_weights, model_weights
    from sim.config import load_config
    from sim.data import load_dataset
    from sim.models import ModelSpec, build_model
    from sim.orchestration.partition_build import partition_for
    from sim.training import evaluate

    torch.set_num_threads(args.plain_threads)
    start = time.perf_counter()
    cfg = load_config(None, overrides(args, out))
    data = load_dataset(cfg.dataset, cfg.data)
    partition, _ = partition_for(cfg, data, 0)
    torch.manual_seed(0)
    model = build_model("small_cnn", ModelSpec(data.image_shape[0], data.num_classes, data.image_shape[1]))
    global_w = model_weights(model)
    rng = np.random.default_rng(0)

    def split(c: int, s: str) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.sort(partition.client_indices(c, s))
        return torch.from_numpy(data.images[idx]), torch.from_numpy(data.labels[idx])

    eval_seconds = [0.0]

    def eval_all() -> None:
        began = time.perf_counter()
        load_weights(model, global_w)
        for c in range(args.clients):
            for s in ("val", "test"):
                evaluate(model, *split(c, s))
        eval_seconds[0] += time.perf_counter() - began

    eval_all()
    eval_seconds[0] = 0.0
    rounds_start = time.perf_counter()
    for _ in range(args.rounds):
        selected = np.sort(rng.choice(args.clients, size=args.per_round, replace=False))
        agg = Aggregator()
        for c in selected:
            load_weights(model, global_w)
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
            x, y = split(int(c), "train")
            for _ in range(cfg.train.local_epochs):
                order = torch.randperm(len(y))
                for s in range(0, len(y), cfg.train.batch_size):
                    idx = order[s : s + cfg.train.batch_size]
                    opt.zero_grad()
                    F.cross_entropy(model(x[idx]), y[idx]).backward()
                    opt.step()
            agg.add(ClientUpdate(int(c), model_weights(model), float(len(y))))
        global_w = agg.mean(global_w)
        eval_all()
    end = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return Measured(end - start, end - rounds_start, peak, peak, eval_seconds[0])


def break_even(e: Measured, p: Measured) -> str:
    """The engine's extra fixed cost (Ray and actor start-up, shutdown) and the job size from which
    its faster rounds pay for it: whole-run ratio ≤ 1 once the plain rounds take longer than
    fixed / (1 - rounds ratio), e.g. with more rounds, clients or local epochs."""
    fixed = (e.wall - e.rounds) - (p.wall - p.rounds)
    ratio = e.rounds / p.rounds
    if ratio >= 1:
        return f"engine fixed cost {fixed:.1f} s; its rounds are not faster here, so no break-even"
    return (
        f"engine fixed cost {fixed:.1f} s more than plain; rounds ratio {ratio:.2f}: the whole run is "
        f"faster through the engine once the plain rounds take over {fixed / (1 - ratio):.0f} s"
    )


def measure_in_fresh_process(side: str, argv: list[str]) -> Measured:
    """One side in its own interpreter, so it carries none of the other side's leftovers."""
    figures, error = run_fresh(__file__, [*argv, "--only", side, "--json"])
    if figures is None:
        raise SystemExit(f"the {side} side failed:\n{error}")
    return Measured(**figures)


def cores() -> int:
    """The cores this process may run on (the machine's, unless an affinity mask narrows them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def efficiency(e: Measured, p: Measured, threads: int) -> str:
    """The engine's share of the machine's cores doing the reference's work; only meaningful
    against a one-thread reference (one core's worth of work)."""
    n = cores()
    eff = p.rounds / e.rounds / n
    note = "" if threads == 1 else f" (reference has {threads} threads: not a one-core figure)"
    return (
        f"parallel efficiency: plain-{threads}-thread rounds / engine rounds / {n} cores = {eff:.2f}{note}; "
        f"engine rounds = {e.rounds / p.rounds:.2f} x plain-{threads}-thread (physical limit {1 / n:.2f})"
    )


def describe(side: str, m: Measured, threads: int = 1) -> str:
    mib = 2**20
    if side == "plain":
        return (
            f"plain ({threads} thread{'s' if threads > 1 else ''}): whole run {m.wall:7.1f} s  rounds {m.rounds:6.1f} s (eval {m.eval:5.1f})  "
            f"peak RSS {m.rss / mib:6.0f} MiB"
        )
    return (
        f"engine: whole run {m.wall:7.1f} s  rounds {m.rounds:6.1f} s (eval {m.eval:5.1f})  "
        f"peak RSS sum {m.rss / mib:6.0f} MiB  PSS sum {m.pss / mib:6.0f} MiB (driver + Ray processes)\n"
        "        PSS at the peak (MiB): "
        + ", ".join(f"{name} {size / mib:.0f}" for name, size in sorted(m.breakdown.items(), key=lambda kv: -kv[1]))
        + "\n        outside the rounds (s): "
        + ", ".join(f"{name} {seconds:.2f}" for name, seconds in m.fixed.items())
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--copies", type=int, default=1, help="data.copies: more samples per client")
    parser.add_argument(
        "--ray-address",
        help="attach the engine to a running Ray (e.g. 'auto' after "
        "`ray start --head`): no Ray start-up or shutdown in its whole run",
    )
    parser.add_argument(
        "--plain-threads", type=int, default=1, help="torch threads of the plain loop (1: the one-core reference)"
    )
    parser.add_argument("--only", choices=("engine", "plain"), help="measure one side, in this process")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        with tempfile.TemporaryDirectory() as out:
            m = run_engine(args, out) if args.only == "engine" else run_plain(args, out)
        print(describe(args.only, m, args.plain_threads))
        if args.json:
            emit_result(dataclasses.asdict(m))
        return
    print(
        f"FedAvg, {args.clients} clients, {args.per_round}/round, {args.rounds} rounds, "
        f"{args.local_epochs} local epoch(s), data.copies={args.copies}; each side in a fresh process"
        + (f"; engine attached to the Ray at {args.ray_address}" if args.ray_address else "")
    )
    argv = [
        f"--clients={args.clients}",
        f"--per-round={args.per_round}",
        f"--rounds={args.rounds}",
        f"--local-epochs={args.local_epochs}",
        f"--copies={args.copies}",
        f"--plain-threads={args.plain_threads}",
        *([f"--ray-address={args.ray_address}"] if args.ray_address else []),
    ]
    e = measure_in_fresh_process("engine", argv)
    print(describe("engine", e))
    p = measure_in_fresh_process("plain", argv)
    print(describe("plain", p, args.plain_threads))
    print(
        f"ratio engine/plain: wall {e.wall / p.wall:.2f} (rounds only {e.rounds / p.rounds:.2f})  "
        f"memory RSS {e.rss / p.rss:.2f} (PSS {e.pss / p.rss:.2f})"
    )
    print(efficiency(e, p, args.plain_threads))
    print(break_even(e, p))


if __name__ == "__main__":
    main()
