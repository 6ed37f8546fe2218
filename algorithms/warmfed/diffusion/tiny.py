"""The project's own small class-conditional pixel-space diffusion model (config + model).

A diffusers ``UNet2DModel`` with a class embedding (+ one reserved "null" class for
classifier-free guidance), DDPM epsilon-prediction. Persistence is in ``loaders.py``,
pretraining in ``pretrain.py``, the sampler in ``sampling.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from algorithms.warmfed.diffusion.base import (
    BackboneError,
    UNetBackbone,
    as_images,
    as_labels,
    match_channels,
    resize,
    weights_fingerprint,
)
from algorithms.warmfed.diffusion.sampling import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_SAMPLER,
    DEFAULT_SAMPLER_STEPS,
    denoise,
    make_sample_scheduler,
)

__all__ = ["TinyBackboneConfig", "TinyBackbone", "AUGMENTATIONS"]

#: ``none``; ``photometric``: each training image as it is, inverted, or in random
#: ink/background colours (a third each), so the class features do not hinge on one look;
#: ``polarity``: as it is or inverted (half each), grey only; ``textures``: the ink over random
#: generic backgrounds in random colours (pretrain.textures).
AUGMENTATIONS: tuple[str, ...] = ("none", "photometric", "polarity", "textures")


@dataclass(frozen=True)
class TinyBackboneConfig:
    """The tiny backbone's architecture, noise schedule and pretraining recipe."""

    image_size: int = 16
    in_channels: int = 3
    num_classes: int = 10
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention: bool = True  # self-attention in the low-resolution block (and the mid block)
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    train_steps: int = 1200
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    ema_decay: float = 0.999  # 0 disables the exponential moving average of the weights
    cond_dropout: float = 0.1  # label dropout -> the null class, for classifier-free guidance
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    augment: str = "photometric"  # one of AUGMENTATIONS
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if self.image_size < 4 or self.image_size % (2 ** (len(self.block_out_channels) - 1)):
            raise BackboneError(f"image_size {self.image_size} must be divisible by 2^(len(block_out_channels)-1)")
        if self.num_classes < 1 or self.in_channels < 1:
            raise BackboneError("num_classes and in_channels must be >= 1")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise BackboneError(
                f"block_out_channels {self.block_out_channels} must be multiples of norm_num_groups "
                f"{self.norm_num_groups}"
            )
        if not 0.0 <= self.cond_dropout < 1.0:
            raise BackboneError("cond_dropout must be in [0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise BackboneError("ema_decay must be in [0, 1)")
        if self.train_steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise BackboneError("train_steps, batch_size and lr must be positive")
        if self.augment not in AUGMENTATIONS:
            raise BackboneError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")

    @property
    def null_class(self) -> int:
        """The extra class index used as the unconditional label."""
        return self.num_classes

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TinyBackboneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise BackboneError(f"unknown TinyBackboneConfig keys: {sorted(unknown)}")
        d = dict(d)
        if "block_out_channels" in d:
            d["block_out_channels"] = tuple(d["block_out_channels"])
        return cls(**d)

    def key(self, data_fingerprint: str = "") -> str:
        """Short sha256 of the canonical JSON of this config + the public data fingerprint."""
        blob = json.dumps({"config": self.to_dict(), "data": data_fingerprint}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def build_unet(self):
        from diffusers import UNet2DModel

        n = len(self.block_out_channels)
        if self.attention and n > 1:
            down = ("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",)
            up = ("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1)
        elif self.attention:
            down, up = ("AttnDownBlock2D",), ("AttnUpBlock2D",)
        else:
            down, up = ("DownBlock2D",) * n, ("UpBlock2D",) * n
        return UNet2DModel(
            sample_size=self.image_size,
            in_channels=self.in_channels,
            out_channels=self.in_channels,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            attention_head_dim=self.attention_head_dim,
            norm_num_groups=self.norm_num_groups,
            add_attention=self.attention,
            num_class_embeds=self.num_classes + 1,  # + the null class
        )

    def scheduler_config(self) -> dict[str, Any]:
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": self.beta_schedule,
            "prediction_type": "epsilon",
            "clip_sample": True,
            "clip_sample_range": 1.0,
        }


class TinyBackbone(UNetBackbone):
    """A pretrained tiny class-conditional UNet + its noise schedule + its config."""

    def __init__(
        self,
        unet: torch.nn.Module,
        cfg: TinyBackboneConfig,
        data_fingerprint: str = "",
        info: Mapping[str, Any] | None = None,
    ) -> None:
        from diffusers import DDPMScheduler

        self._unet = unet.eval()
        for p in self._unet.parameters():
            p.requires_grad_(False)
        self.cfg = cfg
        self.data_fingerprint = data_fingerprint
        self.info: dict[str, Any] = dict(info or {})
        self.num_classes = cfg.num_classes
        self.image_size = cfg.image_size
        self.in_channels = cfg.in_channels
        self.key = cfg.key(data_fingerprint)
        self.name = f"tiny-unet-{self.key}"
        self.train_scheduler: Any = DDPMScheduler(**cfg.scheduler_config())  # diffusers is untyped here
        self._fingerprint = weights_fingerprint({"unet": self._unet})

    @contextlib.contextmanager
    def use_domain(self, domain: str | None) -> Iterator[None]:
        yield  # class-conditional: no text prompt, the LoRA carries the domain

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x0 = match_channels(resize(as_images(images), self.image_size), self.in_channels)
        y = as_labels(labels, self.num_classes).clone()
        n = x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, self.cfg.num_train_timesteps, (n,), generator=generator)
        drop = torch.rand(n, generator=generator) < self.cfg.cond_dropout
        y[drop] = self.cfg.null_class
        xt = self.train_scheduler.add_noise(x0, noise, t)
        d = self.device
        pred = self._unet(xt.to(d), t.to(d), class_labels=y.to(d)).sample
        return F.mse_loss(pred, noise.to(d))

    @torch.no_grad()
    def sample(
        self,
        labels: np.ndarray,
        *,
        steps: int = DEFAULT_SAMPLER_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        seed: int = 0,
        batch_size: int = 100,
        sampler: str = DEFAULT_SAMPLER,
    ) -> np.ndarray:
        y_all = as_labels(labels, self.num_classes)
        n = y_all.numel()
        c, s = self.in_channels, self.image_size
        if n == 0:
            return np.zeros((0, c, s, s), np.float32)
        if steps < 1 or batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        # all initial noise up front: the result does not depend on batch_size
        noise = torch.randn((n, c, s, s), generator=torch.Generator().manual_seed(int(seed)))
        sched = make_sample_scheduler(sampler, self.cfg.scheduler_config())
        was_training = self._unet.training
        self._unet.eval()
        out = np.empty((n, c, s, s), np.float32)
        d = self.device
        try:
            for start in range(0, n, batch_size):
                y = y_all[start : start + batch_size].to(d)
                y_guided = torch.cat([y, torch.full_like(y, self.cfg.null_class)])

                def eps_fn(
                    x: torch.Tensor,
                    t: torch.Tensor,
                    guided: bool,
                    y: torch.Tensor = y,
                    y_guided: torch.Tensor = y_guided,
                ) -> torch.Tensor:  # defaults bind this batch's labels
                    # fp32 out under autocast: the solver's state stays in full precision
                    return self._unet(x, t, class_labels=y_guided if guided else y).sample.float()

                x = denoise(eps_fn, noise[start : start + len(y)].to(d), sched, steps, guidance_scale)
                out[start : start + len(y)] = x.clamp(-1, 1).cpu().numpy()
        finally:
            self._unet.train(was_training)
        return out

    def save(self, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Path:
        """See :func:`loaders.save_tiny_backbone`."""
        from algorithms.warmfed.diffusion.loaders import save_tiny_backbone

        return save_tiny_backbone(self, path, dtype=dtype)

    @classmethod
    def load(cls, path: str | os.PathLike, *, expected_key: str | None = None) -> TinyBackbone:
        """See :func:`loaders.load_tiny_backbone`."""
        from algorithms.warmfed.diffusion.loaders import load_tiny_backbone

        return load_tiny_backbone(path, expected_key=expected_key)
