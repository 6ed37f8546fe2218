"""Pretraining of the tiny backbone on the public split (seeded, deterministic on CPU)."""

from __future__ import annotations

import time

import numpy as np
import torch

from algorithms.warmfed.diffusion.base import (
    ProgressFn,
    array_fingerprint,
    as_images,
    as_labels,
    match_channels,
    resize,
)
from algorithms.warmfed.diffusion.tiny import TinyBackbone, TinyBackboneConfig

__all__ = ["pretrain_tiny_backbone", "photometric", "polarity", "textures", "augment_batch"]


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + np.cos(np.pi * min(1.0, progress)))


def photometric(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Recolour a batch of [-1, 1] images: a third unchanged, a third inverted, a third in
    random ink/background colours (ink intensity taken from the mean over channels)."""
    n, c = x.shape[0], x.shape[1]
    kind = torch.randint(0, 3, (n,), generator=generator)
    ink = (x.mean(dim=1, keepdim=True) + 1) / 2  # (n, 1, h, w) in [0, 1]
    fg = torch.rand((n, c, 1, 1), generator=generator) * 2 - 1
    bg = torch.rand((n, c, 1, 1), generator=generator) * 2 - 1
    low = (fg - bg).abs().amax(dim=1, keepdim=True) < 0.8  # too little contrast: oppose the colours
    bg = torch.where(low, -fg, bg)
    colored = bg + (fg - bg) * ink
    out = torch.where((kind == 1)[:, None, None, None], -x, x)
    return torch.where((kind == 2)[:, None, None, None], colored, out).clamp(-1, 1)


def polarity(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Half of a batch of [-1, 1] images inverted: both polarities of every class shape, no colours,
    so a client LoRA recolours a digit the backbone can already draw dark-on-light."""
    flip = torch.rand((x.shape[0],), generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], -x, x)


