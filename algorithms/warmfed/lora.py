"""Client-side personalized diffusion: peft LoRA on a frozen backbone UNet.

* :func:`train_client_lora` -- trains LoRA adapters on a client's private images and returns a
  :class:`LoraUpload` holding ONLY the LoRA tensors (what travels to the server, once).
* :func:`apply_lora` -- a context manager that loads an upload onto a backbone for sampling and
  removes it on exit.

With ``pixel_map="moments"`` the adapter trains on the client's images mapped onto the
backbone's public look (algorithms/warmfed/pixel_map.py) and the upload carries that map, which
``apply_lora`` inverts on every sample.

The backbone object is shared (one per actor), so neither function leaves it changed: the
LoRA layers are injected into ``backbone.unet`` in place and stripped again afterwards
(every ``BaseTunerLayer`` is swapped back for its original base layer), so the UNet's
modules, ``state_dict`` keys, ``requires_grad`` flags and train/eval mode are restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from algorithms.warmfed.diffusion.base import DiffusionBackbone
from algorithms.warmfed.diffusion.base import as_images as _as_images
from algorithms.warmfed.diffusion.base import as_labels as _as_labels
from algorithms.warmfed.pixel_map import PIXEL_MAPS, PixelMap, PixelStats
from sim.errors import UserError

__all__ = [
    "LoraConfig",
    "LoraUpload",
    "LoraMismatchError",
    "train_client_lora",
    "apply_lora",
    "privatize_upload",
    "ATTENTION_TARGETS",
    "RESNET_CONV_TARGETS",
    "IO_CONV_TARGETS",
    "EMBEDDING_TARGETS",
    "LORA_DEFAULTS",
]

ATTENTION_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
RESNET_CONV_TARGETS: tuple[str, ...] = ("conv1", "conv2")
IO_CONV_TARGETS: tuple[str, ...] = ("conv_in", "conv_out")
#: The class embedding (a low-rank delta shared by all rows acts as a learned client/domain
#: token, in the conditional and the null class alike) and each ResNet's time-embedding projection.
EMBEDDING_TARGETS: tuple[str, ...] = ("class_embedding", "time_emb_proj")
_ADAPTER = "warmfed_client"
_FORMAT = "warmfed-lora/1"


class LoraMismatchError(UserError, ValueError):
    """A LoRA upload does not fit this backbone (other base weights, or other modules/shapes)."""


@dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters of the client's one-shot personalization.

    Defaults measured on the default tiny backbone with 200 inverted digits (the hardest
    domain: every pixel changes sign). Attention-only LoRA, or any LoRA at lr <= 1e-3, moved
    the mean pixel but left digits unreadable: a half-converged adapter sits between the two
    polarities. Adapting attention + ResNet convs + conv_in/conv_out (full rank there, cheap)
    at lr 2e-3 for 300 steps gave the best class fidelity measured (see the report).
    """

    rank: int = 8
    alpha: float | None = None  # None: alpha = rank (scaling 1)
    target_modules: tuple[str, ...] = ATTENTION_TARGETS
    include_resnet_convs: bool = True  # also adapt the ResNet convs (conv1, conv2)
    include_io_convs: bool = True  # also adapt the UNet's first and last conv (conv_in, conv_out)
    # rank of the conv_in/conv_out LoRA (None: rank). 27 = 3 channels x 3x3 kernel: full rank
    # for a 3-channel pixel-space UNet's conv_in, a few thousand parameters
    io_rank: int | None = 27
    include_embeddings: bool = False  # also adapt EMBEDDING_TARGETS (modules the backbone lacks are skipped)
    dropout: float = 0.0
    # 100 x 32: 25 steps were level on the default benchmark but 9.5 points of validation global
    # accuracy behind where client domains are new to the backbone (README, "The client budget")
    steps: int = 100
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    domain: str | None = None  # fills the prompt's {domain} slot (text-conditioned backbones)
    # none | moments: train on the client's images mapped onto the backbone's public look
    # (pixel_map.py); needs the public pixel statistics, which only the caller has
    pixel_map: str = "none"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if int(self.rank) != self.rank or self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.io_rank is not None and (int(self.io_rank) != self.io_rank or self.io_rank < 1):
            raise ValueError(f"LoRA io_rank must be >= 1, got {self.io_rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not self.target_modules and not self.include_resnet_convs and not self.include_io_convs:
            raise ValueError("LoRA needs at least one target module")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("LoRA steps must be >= 0, batch_size >= 1 and lr > 0")
        if self.pixel_map not in PIXEL_MAPS:
            raise ValueError(f"LoRA pixel_map must be one of {', '.join(PIXEL_MAPS)}, got {self.pixel_map!r}")

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def modules(self) -> tuple[str, ...]:
        mods = self.target_modules + (RESNET_CONV_TARGETS if self.include_resnet_convs else ())
        mods += IO_CONV_TARGETS if self.include_io_convs else ()
        mods += EMBEDDING_TARGETS if self.include_embeddings else ()
        return tuple(dict.fromkeys(mods))

    def peft_config(self):
        from peft import LoraConfig as PeftLoraConfig

        from algorithms.warmfed.lora_layers import WEIGHT_SPACE_LAYERS

        rank_pattern, alpha_pattern = {}, {}
        if self.include_io_convs and self.io_rank is not None and self.io_rank != self.rank:
            for name in IO_CONV_TARGETS:
                rank_pattern[name] = int(self.io_rank)
                # same scaling (alpha / r) as the other modules
                alpha_pattern[name] = self.lora_alpha * self.io_rank / self.rank
        config = PeftLoraConfig(
            r=int(self.rank),
            lora_alpha=self.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; it scales by any float
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            target_modules=list(self.modules),
            lora_dropout=self.dropout,
            bias="none",
            init_lora_weights=True,
        )
        # small layers: one convolution / matrix product per adapted layer instead of three (lora_layers.py)
        config._register_custom_module(WEIGHT_SPACE_LAYERS)
        return config

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoraConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "target_modules" in d:
            d["target_modules"] = tuple(d["target_modules"])
        return cls(**d)


#: The one LoRA default set (WarmFedParams' lora_* fields default to it).
LORA_DEFAULTS = LoraConfig()


@dataclass(frozen=True, eq=False)
class LoraUpload:
    """What a client sends: LoRA tensors only (CPU, contiguous) + which backbone they fit."""

    state: dict[str, torch.Tensor]
    backbone_fingerprint: str
    config: LoraConfig
    info: dict[str, Any] = field(default_factory=dict)  # loss, seconds, ... (not the data)
    pixel_map: PixelMap | None = None  # the images the LoRA trained on were mapped by it

    @property
    def num_bytes(self) -> int:
        tensors = sum(t.numel() * t.element_size() for t in self.state.values())
        return tensors + (self.pixel_map.num_bytes if self.pixel_map is not None else 0)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.state.values())

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        meta = {
            "format": _FORMAT,
            "backbone_fingerprint": self.backbone_fingerprint,
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "info": json.dumps(self.info, sort_keys=True, default=str),
        }
        if self.pixel_map is not None:
            meta["pixel_map"] = json.dumps(self.pixel_map.to_dict())
        return save({k: v.contiguous() for k, v in self.state.items()}, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> LoraUpload:
        from safetensors.torch import load

        meta = _safetensors_metadata(data)
        if meta.get("format") != _FORMAT:
            raise LoraMismatchError(f"not a WarmFed LoRA upload (format {meta.get('format')!r})")
        try:
            pixel_map = PixelMap.from_dict(json.loads(meta["pixel_map"])) if "pixel_map" in meta else None
        except ValueError as e:
            raise LoraMismatchError(f"LoRA upload has an unreadable pixel map: {e}") from e
        return cls(
            state=load(data),
            backbone_fingerprint=meta["backbone_fingerprint"],
            config=LoraConfig.from_dict(json.loads(meta["config"])),
            info=json.loads(meta.get("info", "{}")),
            pixel_map=pixel_map,
        )


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise LoraMismatchError("LoRA upload is truncated")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise LoraMismatchError(f"LoRA upload has an unreadable header: {e}") from e
    return dict(header.get("__metadata__", {}))


# --------------------------------------------------------------------------------------
# injecting and removing adapters without leaving a trace
# --------------------------------------------------------------------------------------
def _has_lora(model: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def _inject(model: torch.nn.Module, cfg: LoraConfig) -> None:
    from peft import inject_adapter_in_model

    if _has_lora(model):
        raise RuntimeError("this backbone already carries a LoRA; leave the other apply_lora/training first")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # LoRA A matrices are initialised from the global RNG
        try:
            inject_adapter_in_model(cfg.peft_config(), model, adapter_name=_ADAPTER)
        except ValueError as e:  # "Target modules ... not found in the base model"
            _strip(model)
            raise LoraMismatchError(f"LoRA target modules {list(cfg.modules)} do not fit this backbone: {e}") from e


def _strip(model: torch.nn.Module) -> None:
    """Replace every LoRA-wrapped layer by its original base layer; drop peft's bookkeeping."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, module.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in model.__dict__:
            delattr(model, attr)


@contextlib.contextmanager
def _preserved(model: torch.nn.Module) -> Iterator[None]:
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    mode = model.training
    try:
        yield
    finally:
        _strip(model)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, False))
        model.train(mode)


def _lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=_ADAPTER)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


# --------------------------------------------------------------------------------------
# client training and server loading
# --------------------------------------------------------------------------------------
def train_client_lora(
    backbone: DiffusionBackbone,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    cfg: LoraConfig = LoraConfig(),
    progress: Callable[[int, int, float], None] | None = None,
    *,
    reference: PixelStats | None = None,
) -> LoraUpload:
    """Fine-tune LoRA adapters on a frozen backbone with the backbone's own diffusion loss.

    Deterministic for ``cfg.seed``; only the LoRA parameters are trained; the backbone is
    left as it was found (see the module docstring). ``reference``: the pixel statistics of the
    backbone's public data, which ``cfg.pixel_map="moments"`` maps the client's images onto when
    they share one look (``PixelMap.fit_if_one_look``; the upload's ``pixel_map`` is None otherwise).
    """
    x = _as_images(images)
    pixel_map = None
    if cfg.pixel_map == "moments":
        if reference is None:
            raise ValueError("LoRA pixel_map 'moments' needs reference=PixelStats of the backbone's public images")
        pixel_map = PixelMap.fit_if_one_look(x, reference)  # None: images of several looks, left as they are
        if pixel_map is not None:
            x = pixel_map.to_backbone(x)
    y = _as_labels(labels, backbone.num_classes)
    n = x.shape[0]
    if n == 0 or y.shape[0] != n:
        raise ValueError(f"need the same non-zero number of images and labels, got {n} and {y.shape[0]}")
    unet = backbone.unet
    t0 = time.perf_counter()
    step_losses: list[torch.Tensor] = []  # read once at the end: no device sync per step
    with _preserved(unet):
        _inject(unet, cfg)
        params = []
        for name, p in unet.named_parameters():
            is_lora = "lora_" in name
            p.requires_grad_(is_lora)
            if is_lora:
                params.append(p)
        gen = torch.Generator().manual_seed(cfg.seed)
        unet.train()
        if cfg.steps > 0:
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            # under the caller's fp16 autocast, loss scaling keeps small LoRA gradients from underflowing
            fp16 = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.float16
            scaler = torch.amp.GradScaler("cuda", enabled=fp16)
            with backbone.use_domain(cfg.domain):
                perm, pos = torch.randperm(n, generator=gen), 0
                for step in range(cfg.steps):
                    parts, need = [], cfg.batch_size
                    while need > 0:
                        if pos >= n:
                            perm, pos = torch.randperm(n, generator=gen), 0
                        take = min(need, n - pos)
                        parts.append(perm[pos : pos + take])
                        pos, need = pos + take, need - take
                    idx = torch.cat(parts)
                    loss = backbone.training_loss(x[idx], y[idx], gen)
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    step_losses.append(loss.detach())
                    if progress is not None:
                        progress(step + 1, cfg.steps, float(loss))
        state = _lora_state(unet)
    losses = torch.stack(step_losses).float().cpu().tolist() if step_losses else []
    seconds = time.perf_counter() - t0
    info = {
        "num_images": int(n),
        "seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / max(1, cfg.steps), 4),
        "first_loss": float(np.mean(losses[:10])) if losses else math.nan,
        "final_loss": float(np.mean(losses[-10:])) if losses else math.nan,
        "backbone": backbone.name,
    }
    return LoraUpload(
        state=state, backbone_fingerprint=backbone.fingerprint(), config=cfg, info=info, pixel_map=pixel_map
    )


#: UNets up to this many parameters are copied and merged for sampling; bigger ones (Stable
#: Diffusion) get the adapter injected in place, as a copy would cost gigabytes.
MERGE_MAX_PARAMETERS = 50_000_000


def _load_upload(unet: torch.nn.Module, upload: LoraUpload, where: str) -> None:
    """Inject the upload's adapter into ``unet`` and load its tensors (shapes checked)."""
    from peft import set_peft_model_state_dict

    _inject(unet, upload.config)
    expected = {k: tuple(v.shape) for k, v in _lora_state(unet).items()}
    got = {k: tuple(v.shape) for k, v in upload.state.items()}
    if expected.keys() != got.keys():
        missing = sorted(expected.keys() - got.keys())
        extra = sorted(got.keys() - expected.keys())
        raise LoraMismatchError(
            f"LoRA tensors do not fit backbone {where}: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(extra)} unexpected (e.g. {extra[:2]})"
        )
    bad = [k for k in expected if expected[k] != got[k]]
    if bad:
        raise LoraMismatchError(
            f"LoRA tensor shapes do not fit backbone {where}: {bad[0]} is {got[bad[0]]}, expected {expected[bad[0]]}"
        )
    dtype = next(unet.parameters()).dtype
    result = set_peft_model_state_dict(unet, {k: v.to(dtype) for k, v in upload.state.items()}, adapter_name=_ADAPTER)
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    if unexpected:
        raise LoraMismatchError(f"LoRA tensors not loaded: {unexpected[:3]}")
    for p in unet.parameters():
        p.requires_grad_(False)


def _merged_copy(unet: torch.nn.Module, upload: LoraUpload, where: str) -> torch.nn.Module:
    """A copy of ``unet`` with the upload's LoRA folded into its weights (plain modules again)."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(unet)
    try:
        _load_upload(merged, upload, where)
        for m in merged.modules():
            if isinstance(m, BaseTunerLayer):
                m.merge(adapter_names=[_ADAPTER])
    finally:
        _strip(merged)
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged.eval()


@contextlib.contextmanager
def apply_lora(
    backbone: DiffusionBackbone, upload: LoraUpload, *, merge: bool | None = None
) -> Iterator[DiffusionBackbone]:
    """``with apply_lora(backbone, upload) as personalized: personalized.sample(...)``.

    ``merge`` (default: for UNets up to ``MERGE_MAX_PARAMETERS``) samples with a copy of the
    UNet whose weights have the LoRA folded in: no adapter matmuls at every sampler step, and
    the shared backbone is not touched at all. Otherwise the adapter is injected in place and
    removed on exit. Raises LoraMismatchError if the upload was trained on other base
    weights or its tensors do not fit the modules its config names.
    """
    if upload.backbone_fingerprint != backbone.fingerprint():
        raise LoraMismatchError(
            f"LoRA was trained on backbone {upload.backbone_fingerprint}, this is {backbone.fingerprint()} "
            f"({backbone.name})"
        )
    unet = backbone.unet
    with_unet = getattr(backbone, "with_unet", None)  # only backbones that can copy themselves merge
    can_copy = with_unet is not None
    if merge is None:
        merge = can_copy and sum(p.numel() for p in unet.parameters()) <= MERGE_MAX_PARAMETERS
    if merge:
        if not can_copy:
            raise ValueError(f"backbone {backbone.name} cannot sample with a merged copy (no with_unet)")
        assert with_unet is not None
        personalized = with_unet(_merged_copy(unet, upload, backbone.name))
        with personalized.use_domain(upload.config.domain):
            yield _mapped(personalized, upload.pixel_map)
        return
    with _preserved(unet):
        _load_upload(unet, upload, backbone.name)
        unet.eval()
        with backbone.use_domain(upload.config.domain):
            yield _mapped(backbone, upload.pixel_map)


class _PixelMappedBackbone:
    """A personalized backbone whose samples come back in the client's look (``PixelMap.to_client``)."""

    def __init__(self, inner: DiffusionBackbone, pixel_map: PixelMap) -> None:
        self._inner = inner
        self.pixel_map = pixel_map

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def sample(self, labels: np.ndarray, **kwargs: Any) -> np.ndarray:
        return self.pixel_map.to_client(self._inner.sample(labels, **kwargs))


def _mapped(backbone: DiffusionBackbone, pixel_map: PixelMap | None) -> DiffusionBackbone:
    return backbone if pixel_map is None else _PixelMappedBackbone(backbone, pixel_map)


def privatize_upload(upload: LoraUpload, *, clip_norm: float, noise_multiplier: float, seed: int) -> LoraUpload:
    """Clip the upload's global L2 norm to ``clip_norm`` and add N(0, (noise_multiplier*clip_norm)^2).

    Output perturbation of a one-shot upload (the Gaussian mechanism on the clipped LoRA);
    the accounting of the privacy budget is left to the caller.
    """
    if clip_norm <= 0 or noise_multiplier < 0:
        raise ValueError("clip_norm must be > 0 and noise_multiplier >= 0")
    if upload.pixel_map is not None:
        raise ValueError(
            "the upload's pixel map (moments of the client's pixels) is not privatized: train with pixel_map='none'"
        )
    keys = sorted(upload.state)
    norm = math.sqrt(sum(float(upload.state[k].double().pow(2).sum()) for k in keys))
    scale = min(1.0, clip_norm / max(norm, 1e-12))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k in keys:
        t = upload.state[k].float() * scale
        if noise_multiplier > 0:
            t = t + torch.randn(t.shape, generator=gen) * (noise_multiplier * clip_norm)
        state[k] = t.to(upload.state[k].dtype).contiguous()
    info = dict(upload.info, dp_clip_norm=clip_norm, dp_noise_multiplier=noise_multiplier, dp_pre_clip_norm=norm)
    return LoraUpload(state=state, backbone_fingerprint=upload.backbone_fingerprint, config=upload.config, info=info)
