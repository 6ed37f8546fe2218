"""Scale: throughput and memory at 100, 1,000 and 10,000 clients (FedAvg, or any algorithms).

    .venv/bin/python benchmarks/scale.py [--scales 100:10,1000:100,10000:100] [--rounds 5] [--eval-clients 100]
    .venv/bin/python benchmarks/scale.py --algorithms ditto,fedrep --scales 10000:100   # stateful pFL

Every scale runs in a fresh process (its own local Ray) on the same data — digits-domains with
`copies` renders, `partition.min_size=3`, so 10,000 clients fit — with evaluation on a seeded
subset of `--eval-clients` clients every round. Printed per scale:

- rounds/s: training rounds (train + evaluation of the subset) per second of round wall time;
- updates/s: client updates per second of training time (clients hold fewer samples at larger
  scales: 10,000 clients have ~5 samples each, 100 clients ~500, so this is not a like-for-like rate);
- driver peak RSS (the high-water mark of the driver process itself) and run peak RSS (driver +
  every Ray process it started, sampled every 100 ms by engine_vs_plain.PeakRss; pages of the shared
  object store count once per process that maps them, so this over-counts);
- other s: the run's wall time outside rounds 1..R (data, partition, Ray start, actor pool, round-0
  evaluation, report, Ray shutdown); benchmarks/startup.py measures start-up on its own;
- state MiB: the per-client state stateful methods keep on disk (Ditto's personal models, FedRep's
  heads), none of it in the driver.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def overrides(clients: int, per_round: int, args: argparse.Namespace, out: str) -> list[str]:
    return [
        f"algorithms={args.algorithm}",
        f"num_clients={clients}",
        f"clients_per_round={per_round}",
        f"rounds={args.rounds}",
        "partition.min_size=3",
        f"data.copies={args.copies}",
        f"eval.max_clients={args.eval_clients}",
        "progress=false",
        f"out={out}",
        f"cache_dir={out}/cache",
        "run_id=scale",
    ]


def one(clients: int, per_round: int, args: argparse.Namespace) -> dict:
    """Run one scale in this process and return its figures."""
    import resource

    from engine_vs_plain import PeakRss

    from sim.config import load_config
    from sim.orchestration.runner import run_comparison
    from sim.results import RUN_LEVEL, read_metrics

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, overrides(clients, per_round, args, out))
        with PeakRss() as mem:
            start = time.perf_counter()
            run_dir = run_comparison(cfg).run_dir
            wall = time.perf_counter() - start
        df = read_metrics(run_dir).to_pandas()
        state_bytes = sum(f.stat().st_size for f in (run_dir / "client_state").rglob("*") if f.is_file())
    run = df[(df.client_id == RUN_LEVEL) & (df["round"] >= 1)].pivot_table(
        index="round", columns="metric", values="value"
    )
    round_s = float(run["wall_s"].sum())
    updates = float(run["clients"].sum())
    return {
        "algorithm": args.algorithm,
        "clients": clients,
        "per_round": per_round,
        "rounds": args.rounds,
        "rounds_per_s": args.rounds / round_s,
        "updates_per_s": updates / float(run["train_s"].sum()),
        "eval_s_per_round": float(run["eval_s"].mean()),
        "driver_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "run_peak_mib": mem.peak / 2**20,
        "wall_s": wall,
        "other_s": wall - round_s,
        "state_mib": state_bytes / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="100:10,1000:100,10000:100", help="clients:per_round,...")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--eval-clients", type=int, default=100)
    parser.add_argument("--copies", type=int, default=7, help="digits-domains renders (7 → 50,330 samples)")
    parser.add_argument("--algorithms", default="fedavg", help="comma-separated; each runs at every scale")
    parser.add_argument("--algorithm", help=argparse.SUPPRESS)  # internal: the one algorithm of --one
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one scale, print JSON
    args = parser.parse_args()
    from engine_vs_plain import emit_result, run_fresh

    if args.one:
        clients, per_round = map(int, args.one.split(":"))
        emit_result(one(clients, per_round, args))
        return

    print(
        f"{args.algorithms}, small_cnn, digits-domains ×{args.copies} copies, {args.rounds} rounds, "
        f"evaluation on {args.eval_clients} clients per round; {os.cpu_count()} CPUs"
    )
    print(
        f"{'algorithm':>10} {'clients':>8} {'/round':>6} {'rounds/s':>9} {'updates/s':>10} {'eval s/rnd':>10} "
        f"{'driver MiB':>10} {'run MiB':>8} {'other s':>8} {'wall s':>7} {'state MiB':>9}"
    )
    for algorithm, scale in [(a, s) for a in args.algorithms.split(",") for s in args.scales.split(",")]:
        r, error = run_fresh(
            __file__,
            [
                "--one",
                scale,
                "--algorithm",
                algorithm,
                "--rounds",
                str(args.rounds),
                "--eval-clients",
                str(args.eval_clients),
                "--copies",
                str(args.copies),
            ],
        )
        if r is None:
            print(f"{algorithm} {scale}: failed\n{error}")
            continue
        print(
            f"{r['algorithm']:>10} {r['clients']:>8,} {r['per_round']:>6} {r['rounds_per_s']:>9.2f} {r['updates_per_s']:>10.1f} "
            f"{r['eval_s_per_round']:>10.2f} {r['driver_peak_mib']:>10.0f} {r['run_peak_mib']:>8.0f} "
            f"{r['other_s']:>8.1f} {r['wall_s']:>7.1f} {r['state_mib']:>9.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
