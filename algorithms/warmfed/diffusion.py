"""Diffusion backbones for WarmFed (no Ray, no engine dependency).

Two backbones share one small interface (:class:`DiffusionBackbone`):

* :class:`TinyBackbone` -- a class-conditional diffusers ``UNet2DModel`` that the project
  pretrains itself on the public digits (DDPM epsilon-prediction; DDIM sampling with
  classifier-free guidance through a reserved "null" class index). A default checkpoint
  ships in ``assets/`` (fp16 safetensors + json); see ``pretrain_default.py``.
  By default the public (white-on-black) digits are photometrically augmented during
  pretraining (as is, inverted, random ink/background colours): the base model then samples
  digits in random appearances and a client's LoRA selects its domain. Without it
  (``augment="none"``) a LoRA for e.g. the inverted domain had to relearn the digit shapes
  and its samples were mostly unreadable (measured: 26-40 % vs 81 % class fidelity).
* :class:`StableDiffusionBackbone` -- a real Stable Diffusion model (UNet2DConditionModel,
  AutoencoderKL, CLIPTextModel, CLIPTokenizer, scheduler) loaded from a local folder or the
  local Hugging Face cache only (``local_files_only=True``: nothing is downloaded).

Images are float32 ``(N, C, H, W)`` in ``[-1, 1]`` at the classifier's size; labels int64.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import string
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "BackboneError",
    "DiffusionBackbone",
    "TinyBackboneConfig",
    "TinyBackbone",
    "pretrain_tiny_backbone",
    "get_or_pretrain_tiny_backbone",
    "load_default_asset",
    "array_fingerprint",
    "DEFAULT_ASSET_DIR",
    "DEFAULT_GUIDANCE_SCALE",
    "StableDiffusionConfig",
    "StableDiffusionBackbone",
]

#: Folder holding the committed default checkpoint (``tiny_backbone.json`` + ``.safetensors``).
DEFAULT_ASSET_DIR = Path(__file__).resolve().parent / "assets"
#: Classifier-free guidance used by default when sampling (measured on the tiny backbone).
DEFAULT_GUIDANCE_SCALE = 2.0

_TINY_FORMAT = "warmfed-tiny-backbone/1"
_TINY_JSON = "tiny_backbone.json"
_TINY_WEIGHTS = "tiny_backbone.safetensors"

ProgressFn = Callable[[int, int, float], None]


class BackboneError(ValueError):
    """A backbone cannot be built, found or loaded (bad path, config or files)."""


# --------------------------------------------------------------------------------------
# the shared interface
# --------------------------------------------------------------------------------------
@runtime_checkable
class DiffusionBackbone(Protocol):
    """What LoRA training, synthesis and the server need from a diffusion backbone."""

    name: str
    num_classes: int
    image_size: int
    in_channels: int

    @property
    def unet(self) -> torch.nn.Module:  # the module LoRA attaches to
        ...

    def fingerprint(self) -> str:
        """Identifies the base weights (a LoRA trained on another backbone is refused)."""
        ...

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Diffusion loss of one batch (images in [-1, 1] at the classifier size)."""
        ...

    def sample(
        self, labels: np.ndarray, *, steps: int, guidance_scale: float, seed: int, batch_size: int
    ) -> np.ndarray:
        """Images in [-1, 1], float32 (N, C, H, W) at the classifier size, one per label."""
        ...

    def use_domain(self, domain: str | None) -> ContextManager[None]:
        """Temporarily set the prompt's ``{domain}`` slot (no-op for class-conditional backbones)."""
        ...


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def array_fingerprint(*arrays: np.ndarray | torch.Tensor) -> str:
    """Short sha256 of arrays' dtype, shape and bytes (e.g. the public images + labels)."""
    h = hashlib.sha256()
    for a in arrays:
        a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _weights_fingerprint(modules: Mapping[str, torch.nn.Module], full_limit: int = 2_000_000) -> str:
    """sha256 over parameter names, shapes and values.

    Tensors up to ``full_limit`` elements are hashed in full; larger ones (Stable Diffusion)
    through a sketch (float64 sum, sum of squares and a strided sample of 4096 values), which
    keeps fingerprinting a 1 B-parameter model at about a second.
    """
    h = hashlib.sha256()
    for prefix, module in modules.items():
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().cpu()
            h.update(f"{prefix}.{name}{tuple(t.shape)}".encode())
            if not t.is_floating_point():
                h.update(t.contiguous().numpy().tobytes())
                continue
            flat = t.reshape(-1).float()
            if flat.numel() <= full_limit:
                h.update(flat.contiguous().numpy().tobytes())
            else:
                d = flat.double()
                stride = max(1, flat.numel() // 4096)
                h.update(np.array([d.sum().item(), (d * d).sum().item()]).tobytes())
                h.update(flat[::stride].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _to_tensor(a: Any) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    a = np.asarray(a)
    if not a.flags.writeable:  # e.g. arrays from Ray's object store: torch wants writable memory
        a = a.copy()
    return torch.from_numpy(np.ascontiguousarray(a))


def _as_images(images: np.ndarray | torch.Tensor, what: str = "images") -> torch.Tensor:
    x = _to_tensor(images)
    if x.ndim != 4:
        raise ValueError(f"{what} must be (N, C, H, W), got shape {tuple(x.shape)}")
    return x.to(torch.float32)


def _as_labels(labels: np.ndarray | torch.Tensor | Sequence[int], num_classes: int) -> torch.Tensor:
    y = _to_tensor(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(y.shape)}")
    y = y.to(torch.int64)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    return y


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    if x.shape[1] == channels:
        return x
    if channels == 1:
        return x.mean(dim=1, keepdim=True)
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    raise ValueError(f"cannot map {x.shape[1]} channels to {channels}")


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + np.cos(np.pi * min(1.0, progress)))


# --------------------------------------------------------------------------------------
# tiny class-conditional backbone
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TinyBackboneConfig:
    """The project's own small class-conditional pixel-space diffusion model."""

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
    # "none", or "photometric": each training image is drawn as it is, inverted, or in random
    # ink/background colours (a third each), so the backbone's class features do not hinge on
    # one appearance and a client LoRA only has to select its domain
    augment: str = "photometric"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if self.image_size < 4 or self.image_size % (2 ** (len(self.block_out_channels) - 1)):
            raise BackboneError(
                f"image_size {self.image_size} must be divisible by 2^(len(block_out_channels)-1)"
            )
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
        if self.augment not in ("none", "photometric"):
            raise BackboneError(f"augment must be 'none' or 'photometric', got {self.augment!r}")

    @property
    def null_class(self) -> int:
        """The extra class index used as the unconditional label."""
        return self.num_classes

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TinyBackboneConfig":
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


class _UNetBackbone:
    """What both backbones share: a UNet that LoRA attaches to, identified by its base weights."""

    _unet: torch.nn.Module
    _fingerprint: str

    @property
    def unet(self) -> torch.nn.Module:
        return self._unet

    def fingerprint(self) -> str:
        return self._fingerprint

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self._unet.parameters())

    def num_bytes(self) -> int:
        """Size of the UNet's base weights as held in memory."""
        return sum(t.numel() * t.element_size() for t in self._unet.state_dict().values())


