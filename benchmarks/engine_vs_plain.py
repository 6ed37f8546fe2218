"""Engine overhead: the same FedAvg workload through the Ray engine and as a plain PyTorch loop.

    .venv/bin/python benchmarks/engine_vs_plain.py [--clients 100 --per-round 10 --rounds 5]

Prints wall time and peak memory of each and the ratio engine/plain (target ≤ 1.0 on 2
cores: the engine spreads clients over both cores, the plain loop is one process with torch's
default threads). Both do identical work: same data, partition, model, local epochs, and the
global model evaluated on every client's val and test splits each round.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import psutil  # noqa: E402  (a Ray dependency)
import torch  # noqa: E402


class PeakRss:
    """Samples the summed RSS of this process and its children (Ray's workers) every 50 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def overrides(args: argparse.Namespace, out: str) -> list[str]:
    return [
        "algorithms=fedavg", f"num_clients={args.clients}", f"clients_per_round={args.per_round}",
        f"rounds={args.rounds}", "partition.scheme=dirichlet", "partition.alpha=0.5", "partition.min_size=20",
        "progress=false", f"out={out}", f"cache_dir={out}/cache", "run_id=bench",
    ]


def run_engine(args: argparse.Namespace, out: str) -> tuple[float, int]:
    from sim.config import load_config
    from sim.runner import run_comparison

    cfg = load_config(None, overrides(args, out))
    with PeakRss() as mem:
        start = time.perf_counter()
        run_comparison(cfg)
        wall = time.perf_counter() - start
    return wall, mem.peak


def run_plain(args: argparse.Namespace, out: str) -> tuple[float, int]:
    """The overhead-free reference: one process, one model, the same clients and epochs."""
    import torch.nn.functional as F

    from algorithms.base import Aggregator, ClientUpdate, load_weights, model_weights
    from sim.config import load_config
    from sim.data import load_dataset
    from sim.models import ModelSpec, build_model
    from sim.partition_build import partition_for
    from sim.training import evaluate

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

    def eval_all() -> None:
        load_weights(model, global_w)
        for c in range(args.clients):
            for s in ("val", "test"):
                evaluate(model, *split(c, s))

    eval_all()
    for _ in range(args.rounds):
        selected = np.sort(rng.choice(args.clients, size=args.per_round, replace=False))
        agg = Aggregator()
        for c in selected:
            load_weights(model, global_w)
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
            x, y = split(int(c), "train")
            order = torch.randperm(len(y))
            for s in range(0, len(y), cfg.train.batch_size):
                idx = order[s:s + cfg.train.batch_size]
                if len(idx) < 2:
                    continue
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
            agg.add(ClientUpdate(int(c), model_weights(model), float(len(y))))
        global_w = agg.mean(global_w)
        eval_all()
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return wall, peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", choices=("engine", "plain"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        if args.only != "plain":
            e_wall, e_mem = run_engine(args, out)
            print(f"engine: {e_wall:7.1f} s  peak RSS (driver + Ray processes) {e_mem / 2**20:7.0f} MiB")
        if args.only != "engine":
            p_wall, p_mem = run_plain(args, out)
            print(f"plain : {p_wall:7.1f} s  peak RSS {p_mem / 2**20:7.0f} MiB")
        if args.only is None:
            print(f"ratio engine/plain: wall {e_wall / p_wall:.2f}  memory {e_mem / p_mem:.2f}")


if __name__ == "__main__":
    main()
