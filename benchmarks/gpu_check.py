"""One command that says whether the GPU path works on this machine.

    .venv/bin/python benchmarks/gpu_check.py                 # on a machine with a CUDA GPU
    .venv/bin/python benchmarks/gpu_check.py --logical-gpu   # no GPU: Ray's placement only

On one GPU it runs, in a few minutes:
  1. FedAvg with 4 client actors sharing the GPU (0.25 each), and the same run on CPU actors;
  2. FedAvg with 8 client actors sharing the GPU (0.125 each);
  3. the tiny WarmFed end to end, server and client shares set by `auto`;
  4. a random-weights tiny Stable Diffusion pipeline (built offline), fp32 and fp16, GPU and CPU.
For every run it prints each actor's device, Ray's GPU ids, CUDA_VISIBLE_DEVICES and peak GPU
memory (from the run's manifest), the throughput against the CPU, and one PASS/FAIL line per
check. Exit status: 0 all passed, 1 a check failed, 2 no CUDA GPU (nothing was checked).

`--logical-gpu` starts Ray with one logical GPU on a GPU-less machine: the placement checks
(ids, CUDA_VISIBLE_DEVICES, the server's share) are real, the CUDA ones are reported as SKIP.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402 -- after the environment defaults above, which torch and Ray read at import

RESULTS: list[tuple[str, str, str]] = []  # (status, check, detail)


def report(name: str, ok: bool | None, detail: str) -> None:
    """ok None: skipped (needs a real GPU)."""
    status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    RESULTS.append((status, name, detail))
    print(f"{status} {name}: {detail}", flush=True)


def run(items: list[str], out: Path) -> tuple[Path, Any]:
    """One comparison through the public API on the Ray this script started; (run dir, metrics frame)."""
    from sim.config import load_config
    from sim.orchestration.runner import run_comparison
    from sim.results import read_metrics

    cfg = load_config(None, [*items, "progress=false", f"out={out}", f"cache_dir={out / 'cache'}"])
    run_dir = run_comparison(cfg).run_dir
    return run_dir, read_metrics(run_dir).to_pandas()


def devices_of(run_dir: Path) -> dict[str, dict]:
    return json.loads((run_dir / "manifest.json").read_text())["devices"]


def print_devices(devices: dict[str, dict]) -> None:
    for name, d in devices.items():
        memory = f"{d['gpu_peak_memory_mb']:.1f} MiB peak" if "gpu_peak_memory_mb" in d else "no GPU memory"
        print(
            f"    {name:9s} device={d.get('device')} gpu_ids={d.get('gpu_ids')} "
            f"CUDA_VISIBLE_DEVICES={d.get('cuda_visible_devices')!r} {memory}"
        )


def updates_per_s(df: Any) -> float:
    """Client updates per second of the training phases (rounds 1..R), from the run's own clocks."""
    rows = df[(df.client_id == -1) & (df["round"] > 0)]
    clients = rows[rows.metric == "clients"].value.sum()
    seconds = rows[rows.metric == "train_s"].value.sum()
    return float(clients / seconds) if seconds > 0 else math.nan


def final_acc(df: Any) -> float:
    last = df["round"].max()
    sel = df[(df.metric == "global_acc") & (df.split == "test") & (df["round"] == last)]
    return float(sel.value.mean())


def placed_on_gpu(devices: dict[str, dict], names: list[str], real: bool) -> tuple[bool, str]:
    """Every named actor holds a Ray GPU id, sees it in CUDA_VISIBLE_DEVICES and (real GPU) computes on CUDA."""
    bad = []
    for name in names:
        d = devices.get(name, {})
        ids, visible = d.get("gpu_ids") or [], d.get("cuda_visible_devices") or ""
        if not ids or visible.split(",")[:1] != ids[:1] or (real and not str(d.get("device", "")).startswith("cuda")):
            bad.append(f"{name}: device={d.get('device')} gpu_ids={ids} CUDA_VISIBLE_DEVICES={visible!r}")
    return not bad, "; ".join(
        bad
    ) or f"{len(names)} actors on GPU {sorted({d['gpu_ids'][0] for d in devices.values() if d.get('gpu_ids')})}"


