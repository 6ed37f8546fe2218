"""Server-side synthesis of labelled images from a (personalized) diffusion backbone."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from algorithms.warmfed.diffusion import DEFAULT_GUIDANCE_SCALE, DiffusionBackbone

__all__ = ["class_counts_to_labels", "synthesize", "save_sample_grid"]


def class_counts_to_labels(class_counts: Mapping[int, int] | np.ndarray, num_classes: int) -> np.ndarray:
    """``{class: count}`` or a per-class count array -> int64 labels sorted by class."""
    if isinstance(class_counts, Mapping):
        items = sorted((int(c), int(k)) for c, k in class_counts.items())
    else:
        arr = np.asarray(class_counts)
        if arr.ndim != 1:
            raise ValueError(f"class_counts array must be 1-D (one count per class), got shape {arr.shape}")
        if arr.size and not np.all(arr == np.round(arr)):
            raise ValueError("class_counts must be whole numbers")
        items = [(c, int(k)) for c, k in enumerate(arr)]
    for c, k in items:
        if not 0 <= c < num_classes:
            raise ValueError(f"class {c} is outside [0, {num_classes})")
        if k < 0:
            raise ValueError(f"class {c} has a negative count {k}")
    if not items:
        return np.zeros(0, np.int64)
    return np.concatenate([np.full(k, c, np.int64) for c, k in items])


def synthesize(
    backbone: DiffusionBackbone,
    class_counts: Mapping[int, int] | np.ndarray,
    *,
    steps: int = 25,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    seed: int = 0,
    batch_size: int = 100,
    sampler: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample exactly ``class_counts[c]`` images of every class ``c``.

    Returns ``(images, labels)``: float32 (N, C, H, W) in [-1, 1] at the classifier size and
    int64 labels, grouped by class in ascending order. Deterministic for ``seed`` (and, for
    the DDIM sampler used, independent of ``batch_size``). Pass a backbone inside
    ``apply_lora(...)`` to sample a client's domain.
    """
    labels = class_counts_to_labels(class_counts, backbone.num_classes)
    extra = {} if sampler is None else {"sampler": sampler}  # None: the backbone's default solver
    images = backbone.sample(
        labels, steps=steps, guidance_scale=guidance_scale, seed=seed, batch_size=batch_size, **extra
    )
    if images.shape[0] != labels.shape[0]:
        raise RuntimeError(f"backbone returned {images.shape[0]} images for {labels.shape[0]} labels")
    return np.ascontiguousarray(images, dtype=np.float32), labels


def save_sample_grid(
    images: np.ndarray,
    labels: np.ndarray | None,
    path: str | os.PathLike,
    nrow: int = 10,
    *,
    scale: int = 4,
    title: str | None = None,
) -> Path:
    """Write a PNG grid of images in [-1, 1] (N, C, H, W), ``nrow`` images per row, each with its label."""
    from PIL import Image, ImageDraw

    imgs = np.asarray(images, dtype=np.float32)
    if imgs.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got {imgs.shape}")
    n, c, h, w = imgs.shape
    if n == 0:
        raise ValueError("no images to draw")
    nrow = max(1, int(nrow))
    rows = (n + nrow - 1) // nrow
    pix = ((np.clip(imgs, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    pix = np.repeat(pix, 3, axis=1) if c == 1 else pix[:, :3]
    pix = pix.transpose(0, 2, 3, 1).repeat(scale, axis=1).repeat(scale, axis=2)
    cell_h, cell_w, pad = h * scale + (12 if labels is not None else 0), w * scale, 2
    top = 14 if title else 0
    canvas = Image.new("RGB", (nrow * (cell_w + pad) + pad, top + rows * (cell_h + pad) + pad), (128, 128, 128))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 1), title, fill=(255, 255, 255))
    for i in range(n):
        r, q = divmod(i, nrow)
        x0, y0 = pad + q * (cell_w + pad), top + pad + r * (cell_h + pad)
        canvas.paste(Image.fromarray(pix[i]), (x0, y0))
        if labels is not None:
            draw.text((x0 + 1, y0 + h * scale), str(int(labels[i])), fill=(255, 255, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