def textures(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Three quarters of a batch redrawn as its ink over a random generic background -- flat, a hard
    grating of random angle and period, block noise of 1-4 px cells, or a linear ramp -- in random
    colours, ink in a colour that contrasts with both background colours; a quarter kept as is.

    A foundation model has drawn shapes over many textures; a backbone that has only drawn plain
    digits must invent a client's texture in its LoRA, and at this size it breaks the digit instead.
    The families are generic (no frame, no shadow, no regular checkerboard), so base samples stay
    off every client style; the fidelity benchmark's base rows measure that. Measured on font-digits,
    the tiny UNet does not learn the digits under it in 1,200 steps (README, fidelity): kept as the
    recorded negative result and for larger backbones.
    """
    n, c, h, w = x.shape
    g = generator
    ink = ((x.mean(dim=1, keepdim=True) + 1) / 2).clamp(0, 1)  # (n, 1, h, w)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
    angle = torch.rand((n, 1, 1, 1), generator=g) * torch.pi
    along = xx * torch.cos(angle) + yy * torch.sin(angle)  # (n, 1, h, w)
    period = 2.0 + torch.rand((n, 1, 1, 1), generator=g) * 6.0
    phase = torch.rand((n, 1, 1, 1), generator=g) * period
    grating = (torch.remainder(along + phase, period) < period / 2).to(x.dtype)
    ramp = (along - along.amin((2, 3), keepdim=True)) / (
        along.amax((2, 3), keepdim=True) - along.amin((2, 3), keepdim=True) + 1e-6
    )
    cells = [1, 2, 4]
    cell = torch.randint(0, len(cells), (n,), generator=g)
    blocks = torch.zeros((n, 1, h, w), dtype=x.dtype)
    for i, s in enumerate(cells):
        low = torch.rand((n, 1, -(-h // s), -(-w // s)), generator=g).round()
        up = low.repeat_interleave(s, 2).repeat_interleave(s, 3)[:, :, :h, :w]
        blocks = torch.where((cell == i)[:, None, None, None], up, blocks)
    family = torch.randint(0, 4, (n,), generator=g)[:, None, None, None]
    t = torch.where(family == 1, grating, torch.where(family == 2, blocks, torch.where(family == 3, ramp, 0.0 * ramp)))
    bg_a = torch.rand((n, c, 1, 1), generator=g) * 2 - 1
    bg_b = torch.rand((n, c, 1, 1), generator=g) * 2 - 1
    fg = torch.rand((n, c, 1, 1), generator=g) * 2 - 1
    low_contrast = torch.minimum((fg - bg_a).abs().amax(1, keepdim=True), (fg - bg_b).abs().amax(1, keepdim=True)) < 0.7
    fg = torch.where(low_contrast, -(bg_a + bg_b) / 2, fg)  # opposite of the background's mean colour
    drawn = (bg_a + (bg_b - bg_a) * t) * (1 - ink) + fg * ink
    keep = torch.rand((n,), generator=g)[:, None, None, None] < 0.25
    return torch.where(keep, x, drawn).clamp(-1, 1)


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """The pretraining augmentation named by TinyBackboneConfig.augment."""
    if kind == "photometric":
        return photometric(x, generator)
    if kind == "polarity":
        return polarity(x, generator)
    if kind == "textures":
        return textures(x, generator)
    return x


class _EMA:
    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)


def pretrain_tiny_backbone(
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    cfg: TinyBackboneConfig | None = None,
    progress: ProgressFn | None = None,
    *,
    data_fingerprint: str | None = None,
    show_progress: bool = False,
) -> TinyBackbone:
    """DDPM epsilon-prediction training of the tiny UNet; seeded and deterministic on CPU.

    ``progress(step, total, loss)`` is called every step (cheap; throttle in the callback);
    ``show_progress`` draws a tqdm bar on stderr.
    """
    cfg = cfg or TinyBackboneConfig()
    x = match_channels(resize(as_images(images), cfg.image_size), cfg.in_channels).contiguous()
    y = as_labels(labels, cfg.num_classes)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"need the same non-zero number of images and labels, got {x.shape[0]} and {y.shape[0]}")
    if data_fingerprint is None:
        data_fingerprint = array_fingerprint(np.asarray(images), np.asarray(labels))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        unet = cfg.build_unet()
    bb = TinyBackbone(unet, cfg, data_fingerprint)  # for training_loss; weights change below
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    for p in unet.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg.train_steps, cfg.warmup_steps))
    ema = _EMA(unet, cfg.ema_decay) if cfg.ema_decay > 0 else None
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.train_steps, desc=f"pretraining tiny backbone {bb.key}", unit="step", mininterval=2.0)
    n = x.shape[0]
    t0 = time.perf_counter()
    losses: list[float] = []
    unet.train()
    perm = torch.randperm(n, generator=gen)
    pos = 0
    try:
        for step in range(cfg.train_steps):
            # epoch-wise shuffling (every image seen once per epoch)
            idx_parts = []
            need = cfg.batch_size
            while need > 0:
                if pos >= n:
                    perm, pos = torch.randperm(n, generator=gen), 0
                take = min(need, n - pos)
                idx_parts.append(perm[pos : pos + take])
                pos += take
                need -= take
            idx = torch.cat(idx_parts)
            xb = augment_batch(x[idx], cfg.augment, gen)
            loss = bb.training_loss(xb, y[idx], gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(unet, step)
            losses.append(loss.item())
            if progress is not None:
                progress(step + 1, cfg.train_steps, losses[-1])
            if bar is not None:
                bar.update(1)
                if step % 50 == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    if ema is not None:
        unet.load_state_dict(ema.shadow)
    seconds = time.perf_counter() - t0
    info = {
        "train_seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / cfg.train_steps, 4),
        "final_loss": float(np.mean(losses[-50:])),
        "num_images": int(n),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    return TinyBackbone(unet.eval(), cfg, data_fingerprint, info=info)
