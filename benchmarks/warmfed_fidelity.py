"""Per-client fidelity of WarmFed's synthetic samples: base backbone beside client LoRA.

    .venv/bin/python benchmarks/warmfed_fidelity.py --dataset font-digits --split val
    .venv/bin/python benchmarks/warmfed_fidelity.py --dataset font-digits --split test   # report only

One client per domain (``--clients-per-domain`` splits a domain IID). Each domain's real images
are split once (seeded) into client train / val / test: the client's LoRA trains on its train
part; the fidelity judges (algorithms/warmfed/fidelity.py) are fitted on the real images of
the chosen split of every domain, and the synthesis seeds differ between val and test. Choose
settings with ``--split val``; quote ``--split test``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch


def split_domains(domains: np.ndarray, train_per_domain: int, eval_per_domain: int, seed: int):
    """{domain: (train, val, test) index arrays}; val and test have ``eval_per_domain`` images each."""
    rng = np.random.default_rng([seed, 7])
    out = {}
    for d in np.unique(domains):
        idx = rng.permutation(np.flatnonzero(domains == d))
        if idx.size < train_per_domain + 2 * eval_per_domain:
            raise SystemExit(
                f"domain {d} has {idx.size} images, fewer than train + 2 x eval "
                f"({train_per_domain} + 2 x {eval_per_domain})"
            )
        out[int(d)] = (
            idx[:train_per_domain],
            idx[train_per_domain : train_per_domain + eval_per_domain],
            idx[train_per_domain + eval_per_domain : train_per_domain + 2 * eval_per_domain],
        )
    return out


def public_look(ds, augment: str | None) -> np.ndarray | None:
    """What the backbone was pretrained on, as the domain judge's "public" class (a photometric
    backbone's random colours have no fixed look: its public class is the plain images)."""
    if ds.public is None:
        return None
    x = np.asarray(ds.public.images)
    return np.concatenate([x, -x]) if augment == "polarity" else x