class TinyBackbone(_UNetBackbone):
    """A pretrained tiny class-conditional UNet + its noise schedule + its config."""

    def __init__(
        self,
        unet: torch.nn.Module,
        cfg: TinyBackboneConfig,
        data_fingerprint: str = "",
        info: Mapping[str, Any] | None = None,
    ) -> None:
        from diffusers import DDIMScheduler, DDPMScheduler

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
        self.train_scheduler = DDPMScheduler(**cfg.scheduler_config())
        self.sample_scheduler = DDIMScheduler(**cfg.scheduler_config(), set_alpha_to_one=True)
        self._fingerprint = _weights_fingerprint({"unet": self._unet})

    # -- interface -----------------------------------------------------------------
    @contextlib.contextmanager
    def use_domain(self, domain: str | None) -> Iterator[None]:
        yield  # class-conditional: no text prompt, the LoRA carries the domain

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x0 = _match_channels(_resize(_as_images(images), self.image_size), self.in_channels)
        y = _as_labels(labels, self.num_classes).clone()
        n = x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, self.cfg.num_train_timesteps, (n,), generator=generator)
        drop = torch.rand(n, generator=generator) < self.cfg.cond_dropout
        y[drop] = self.cfg.null_class
        xt = self.train_scheduler.add_noise(x0, noise, t)
        pred = self._unet(xt, t, class_labels=y).sample
        return F.mse_loss(pred, noise)

    @torch.no_grad()
    def sample(
        self,
        labels: np.ndarray,
        *,
        steps: int = 25,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        seed: int = 0,
        batch_size: int = 100,
    ) -> np.ndarray:
        y_all = _as_labels(labels, self.num_classes)
        n = y_all.numel()
        c, s = self.in_channels, self.image_size
        if n == 0:
            return np.zeros((0, c, s, s), np.float32)
        if steps < 1 or batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        # all initial noise up front: the result does not depend on batch_size (DDIM, eta=0)
        noise = torch.randn((n, c, s, s), generator=torch.Generator().manual_seed(int(seed)))
        sched = self.sample_scheduler
        was_training = self._unet.training
        self._unet.eval()
        out = np.empty((n, c, s, s), np.float32)
        try:
            for start in range(0, n, batch_size):
                y = y_all[start : start + batch_size]
                x = noise[start : start + batch_size].clone()
                sched.set_timesteps(steps)
                guided = guidance_scale != 1.0
                y_in = torch.cat([y, torch.full_like(y, self.cfg.null_class)]) if guided else y
                for t in sched.timesteps:
                    x_in = torch.cat([x, x]) if guided else x
                    eps = self._unet(x_in, t, class_labels=y_in).sample
                    if guided:
                        eps_c, eps_u = eps.chunk(2)
                        eps = eps_u + guidance_scale * (eps_c - eps_u)
                    x = sched.step(eps, t, x, eta=0.0).prev_sample
                out[start : start + len(y)] = x.clamp(-1, 1).numpy()
        finally:
            self._unet.train(was_training)
        return out

    # -- persistence -----------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Path:
        """Write ``tiny_backbone.safetensors`` + ``tiny_backbone.json`` into directory ``path``.

        The json records the config, its key, the data fingerprint and the fingerprint of the
        weights *as saved* (after the dtype round trip), which :meth:`load` verifies.
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().to(dtype).contiguous() for k, v in self._unet.state_dict().items()}
        reloaded = self.cfg.build_unet()
        reloaded.load_state_dict({k: v.float() for k, v in tensors.items()})
        meta = {
            "format": _TINY_FORMAT,
            "config": self.cfg.to_dict(),
            "key": self.key,
            "data_fingerprint": self.data_fingerprint,
            "weights_fingerprint": _weights_fingerprint({"unet": reloaded}),
            "dtype": str(dtype).replace("torch.", ""),
            "scheduler": self.cfg.scheduler_config(),
            "info": self.info,
        }
        save_file(tensors, str(path / _TINY_WEIGHTS), metadata={"format": _TINY_FORMAT, "key": self.key})
        (path / _TINY_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, expected_key: str | None = None) -> "TinyBackbone":
        """Load a backbone written by :meth:`save`; BackboneError if missing or inconsistent."""
        from safetensors.torch import load_file

        path = Path(path)
        jpath, wpath = path / _TINY_JSON, path / _TINY_WEIGHTS
        if not path.is_dir():
            raise BackboneError(f"tiny backbone directory not found: {path}")
        for p in (jpath, wpath):
            if not p.is_file():
                raise BackboneError(f"tiny backbone at {path} is incomplete: missing {p.name}")
        try:
            meta = json.loads(jpath.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BackboneError(f"cannot read {jpath}: {e}") from e
        if meta.get("format") != _TINY_FORMAT:
            raise BackboneError(f"{jpath}: unknown format {meta.get('format')!r}, expected {_TINY_FORMAT!r}")
        cfg = TinyBackboneConfig.from_dict(meta["config"])
        data_fp = meta.get("data_fingerprint", "")
        key = cfg.key(data_fp)
        if key != meta.get("key"):
            raise BackboneError(f"{jpath}: recorded key {meta.get('key')} does not match its config (key {key})")
        if expected_key is not None and key != expected_key:
            raise BackboneError(f"backbone at {path} has key {key}, expected {expected_key}")
        try:
            tensors = load_file(str(wpath))
        except Exception as e:  # safetensors raises several types on corrupt files
            raise BackboneError(f"cannot read {wpath}: {e}") from e
        unet = cfg.build_unet()
        try:
            unet.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
        except RuntimeError as e:
            raise BackboneError(f"weights in {wpath} do not match the config in {jpath}: {e}") from e
        bb = cls(unet, cfg, data_fp, info=meta.get("info"))
        if meta.get("weights_fingerprint") and bb.fingerprint() != meta["weights_fingerprint"]:
            raise BackboneError(
                f"weights in {wpath} do not match {jpath} (fingerprint {bb.fingerprint()} != "
                f"{meta['weights_fingerprint']})"
            )
        return bb


def _photometric(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
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
    cfg: TinyBackboneConfig = TinyBackboneConfig(),
    progress: ProgressFn | None = None,
    *,
    data_fingerprint: str | None = None,
) -> TinyBackbone:
    """DDPM epsilon-prediction training of the tiny UNet; seeded and deterministic on CPU.

    ``progress(step, total, loss)`` is called every step (cheap; throttle in the callback).
    """
    x = _match_channels(_resize(_as_images(images), cfg.image_size), cfg.in_channels).contiguous()
    y = _as_labels(labels, cfg.num_classes)
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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, cfg.train_steps, cfg.warmup_steps))
    ema = _EMA(unet, cfg.ema_decay) if cfg.ema_decay > 0 else None
    n = x.shape[0]
    t0 = time.perf_counter()
    losses: list[float] = []
    unet.train()
    perm = torch.randperm(n, generator=gen)
    pos = 0
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
        xb = _photometric(x[idx], gen) if cfg.augment == "photometric" else x[idx]
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


def load_default_asset(
    cfg: TinyBackboneConfig, data_fingerprint: str, asset_dir: str | os.PathLike = DEFAULT_ASSET_DIR
) -> TinyBackbone | None:
    """The committed default checkpoint if its key matches ``cfg`` + ``data_fingerprint``, else None."""
    asset_dir = Path(asset_dir)
    jpath = asset_dir / _TINY_JSON
    if not jpath.is_file():
        return None
    try:
        recorded = json.loads(jpath.read_text()).get("key")
    except (OSError, json.JSONDecodeError):
        return None
    if recorded != cfg.key(data_fingerprint):
        return None
    try:
        return TinyBackbone.load(asset_dir, expected_key=recorded)
    except BackboneError as e:
        warnings.warn(f"ignoring the default backbone asset: {e}", stacklevel=2)
        return None


def get_or_pretrain_tiny_backbone(
    cache_dir: str | os.PathLike,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    cfg: TinyBackboneConfig,
    data_fingerprint: str,
    progress: ProgressFn | None = None,
    *,
    asset_dir: str | os.PathLike | None = DEFAULT_ASSET_DIR,
) -> tuple[TinyBackbone, Path, bool]:
    """Return ``(backbone, path, trained_now)``.

    Looks in ``cache_dir/backbones/<key>/`` first, then the committed asset (used only when
    its key equals ``cfg.key(data_fingerprint)``), else pretrains and writes the cache entry
    atomically (temporary directory + rename; a concurrent writer that wins is kept).
    """
    key = cfg.key(data_fingerprint)
    final = Path(cache_dir) / "backbones" / key
    if final.is_dir():
        try:
            return TinyBackbone.load(final, expected_key=key), final, False
        except BackboneError as e:
            warnings.warn(f"cached backbone unusable, pretraining again: {e}", stacklevel=2)
            shutil.rmtree(final, ignore_errors=True)
    if asset_dir is not None:
        bb = load_default_asset(cfg, data_fingerprint, asset_dir)
        if bb is not None:
            return bb, Path(asset_dir), False
    bb = pretrain_tiny_backbone(images, labels, cfg, progress, data_fingerprint=data_fingerprint)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        bb.save(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TinyBackbone.load(final, expected_key=key), final, True


# --------------------------------------------------------------------------------------
# Stable Diffusion
# --------------------------------------------------------------------------------------
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


class StableDiffusionBackbone(_UNetBackbone):
    """Stable Diffusion parts driven with the same interface as :class:`TinyBackbone`."""

    def __init__(self, cfg: StableDiffusionConfig) -> None:
        from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

        self.cfg = cfg
        src = cfg.model
        p = Path(src).expanduser()
        looks_like_path = p.is_absolute() or src.startswith((".", "~")) or p.exists()
        if looks_like_path and not p.is_dir():
            raise BackboneError(f"Stable Diffusion backbone path not found: {p}")
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
        except (OSError, ValueError, EnvironmentError) as e:
            where = f"path {p}" if p.is_dir() else f"{src!r} (not a local folder, not in the local Hugging Face cache)"
            raise BackboneError(f"cannot load a Stable Diffusion pipeline from {where}: {e}") from e
        self._unet = pipe.unet.eval()
        self.vae = pipe.vae.eval()
        self.text_encoder = pipe.text_encoder.eval()
        self.tokenizer = pipe.tokenizer
        for m in (self._unet, self.vae, self.text_encoder):
            for q in m.parameters():
                q.requires_grad_(False)
        self.train_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.sample_scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        native = self._unet.config.sample_size
        native = native[0] if isinstance(native, (tuple, list)) else native
        self.generation_size = int(cfg.generation_size or native * self.vae_scale)
        if self.generation_size % self.vae_scale:
            raise BackboneError(f"generation_size {self.generation_size} must be a multiple of {self.vae_scale}")
        self.num_classes = len(cfg.class_names)
        self.image_size = cfg.image_size
        self.in_channels = cfg.in_channels
        self.dtype = dtype
        self.domain = cfg.domain
        self._fingerprint = _weights_fingerprint(
            {"unet": self._unet, "vae": self.vae, "text_encoder": self.text_encoder}
        )
        self.name = f"stable-diffusion:{Path(src).name or src}-{self._fingerprint[:8]}"
        self._emb_cache: dict[str, torch.Tensor] = {}
        del pipe

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
            emb = self.text_encoder(tok.input_ids)[0].to(self.dtype)
            for q, e in zip(missing, emb):
                self._emb_cache[q] = e
        return torch.stack([self._emb_cache[q] for q in prompts])

    def prompts(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> list[str]:
        out = [self.cfg.prompt(int(c), self.domain) for c in labels]
        if drop is not None:
            out = [self.cfg.negative_prompt if d else q for q, d in zip(out, drop.tolist())]
        return out

    # -- interface -------------------------------------------------------------------
    def training_loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = _as_images(images)
        y = _as_labels(labels, self.num_classes)
        x = _match_channels(x, 3)
        x = _resize(x, self.generation_size).to(self.dtype)
        n = x.shape[0]
        with torch.no_grad():
            latents = self.vae.encode(x).latent_dist.sample(generator)
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            latents = (latents - shift) * self.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
        t = torch.randint(0, self.train_scheduler.config.num_train_timesteps, (n,), generator=generator)
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
    ) -> np.ndarray:
        y_all = _as_labels(labels, self.num_classes)
        n = y_all.numel()
        c, s = self.in_channels, self.image_size
        if n == 0:
            return np.zeros((0, c, s, s), np.float32)
        if steps < 1 or batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        lat_c = self._unet.config.in_channels
        ls = self.generation_size // self.vae_scale
        noise = torch.randn((n, lat_c, ls, ls), generator=torch.Generator().manual_seed(int(seed)))
        sched = self.sample_scheduler
        out = np.empty((n, c, s, s), np.float32)
        was_training = self._unet.training
        self._unet.eval()
        try:
            for start in range(0, n, batch_size):
                y = y_all[start : start + batch_size]
                b = len(y)
                cond = self._embed(self.prompts(y))
                guided = guidance_scale != 1.0
                if guided:
                    cond = torch.cat([cond, self._embed([self.cfg.negative_prompt] * b)])
                sched.set_timesteps(steps)
                lat = (noise[start : start + b] * sched.init_noise_sigma).to(self.dtype)
                for t in sched.timesteps:
                    inp = torch.cat([lat, lat]) if guided else lat
                    inp = sched.scale_model_input(inp, t)
                    eps = self._unet(inp, t, encoder_hidden_states=cond).sample
                    if guided:
                        e_c, e_u = eps.chunk(2)
                        eps = e_u + guidance_scale * (e_c - e_u)
                    lat = sched.step(eps, t, lat, eta=0.0).prev_sample
                shift = getattr(self.vae.config, "shift_factor", None) or 0.0
                img = self.vae.decode(lat / self.vae.config.scaling_factor + shift).sample.float()
                img = _match_channels(_resize(img.clamp(-1, 1), s), c)
                out[start : start + b] = img.clamp(-1, 1).numpy()
        finally:
            self._unet.train(was_training)
        return out
