"""Reuse of LoRA uploads and synthetic sets between the variants of a run: content keys, and
which parameters cannot change which artifact."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sim.files import replacing


def content_key(*parts: Any) -> str:
    """sha256 over JSON-able parts and arrays/tensors (dtype, shape, bytes): a cache key by content."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().numpy()
        if isinstance(part, np.ndarray):
            a = np.ascontiguousarray(part)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"|")
    return h.hexdigest()[:32]


# Fields that cannot change a client's LoRA upload; every other field (so any LoRA field added
# later) is part of the upload's key.
NOT_LORA = frozenset(
    {
        "synth_per_class",
        "sampler",
        "sampler_steps",
        "guidance_scale",
        "save_grids",
        "server_finetune",
        "server_epochs",
        "server_lr",
        "server_batch_size",
        "augment_shift",
        "round_server_epochs",
        "round_server_lr",
        "round_lr",
        "upload",
        "oneshot_personal",
        "check_synthetic",
        "check_judge",
        "check_lr",
        "personal_lr",
        "dsd",
        "dsd_teacher",
        "dsd_tau",
        "dsd_lambda0",
        "dsd_schedule",
        "dsd_selection",
        "dsd_threshold",
        "dsd_client_weighting",
        "dsd_margin",
        "dsd_teacher_mode",
        "dsd_combine",
        "reuse",
    }
)
# Fields that cannot change a client's synthetic set once its LoRA upload is fixed.
NOT_SYNTHESIS = NOT_LORA - {"synth_per_class", "sampler", "sampler_steps", "guidance_scale"}


def write_cached(path: Path, data: bytes) -> None:
    """A cache entry, written whole or not at all (`sim.files.replacing`): variants of one run may
    fill the same cache from several actors at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        tmp.write_bytes(data)