SIZE = {"clients": 40, "rounds": 3}  # --logical-gpu: smaller (only the placement is checked there)


def fedavg_items(actors: int, gpus_each: float, cpus_each: float) -> list[str]:
    return [
        "algorithms=fedavg",
        f"num_clients={SIZE['clients']}",
        f"clients_per_round={SIZE['clients']}",
        f"rounds={SIZE['rounds']}",
        f"eval.every={SIZE['rounds']}",
        f"client_resources.num_gpus={gpus_each:g}",
        f"client_resources.num_cpus={cpus_each:g}",
        f"ray.pool_size={actors}",
        "server_resources.num_gpus=0",
    ]


def cpu_reference(out: Path, cpus: int) -> dict:
    """The same FedAvg on one CPU actor per core: what the GPU runs are measured against."""
    _, df = run(fedavg_items(cpus, 0.0, 1.0), out / "fedavg-cpu")
    return {"updates_per_s": updates_per_s(df), "acc": final_acc(df), "actors": cpus}


def check_fedavg(out: Path, actors: int, cpus: int, real: bool, cpu_ref: dict) -> None:
    """FedAvg with `actors` client actors sharing one GPU."""
    share = 1.0 / actors
    run_dir, df = run(fedavg_items(actors, share, min(1.0, cpus / actors)), out / f"fedavg{actors}")
    devices = devices_of(run_dir)
    print(f"  FedAvg, {actors} actors x {share:g} GPU:")
    print_devices(devices)
    clients = [n for n in devices if n.startswith("client")]
    ok, detail = placed_on_gpu(devices, clients, real)
    report(f"fedavg-{actors}-actors placement", ok and len(clients) == actors, detail)
    rate, acc = updates_per_s(df), final_acc(df)
    print(
        f"    throughput {rate:.1f} client updates/s vs {cpu_ref['updates_per_s']:.1f} on {cpu_ref['actors']} "
        f"CPU actors ({rate / cpu_ref['updates_per_s']:.2f}x{'' if real else ', both on CPU here'}); "
        f"final global test acc {acc:.3f} "
        f"vs {cpu_ref['acc']:.3f} on CPU"
    )
    report(
        f"fedavg-{actors}-actors result",
        abs(acc - cpu_ref["acc"]) <= 0.05 and math.isfinite(rate),
        f"accuracy {acc:.3f} (CPU {cpu_ref['acc']:.3f}, must agree within 0.05)",
    )


def check_warmfed(out: Path, cpus: int, real: bool) -> None:
    items = [
        "algorithms=warmfed",
        "num_clients=4",
        "clients_per_round=4",
        "rounds=1",
        "data.domains=plain,inverted",
        "train.finetune_epochs=1",
        "algo.warmfed.lora_steps=3",
        "algo.warmfed.lora_batch_size=16",
        "algo.warmfed.synth_per_class=3",
        "algo.warmfed.sampler_steps=3",
        "algo.warmfed.server_epochs=2",
        "client_resources.num_gpus=auto",
        f"client_resources.num_cpus={max(0.25, min(1.0, cpus / 4)):g}",
        "server_resources.num_gpus=auto",
        "mixed_precision=fp16",
    ]
    started = time.perf_counter()
    run_dir, df = run(items, out / "warmfed")
    seconds = time.perf_counter() - started
    devices = devices_of(run_dir)
    print("  tiny WarmFed (auto shares):")
    print_devices(devices)
    ok, detail = placed_on_gpu(devices, list(devices), real)
    report("warmfed placement (server and clients share the GPU)", ok, detail)
    run_rows = df[df.client_id == -1].set_index("metric").value
    images = float(run_rows.get("synthesis/images", 0.0))
    acc = df[(df.metric == "personal_acc") & (df.split == "test")].value
    finite = bool(len(acc)) and bool(acc.notna().all())
    report(
        "warmfed end to end",
        images > 0 and finite,
        f"{images:.0f} synthetic images, personalized test acc {acc.mean():.3f}, whole run {seconds:.0f} s",
    )


