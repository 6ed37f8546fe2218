"""Regenerate the committed default tiny backbone from the public split of the digits.

    python -m algorithms.warmfed.pretrain_default [--out DIR] [--threads N]
    python -m algorithms.warmfed.pretrain_default --dataset font-digits [--cache-dir results/cache] [--steps N]

The second form pretrains the backbone of another dataset's public split into the run cache
(``<cache>/backbones/<key>``, the entry WarmFed's backbone phase looks up first), with a
progress bar, so a first run on that dataset does not pretrain.

Writes ``tiny_backbone.safetensors`` (fp16) and ``tiny_backbone.json`` into
``algorithms/warmfed/assets/`` (package data). The json records the config, its key
(config + fingerprint of the public data), the weights fingerprint, the training time and
the sample class accuracy measured here. ``get_or_pretrain_tiny_backbone`` uses the asset
only when that key equals the one asked for; otherwise it pretrains into the cache.

The public data is ``load_dataset("digits-domains").public`` (the 20 % stratified hold-out
rendered plain, white on black); its ``fingerprint()`` is the data fingerprint of the key.
If that module is unavailable the same split is rendered here (sklearn digits, 8x8 -> 16x16
bilinear, stratified 20 % with seed 0) and fingerprinted with ``array_fingerprint``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from algorithms.warmfed.diffusion import (
    DEFAULT_ASSET_DIR,
    DEFAULT_GUIDANCE_SCALE,
    TinyBackbone,
    TinyBackboneConfig,
    array_fingerprint,
    pretrain_tiny_backbone,
)

__all__ = ["public_digits", "plain_digits_judge", "all_domains_judge", "sample_class_accuracy", "main"]


def _render_fallback(image_size: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    gray = torch.from_numpy((d.images / 16.0).astype(np.float32))[:, None]
    up = torch.nn.functional.interpolate(gray, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (up.clamp(0, 1) * 2 - 1).repeat(1, 3, 1, 1).numpy().astype(np.float32)
    labels = d.target.astype(np.int64)
    _, pub = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    is_pub = np.zeros(len(labels), bool)
    is_pub[pub] = True
    return images, labels, is_pub


def public_digits() -> tuple[np.ndarray, np.ndarray, str]:
    """(images, labels, data_fingerprint) of the public plain digits."""
    try:
        from sim.data import load_dataset

        pub = load_dataset("digits-domains").public
        if pub is None:
            raise RuntimeError("digits-domains has no public split")
        return np.asarray(pub.images), np.asarray(pub.labels), pub.fingerprint()
    except ImportError:
        images, labels, is_pub = _render_fallback()
        images, labels = images[is_pub], labels[is_pub]
        return images, labels, array_fingerprint(images, labels)


def _real_digits(domain: str = "plain") -> tuple[np.ndarray, np.ndarray]:
    """Real (client-side, non-public) digits of one domain, for judging samples."""
    try:
        from sim.data import load_dataset

        ds = load_dataset("digits-domains")
        k = ds.domain_names.index(domain)
        return np.asarray(ds.images[ds.domains == k]), np.asarray(ds.labels[ds.domains == k])
    except ImportError:
        images, labels, is_pub = _render_fallback()
        images, labels = images[~is_pub], labels[~is_pub]
        return (-images if domain == "inverted" else images), labels


def _features(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images, dtype=np.float32)
    return x.reshape(len(x), -1)


def plain_digits_judge(images: np.ndarray | None = None, labels: np.ndarray | None = None):
    """An RBF-SVM on real digits (all pixels); labels samples to measure class fidelity."""
    from sklearn.svm import SVC

    if images is None:
        images, labels = _real_digits("plain")
    return SVC(C=5.0).fit(_features(images), labels)


def all_domains_judge():
    """An RBF-SVM on real digits of every domain (for the photometrically augmented backbone)."""
    try:
        from sim.data import load_dataset

        ds = load_dataset("digits-domains")
        images, labels = np.asarray(ds.images), np.asarray(ds.labels)
    except ImportError:
        parts = [_real_digits(d) for d in ("plain", "inverted")]
        images, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return plain_digits_judge(images, labels)


def sample_class_accuracy(judge, images: np.ndarray, labels: np.ndarray) -> float:
    return float((judge.predict(_features(images)) == np.asarray(labels)).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_ASSET_DIR)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    ap.add_argument("--samples", type=int, default=500, help="samples for the accuracy check")
    ap.add_argument("--dataset", help="pretrain for this dataset's public split into --cache-dir instead")
    ap.add_argument("--cache-dir", type=Path, default=Path("results/cache"))
    ap.add_argument(
        "--steps", type=int, help="train_steps (WarmFed's algo.warmfed.pretrain_steps; default: the config's)"
    )
    ap.add_argument(
        "--augment",
        choices=("none", "photometric", "polarity", "textures"),
        help="as algo.warmfed.pretrain_augment (default: the config's)",
    )
    ap.add_argument("--channels", help="comma list of UNet widths (as algo.warmfed.backbone_channels)")
    args = ap.parse_args(argv)
    overrides: dict[str, Any] = {}  # TinyBackboneConfig fields given on the command line
    if args.channels:
        overrides["block_out_channels"] = tuple(int(c) for c in args.channels.split(","))
    if args.steps:
        overrides["train_steps"] = args.steps
    if args.augment:
        overrides["augment"] = args.augment
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dataset:
        from algorithms.warmfed.diffusion import get_or_pretrain_tiny_backbone
        from sim.data import load_dataset

        pub = load_dataset(args.dataset).public
        if pub is None:
            raise SystemExit(f"dataset {args.dataset!r} has no public split to pretrain on")
        cfg = TinyBackboneConfig(**overrides)
        bb, path, trained = get_or_pretrain_tiny_backbone(
            args.cache_dir, pub.images, pub.labels, cfg, pub.fingerprint(), asset_dir=None
        )
        print(f"{'pretrained' if trained else 'already cached'}: {path} ({bb.info.get('train_seconds', '?')} s)")
        return 0
    images, labels, fp = public_digits()
    cfg = TinyBackboneConfig(**overrides)
    print(f"public digits: {images.shape} fingerprint {fp}; config key {cfg.key(fp)}", flush=True)
    t0 = time.perf_counter()

    def progress(step: int, total: int, loss: float) -> None:
        if step % 100 == 0 or step == total:
            print(f"  step {step}/{total} loss {loss:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    bb = pretrain_tiny_backbone(images, labels, cfg, progress, data_fingerprint=fp)
    judge = all_domains_judge() if cfg.augment == "photometric" else plain_digits_judge()
    y = np.arange(args.samples, dtype=np.int64) % cfg.num_classes
    metrics = {}
    for g in (1.0, DEFAULT_GUIDANCE_SCALE):
        t = time.perf_counter()
        x = bb.sample(y, steps=25, guidance_scale=g, seed=1, batch_size=100)
        metrics[f"sample_accuracy_g{g:g}"] = round(sample_class_accuracy(judge, x, y), 4)
        metrics[f"images_per_second_g{g:g}"] = round(len(y) / (time.perf_counter() - t), 1)
    metrics["sample_mean_pixel"] = round(float(x.mean()), 4)
    metrics["public_mean_pixel"] = round(float(images.mean()), 4)
    bb.info.update(
        metrics,
        judge=f"sklearn SVC(C=5) on real {'digits of all domains' if cfg.augment == 'photometric' else 'plain digits'} (client split)",
        sampler="DDIM 25 steps",
    )
    out = bb.save(args.out, dtype=getattr(torch, args.dtype))
    back = TinyBackbone.load(out, expected_key=cfg.key(fp))
    x = back.sample(y, steps=25, guidance_scale=DEFAULT_GUIDANCE_SCALE, seed=1, batch_size=100)
    reloaded_acc = sample_class_accuracy(judge, x, y)
    print(json.dumps(bb.info, indent=2))
    print(
        f"saved {out} ({sum(p.stat().st_size for p in out.iterdir() if p.name.startswith('tiny_backbone'))} bytes); "
        f"reloaded ({args.dtype}) sample accuracy {reloaded_acc:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