def main(argv: list[str] | None = None) -> int:
    from algorithms.warmfed.diffusion import (
        DEFAULT_GUIDANCE_SCALE,
        SAMPLERS,
        TinyBackbone,
        TinyBackboneConfig,
        get_or_pretrain_tiny_backbone,
    )
    from algorithms.warmfed.fidelity import FidelityJudges, JudgeConfig, format_table
    from algorithms.warmfed.lora import LORA_DEFAULTS, LoraConfig, apply_lora, train_client_lora
    from algorithms.warmfed.pixel_map import PixelStats, auto_pixel_map
    from algorithms.warmfed.synthesis import save_sample_grid, synthesize
    from sim.data import load_dataset

    d = LORA_DEFAULTS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="font-digits")
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--backbone", type=Path, help="a saved tiny backbone directory (default: cache/asset/pretrain)")
    ap.add_argument("--cache-dir", type=Path, default=Path("results/cache"))
    ap.add_argument("--pretrain-steps", type=int, help="backbone train_steps (as algo.warmfed.pretrain_steps)")
    ap.add_argument(
        "--pretrain-augment",
        choices=("none", "photometric", "polarity", "textures"),
        help="backbone augment (as algo.warmfed.pretrain_augment)",
    )
    ap.add_argument("--backbone-channels", help="comma list of UNet widths (as algo.warmfed.backbone_channels)")
    ap.add_argument("--train-per-domain", type=int, default=240, help="real images a client trains its LoRA on")
    ap.add_argument("--clients-per-domain", type=int, default=1)
    ap.add_argument("--domains", help="comma list: train LoRA clients for these domains only (judges see all)")
    ap.add_argument("--eval-per-domain", type=int, default=300)
    ap.add_argument("--lora-steps", type=int, default=d.steps)
    ap.add_argument("--lora-lr", type=float, default=d.lr)
    ap.add_argument("--lora-batch", type=int, default=d.batch_size)
    ap.add_argument("--rank", type=int, default=d.rank)
    ap.add_argument("--embeddings", action=argparse.BooleanOptionalAction, default=d.include_embeddings)
    ap.add_argument("--resnet-convs", action=argparse.BooleanOptionalAction, default=d.include_resnet_convs)
    ap.add_argument("--io-convs", action=argparse.BooleanOptionalAction, default=d.include_io_convs)
    ap.add_argument(
        "--samplers",
        default="dpm++:10",
        help=f"comma list of sampler:steps ({', '.join(SAMPLERS)}); every one is scored, the first is the main row",
    )
    ap.add_argument(
        "--pixel-map",
        choices=("auto", "none", "moments"),
        default="auto",
        help="LoRA on the client's images mapped onto the public look; auto as WarmFed's lora_pixel_map "
        "(on for a backbone pretrained with augment none)",
    )
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE_SCALE, help="(default: as WarmFed)")
    ap.add_argument("--per-class", type=int, default=10, help="synthetic images per class and client")
    ap.add_argument(
        "--public-domain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the domain judge also learns the public look, so unadapted samples count as no client's domain",
    )
    ap.add_argument("--judge", choices=("cnn", "logreg"), default="cnn")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grids", type=Path, help="write base/LoRA sample grids here")
    ap.add_argument("--json", type=Path, help="write the full report here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    samplers = []
    for item in args.samplers.split(","):
        name, _, steps = item.partition(":")
        samplers.append((name, int(steps or 10)))

    ds = load_dataset(args.dataset)
    if args.backbone:
        bb = TinyBackbone.load(args.backbone)
    else:
        pub = ds.public
        if pub is None:
            raise SystemExit(f"dataset {args.dataset} has no public split to pretrain the backbone on")
        steps: dict[str, Any] = {"train_steps": args.pretrain_steps} if args.pretrain_steps else {}
        if args.pretrain_augment:
            steps["augment"] = args.pretrain_augment
        if args.backbone_channels:
            steps["block_out_channels"] = tuple(int(c) for c in args.backbone_channels.split(","))
        bb, where, trained = get_or_pretrain_tiny_backbone(
            args.cache_dir, pub.images, pub.labels, TinyBackboneConfig(**steps), pub.fingerprint()
        )
        print(f"backbone {bb.name} from {where}{' (pretrained now)' if trained else ''}", flush=True)
    splits = split_domains(ds.domains, args.train_per_domain, args.eval_per_domain, args.seed)
    which = 1 if args.split == "val" else 2
    real = np.concatenate([s[which] for s in splits.values()])
    t0 = time.perf_counter()
    judges = FidelityJudges(
        ds.images[real],
        ds.labels[real],
        ds.domains[real],
        JudgeConfig(kind=args.judge, seed=args.seed),
        num_classes=ds.num_classes,
        num_domains=ds.num_domains,
        public_x=public_look(ds, args.pretrain_augment) if args.public_domain else None,
    )
    print(
        f"judges ({args.judge}) on {len(real)} real {args.split} images: {time.perf_counter() - t0:.1f} s; "
        f"held-out real accuracy class {judges.judge_class_accuracy:.3f} domain {judges.judge_domain_accuracy:.3f}",
        flush=True,
    )

    pixel_map = args.pixel_map
    if pixel_map == "auto":
        pixel_map = auto_pixel_map(bb.cfg.augment == "none", ds.public is not None, private=False)
    cfg = LoraConfig(
        rank=args.rank,
        steps=args.lora_steps,
        lr=args.lora_lr,
        batch_size=args.lora_batch,
        include_embeddings=args.embeddings,
        include_resnet_convs=args.resnet_convs,
        include_io_convs=args.io_convs,
        pixel_map=pixel_map,
    )
    if pixel_map != "none" and ds.public is None:
        raise SystemExit(f"--pixel-map {pixel_map} needs a public split; dataset {args.dataset} has none")
    reference = PixelStats.of(ds.public.images) if pixel_map != "none" else None
    want = np.full(ds.num_classes, args.per_class)
    sets: dict[str, dict[str, list]] = {}
    lora_seconds, sample_rate = [], {}
    client = 0
    only = None if not args.domains else {ds.domain_names.index(n) for n in args.domains.split(",")}
    for dom, (train, _, _) in splits.items():
        if only is not None and dom not in only:
            continue
        for part in np.array_split(train, args.clients_per_domain):
            seed = (1000 if args.split == "val" else 2000) + client
            t = time.perf_counter()
            up = train_client_lora(
                bb,
                ds.images[part],
                ds.labels[part],
                LoraConfig(**{**cfg.to_dict(), "seed": client}),
                reference=reference,
            )
            lora_seconds.append(time.perf_counter() - t)
            for name, steps in samplers:
                tag = f"{name}:{steps}"
                with apply_lora(bb, up) as personalized:
                    t = time.perf_counter()
                    x, y = synthesize(
                        personalized, want, steps=steps, guidance_scale=args.guidance, seed=seed, sampler=name
                    )
                    sample_rate.setdefault(tag, []).append(len(y) / (time.perf_counter() - t))
                xb, yb = synthesize(bb, want, steps=steps, guidance_scale=args.guidance, seed=seed, sampler=name)
                for label, (xs, ys) in ((f"LoRA {tag}", (x, y)), (f"base {tag}", (xb, yb))):
                    s = sets.setdefault(label, {"x": [], "y": [], "d": [], "c": []})
                    (
                        s["x"].append(xs),
                        s["y"].append(ys),
                        s["d"].append(np.full(len(ys), dom)),
                        s["c"].append(np.full(len(ys), client)),
                    )
                if args.grids and (name, steps) == samplers[0]:
                    pick = np.concatenate([np.flatnonzero(y == c)[:3] for c in range(ds.num_classes)])
                    save_sample_grid(
                        np.concatenate([ds.images[part][:30], x[pick], xb[pick]]),
                        None,
                        args.grids / f"client{client}_{ds.domain_names[dom]}.png",
                        nrow=30,
                        title=f"client {client} ({ds.domain_names[dom]}): real / LoRA / base",
                    )
            print(
                f"client {client} ({ds.domain_names[dom]}): LoRA {lora_seconds[-1]:.1f} s, "
                f"loss {up.info['first_loss']:.3f} -> {up.info['final_loss']:.3f}",
                flush=True,
            )
            client += 1
    reports = {}
    for label, s in sets.items():
        reports[label] = judges.report(
            np.concatenate(s["x"]),
            np.concatenate(s["y"]),
            np.concatenate(s["d"]),
            synth_client=np.concatenate(s["c"]),
            domain_names=ds.domain_names,
        )
    print(f"\n## {args.dataset}, split {args.split}; LoRA {cfg.to_dict()}; guidance {args.guidance}\n")
    print(format_table(reports))
    rates = {k: float(np.mean(v)) for k, v in sample_rate.items()}
    print(
        f"\nLoRA seconds per client: {np.mean(lora_seconds):.1f} ± {np.std(lora_seconds):.1f} "
        f"({args.lora_steps} steps x {args.lora_batch}, {torch.get_num_threads()} torch threads); "
        + "; ".join(f"sampler {k}: {v:.1f} images/s" for k, v in rates.items())
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "lora": cfg.to_dict(),
                    "lora_seconds": lora_seconds,
                    "images_per_s": rates,
                    "reports": reports,
                },
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
