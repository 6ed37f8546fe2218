"""The backbone interface and the tensor plumbing every backbone shares (no diffusers import)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from sim.errors import UserError

__all__ = [
    "BackboneError",
    "DiffusionBackbone",
    "ProgressFn",
    "UNetBackbone",
    "array_fingerprint",
    "weights_fingerprint",
]

ProgressFn = Callable[[int, int, float], None]


class BackboneError(UserError, ValueError):
    """A backbone cannot be built, found or loaded (bad path, config or files)."""


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

    def use_domain(self, domain: str | None) -> AbstractContextManager[None]:
        """Temporarily set the prompt's ``{domain}`` slot (no-op for class-conditional backbones)."""
        ...


def array_fingerprint(*arrays: np.ndarray | torch.Tensor) -> str:
    """Short sha256 of arrays' dtype, shape and bytes (e.g. the public images + labels)."""
    h = hashlib.sha256()
    for a in arrays:
        a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def weights_fingerprint(modules: Mapping[str, torch.nn.Module], full_limit: int = 2_000_000) -> str:
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


def to_tensor(a: Any) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    a = np.asarray(a)
    if not a.flags.writeable:  # e.g. arrays from Ray's object store: torch wants writable memory
        a = a.copy()
    return torch.from_numpy(np.ascontiguousarray(a))


def as_images(images: np.ndarray | torch.Tensor, what: str = "images") -> torch.Tensor:
    x = to_tensor(images)
    if x.ndim != 4:
        raise ValueError(f"{what} must be (N, C, H, W), got shape {tuple(x.shape)}")
    return x.to(torch.float32)


def as_labels(labels: np.ndarray | torch.Tensor | Sequence[int], num_classes: int) -> torch.Tensor:
    y = to_tensor(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(y.shape)}")
    y = y.to(torch.int64)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    return y


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    if x.shape[1] == channels:
        return x
    if channels == 1:
        return x.mean(dim=1, keepdim=True)
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    raise ValueError(f"cannot map {x.shape[1]} channels to {channels}")


class UNetBackbone:
    """What both backbones share: a UNet that LoRA attaches to, identified by its base weights."""

    _unet: torch.nn.Module
    _fingerprint: str

    @property
    def unet(self) -> torch.nn.Module:
        return self._unet

    @property
    def device(self) -> torch.device:
        return next(self._unet.parameters()).device

    def to(self, device: torch.device | str) -> UNetBackbone:
        """Move the networks it trains and samples with. Random draws stay on CPU generators
        and are moved after, so a GPU run draws the same noise as a CPU one."""
        self._unet.to(device)
        return self

    def fingerprint(self) -> str:
        return self._fingerprint

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self._unet.parameters())

    def num_bytes(self) -> int:
        """Size of the UNet's base weights as held in memory."""
        return sum(t.numel() * t.element_size() for t in self._unet.state_dict().values())

    def with_unet(self, unet: torch.nn.Module) -> UNetBackbone:
        """A shallow copy sampling with another UNet (e.g. one with a LoRA merged in); the
        schedulers and config are shared, this backbone is left as it is."""
        import copy

        other = copy.copy(self)
        other._unet = unet
        return other


def local_model_path(source: str) -> Path | None:
    """The folder `source` names when it is meant as a local path, else None (a Hugging Face hub id,
    "org/name", looked up in the local cache): absolute, `./` or `~`, deeper than org/name, or existing."""
    path = Path(source).expanduser()
    if path.is_absolute() or source.startswith((".", "~")) or len(path.parts) > 2 or path.exists():
        return path
    return None
