"""The diffusion backbone of a WarmFed run, loaded once per process (actor) and shared by every
client that process serves: pretrained on a cache miss, committed or cached otherwise."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from algorithms.warmfed.params import WarmFedParams
from sim.devices import process_device

# One backbone per process (actor), shared by every client that actor serves.
_BACKBONES: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def _public_split(run) -> Any:
    """The dataset's public split (loaded here: the server actor holds no dataset)."""
    from sim.data import load_dataset

    return load_dataset(run.dataset_name, run.dataset_params).public


def load_backbone(params: WarmFedParams, run, public: Any = None, report=None) -> Any:
    """The backbone for this run, cached per process; pretrains the tiny one only on a cache miss.

    `public` is the dataset's public split when the caller has it (client actors do); the
    server loads it itself.
    """
    from algorithms.warmfed.diffusion import (
        DiffusionBackbone,
        StableDiffusionBackbone,
        StableDiffusionConfig,
        TinyBackboneConfig,
        get_or_pretrain_tiny_backbone,
    )

    c, size = run.model_spec.in_channels, run.model_spec.image_size
    key = (
        params.backbone,
        params.sd_model,
        params.prompt_template,
        params.pretrain_steps,
        params.pretrain_augment,
        params.backbone_channels,
        c,
        size,
        run.model_spec.num_classes,
        run.cache_dir,
        run.dataset_fingerprint,
    )
    with _LOCK:
        if key in _BACKBONES:  # a warm actor's: reported as any cache hit, so metrics never depend on warmth
            if report is not None:
                report("pretrained_now", 0.0)
                report("backbone_bytes", float(_BACKBONES[key].num_bytes()))
            return _BACKBONES[key]
        backbone: DiffusionBackbone
        if params.backbone == "stable-diffusion":
            assert params.sd_model, "WarmFedParams validates sd_model for stable-diffusion"
            backbone = StableDiffusionBackbone(
                StableDiffusionConfig(
                    model=params.sd_model,
                    class_names=tuple(run.class_names),
                    prompt_template=params.prompt_template,
                    image_size=size,
                    in_channels=c,
                )
            )
            trained_now = False
        else:
            public = public if public is not None else _public_split(run)
            if public is None:
                raise ValueError(
                    f"dataset {run.dataset_name!r} has no public split to pretrain the tiny backbone on; set "
                    "data.public_fraction (digits-domains) or data.public_domain, or use backbone=stable-diffusion"
                )
            steps: dict[str, Any] = {} if params.pretrain_steps is None else {"train_steps": params.pretrain_steps}
            if params.pretrain_augment is not None:
                steps["augment"] = params.pretrain_augment
            if params.backbone_channels is not None:
                steps["block_out_channels"] = params.backbone_channels
            cfg = TinyBackboneConfig(image_size=size, in_channels=c, num_classes=run.model_spec.num_classes, **steps)
            backbone, _, trained_now = get_or_pretrain_tiny_backbone(
                Path(run.cache_dir), public.images, public.labels, cfg, public.fingerprint()
            )
        if report is not None:
            report("pretrained_now", float(trained_now))
            report("backbone_bytes", float(backbone.num_bytes()))
        backbone.to(process_device())  # the GPU Ray gave this actor, or the CPU
        _BACKBONES.clear()  # a process serves one run at a time
        _BACKBONES[key] = backbone
        return backbone
