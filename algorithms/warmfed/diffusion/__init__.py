"""Diffusion backbones for WarmFed (no Ray, no engine dependency), one job per module:

* ``base``             -- the :class:`DiffusionBackbone` interface, fingerprints, tensor plumbing
* ``tiny``             -- the project's tiny class-conditional UNet (config + model)
* ``sampling``         -- the one sampler helper (DDIM / DPM-Solver++ / UniPC, guided loop)
* ``pretrain``         -- pretraining the tiny UNet on a public split
* ``loaders``          -- save/load, the committed default asset, the on-disk cache
* ``stable_diffusion`` -- a real Stable Diffusion backbone from local files only

Images are float32 ``(N, C, H, W)`` in ``[-1, 1]`` at the classifier's size; labels int64.
"""

from algorithms.warmfed.diffusion.base import (
    BackboneError,
    DiffusionBackbone,
    ProgressFn,
    UNetBackbone,
    array_fingerprint,
    weights_fingerprint,
)
from algorithms.warmfed.diffusion.loaders import (
    DEFAULT_ASSET_DIR,
    get_or_pretrain_tiny_backbone,
    load_default_asset,
    load_tiny_backbone,
    save_tiny_backbone,
)
from algorithms.warmfed.diffusion.pretrain import pretrain_tiny_backbone
from algorithms.warmfed.diffusion.sampling import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_SAMPLER,
    DEFAULT_SAMPLER_STEPS,
    SAMPLERS,
    denoise,
    make_sample_scheduler,
)
from algorithms.warmfed.diffusion.stable_diffusion import (
    DIGIT_CLASS_NAMES,
    StableDiffusionBackbone,
    StableDiffusionConfig,
)
from algorithms.warmfed.diffusion.tiny import AUGMENTATIONS, TinyBackbone, TinyBackboneConfig

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
    # added with the split
    "AUGMENTATIONS",
    "DEFAULT_SAMPLER",
    "DEFAULT_SAMPLER_STEPS",
    "DIGIT_CLASS_NAMES",
    "ProgressFn",
    "SAMPLERS",
    "UNetBackbone",
    "denoise",
    "load_tiny_backbone",
    "make_sample_scheduler",
    "save_tiny_backbone",
    "weights_fingerprint",
]