def check_stable_diffusion(out: Path, real: bool) -> None:
    """The diffusers stack on this GPU: a random-weights tiny pipeline, fp32 and fp16, against the CPU."""
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline

    from tests.test_warmfed_diffusion import _build_tiny_sd

    for lib in (diffusers, transformers):  # their progress bars and notices would bury the check lines
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    path = _build_tiny_sd(out / "tiny-sd")
    pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["digit 3"] * 16  # the tiny tokenizer is character-level, 16 tokens long

    def sample(device: str, dtype: torch.dtype) -> tuple[Any, float]:
        p = pipe.to(device, dtype)
        p(prompts[:2], num_inference_steps=2, height=16, width=16, output_type="np")  # warm-up (kernels, caches)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        gen = torch.Generator("cpu").manual_seed(0)
        images = p(prompts, num_inference_steps=10, height=16, width=16, output_type="np", generator=gen).images
        if device == "cuda":
            torch.cuda.synchronize()
        return images, len(prompts) / (time.perf_counter() - start)

    cpu_images, cpu_rate = sample("cpu", torch.float32)
    print(f"  tiny Stable Diffusion (random weights, 16x16, 10 steps): CPU {cpu_rate:.1f} images/s")
    if not real:
        report("stable-diffusion on GPU", None, "needs a CUDA GPU (CPU sampling ran: the pipeline builds offline)")
        return
    torch.cuda.reset_peak_memory_stats()
    for dtype in (torch.float32, torch.float16):
        images, rate = sample("cuda", dtype)
        memory = torch.cuda.max_memory_allocated() / 2**20
        finite = images.shape == cpu_images.shape and bool(torch.isfinite(torch.from_numpy(images)).all())
        print(f"    cuda {str(dtype)[6:]}: {rate:.1f} images/s ({rate / cpu_rate:.2f}x CPU), {memory:.1f} MiB peak")
        report(f"stable-diffusion on GPU ({str(dtype)[6:]})", finite, f"{images.shape} finite images, {rate:.1f}/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logical-gpu", action="store_true", help="no GPU here: check placement on a logical GPU")
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress shows as it happens
    real = torch.cuda.is_available() and torch.cuda.device_count() > 0
    print(f"torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}), cuda available: {real}")
    if not real and not args.logical_gpu:
        print(
            "NO GPU: torch sees no CUDA device on this machine, so there is nothing to check. On a GPU machine "
            "install a CUDA build of torch (README, 'GPUs'); here, --logical-gpu checks Ray's placement only."
        )
        return 2
    if real:
        print(
            f"GPU 0: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB"
        )
    import ray

    cpus = os.cpu_count() or 1
    if not real:
        SIZE.update(clients=12, rounds=2)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    started = time.perf_counter()
    # one GPU (logical or real) and at least 8 logical CPUs, so 8 fractional actors can start
    ray.init(address="local", num_cpus=max(cpus, 8), num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        cpu_ref = cpu_reference(out, cpus)
        for actors in (4, 8):
            check_fedavg(out, actors, cpus, real, cpu_ref)
        check_warmfed(out, cpus, real)
    finally:
        ray.shutdown()
    check_stable_diffusion(out, real)
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)
    failed = [r for r in RESULTS if r[0] == "FAIL"]
    skipped = [r for r in RESULTS if r[0] == "SKIP"]
    mode = "" if real else " (logical GPU: placement checked, CUDA not exercised)"
    print(
        f"gpu_check: {len(RESULTS) - len(failed) - len(skipped)} passed, {len(failed)} failed, "
        f"{len(skipped)} skipped in {time.perf_counter() - started:.0f} s{mode}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
