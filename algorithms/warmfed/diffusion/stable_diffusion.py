"""A real Stable Diffusion backbone (UNet2DConditionModel, AutoencoderKL, CLIP text encoder)
from a local folder or the local Hugging Face cache only (``local_files_only=True``)."""

from __future__ import annotations

import contextlib
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from algorithms.warmfed.diffusion.base import (
    BackboneError,
    UNetBackbone,
    as_images,
    as_labels,
    local_model_path,
    match_channels,
    resize,
    weights_fingerprint,
)
from algorithms.warmfed.diffusion.sampling import DEFAULT_SAMPLER, denoise, make_sample_scheduler

__all__ = ["DIGIT_CLASS_NAMES", "StableDiffusionConfig", "StableDiffusionBackbone"]

DIGIT_CLASS_NAMES: tuple[str, ...] = tuple(f"digit {i}" for i in range(10))


def _check_template(template: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise BackboneError(f"prompt_template {template!r} is not a valid format string: {e}") from e
    if "class_name" not in fields:
        raise BackboneError(
            f"prompt_template {template!r} has no {{class_name}} slot; every prompt must name its class, "
            "e.g. 'a photo of a {class_name}'"
        )
    unknown = set(fields) - {"class_name", "domain"}
    if unknown:
        raise BackboneError(
            f"prompt_template {template!r} has unknown slots {sorted(unknown)}; allowed: {{class_name}}, {{domain}}"
        )


@dataclass(frozen=True)
class StableDiffusionConfig:
    """A Stable Diffusion backbone from a local folder or the local Hugging Face cache."""

    model: str  # path to a diffusers pipeline folder, or a hub id already in the local cache
    class_names: tuple[str, ...] = DIGIT_CLASS_NAMES
    prompt_template: str = "a photo of a {class_name}"
    domain: str = ""  # fills an optional {domain} slot; a LoRA may set its own
    negative_prompt: str = ""  # the unconditional prompt for guidance (and label dropout)
    image_size: int = 16  # the classifier's size: samples are resized to it
    in_channels: int = 3
    generation_size: int | None = None  # None: the UNet's native size x the VAE factor
    cond_dropout: float = 0.1
    torch_dtype: str = "float32"
    variant: str | None = None

    def __post_init__(self) -> None:
        _check_template(self.prompt_template)
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if not self.class_names:
            raise BackboneError("class_names must not be empty")
        if self.torch_dtype not in ("float32", "float16", "bfloat16"):
            raise BackboneError(f"torch_dtype must be float32, float16 or bfloat16, got {self.torch_dtype!r}")

    def prompt(self, class_index: int, domain: str | None = None) -> str:
        d = self.domain if domain is None else domain
        text = self.prompt_template.format(class_name=self.class_names[class_index], domain=d)
        return " ".join(text.split())  # tidy the blanks an empty {domain} leaves


class StableDiffusionBackbone(UNetBackbone):
    """Stable Diffusion parts driven with the same interface as :class:`TinyBackbone`."""

    def __init__(self, cfg: StableDiffusionConfig) -> None:
        from diffusers import DDPMScheduler, StableDiffusionPipeline

        self.cfg = cfg
        src = cfg.model
        local = local_model_path(src)
        if local is not None and not local.is_dir():
            raise BackboneError(f"Stable Diffusion backbone path not found: {local}")
        p = local or Path(src)
        dtype = getattr(torch, cfg.torch_dtype)
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                str(p) if p.is_dir() else src,
                local_files_only=True,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                dtype=dtype,
                variant=cfg.variant,
            )
        except (OSError, ValueError) as e:
            where = f"path {p}" if p.is_dir() else f"{src!r} (not a local folder, not in the local Hugging Face cache)"
            raise BackboneError(f"cannot load a Stable Diffusion pipeline from {where}: {e}") from e
        self._unet = pipe.unet.eval()
        self._unet_config: Any = cast(Any, self._unet).config  # diffusers typed as a plain module
        self.vae = pipe.vae.eval()
        self.text_encoder = pipe.text_encoder.eval()
        self.tokenizer = pipe.tokenizer
        for m in (self._unet, self.vae, self.text_encoder):
            for q in m.parameters():
                q.requires_grad_(False)
        self.train_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.sample_config = dict(pipe.scheduler.config)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        native = self._unet_config.sample_size
        native = native[0] if isinstance(native, (tuple, list)) else native
        self.generation_size = int(cfg.generation_size or native * self.vae_scale)
        if self.generation_size % self.vae_scale:
            raise BackboneError(f"generation_size {self.generation_size} must be a multiple of {self.vae_scale}")
        self.num_classes = len(cfg.class_names)
        self.image_size = cfg.image_size
        self.in_channels = cfg.in_channels
        self.dtype = dtype
        self.domain = cfg.domain
        self._fingerprint = weights_fingerprint(
            {"unet": self._unet, "vae": self.vae, "text_encoder": self.text_encoder}
        )
        self.name = f"stable-diffusion:{Path(src).name or src}-{self._fingerprint[:8]}"
        self._emb_cache: dict[str, torch.Tensor] = {}
        del pipe

    def to(self, device: torch.device | str) -> StableDiffusionBackbone:
        for m in (self._unet, self.vae, self.text_encoder):
            m.to(device)
        self._emb_cache.clear()
        return self

    @contextlib.contextmanager
    def use_domain(self, domain: str | None) -> Iterator[None]:
        old = self.domain
        if domain is not None:
            self.domain = domain
        try:
            yield
        finally:
            self.domain = old

    # -- text ------------------------------------------------------------------------
    @torch.no_grad()
    def _embed(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = [q for q in dict.fromkeys(prompts) if q not in self._emb_cache]
        if missing:
            tok = self.tokenizer(
                list(missing),
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            emb = self.text_encoder(tok.input_ids.to(self.device))[0].to(self.dtype)
            for q, e in zip(missing, emb, strict=True):
                self._emb_cache[q] = e
        return torch.stack([self._emb_cache[q] for q in prompts])

    def prompts(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> list[str]:
        out = [self.cfg.prompt(int(c), self.domain) for c in labels]
        if drop is not None:
            out = [self.cfg.negative_prompt if d else q for q, d in zip(out, drop.tolist(), strict=True)]
        return out

    # -- interface -------------------------------------------------------------------
    def training_loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = as_images(images)
        y = as_labels(labels, self.num_classes)
        x = match_channels(x, 3)
        d = self.device
        x = resize(x, self.generation_size).to(d, self.dtype)
        n = x.shape[0]
        with torch.no_grad():
            latents = self.vae.encode(x).latent_dist.sample(generator)
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            latents = (latents - shift) * self.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(d)
        t = torch.randint(0, self.train_scheduler.config.num_train_timesteps, (n,), generator=generator).to(d)
        drop = torch.rand(n, generator=generator) < self.cfg.cond_dropout
        emb = self._embed(self.prompts(y, drop))
        noisy = self.train_scheduler.add_noise(latents, noise, t)
        pred = self._unet(noisy, t, encoder_hidden_states=emb).sample
        if self.train_scheduler.config.prediction_type == "v_prediction":
            target = self.train_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        return F.mse_loss(pred.float(), target.float())

    @torch.no_grad()
    def sample(
        self,
        labels: np.ndarray,
        *,
        steps: int = 25,
        guidance_scale: float = 7.5,
        seed: int = 0,
        batch_size: int = 8,
        sampler: str = DEFAULT_SAMPLER,
    ) -> np.ndarray:
        y_all = as_labels(labels, self.num_classes)
        n = y_all.numel()
        c, s = self.in_channels, self.image_size
        if n == 0:
            return np.zeros((0, c, s, s), np.float32)
        if steps < 1 or batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        lat_c = int(self._unet_config.in_channels)
        ls = self.generation_size // self.vae_scale
        noise = torch.randn((n, lat_c, ls, ls), generator=torch.Generator().manual_seed(int(seed)))
        sched = make_sample_scheduler(sampler, self.sample_config)
        out = np.empty((n, c, s, s), np.float32)
        was_training = self._unet.training
        self._unet.eval()
        try:
            for start in range(0, n, batch_size):
                y = y_all[start : start + batch_size]
                b = len(y)
                cond = self._embed(self.prompts(y))
                both = torch.cat([cond, self._embed([self.cfg.negative_prompt] * b)])

                def eps_fn(
                    x: torch.Tensor, t: torch.Tensor, guided: bool, both: torch.Tensor = both, cond: torch.Tensor = cond
                ) -> torch.Tensor:  # defaults bind this batch's prompts
                    return self._unet(x, t, encoder_hidden_states=both if guided else cond).sample

                lat = denoise(
                    eps_fn, noise[start : start + b].to(self.device, self.dtype), sched, steps, guidance_scale
                )
                shift = getattr(self.vae.config, "shift_factor", None) or 0.0
                img = self.vae.decode(lat / self.vae.config.scaling_factor + shift).sample.float().cpu()
                img = match_channels(resize(img.clamp(-1, 1), s), c)
                out[start : start + b] = img.clamp(-1, 1).numpy()
        finally:
            self._unet.train(was_training)
        return out
