"""Persistence of the tiny backbone: save/load, the committed default asset, the on-disk cache."""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch

from algorithms.warmfed.diffusion.base import BackboneError, ProgressFn, weights_fingerprint
from algorithms.warmfed.diffusion.tiny import TinyBackbone, TinyBackboneConfig

__all__ = [
    "DEFAULT_ASSET_DIR",
    "save_tiny_backbone",
    "load_tiny_backbone",
    "load_default_asset",
    "get_or_pretrain_tiny_backbone",
]

#: Folder holding the committed default checkpoint (``tiny_backbone.json`` + ``.safetensors``)
#: and, in subfolders, other committed checkpoints.
DEFAULT_ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"

_TINY_FORMAT = "warmfed-tiny-backbone/1"
_TINY_JSON = "tiny_backbone.json"
_TINY_WEIGHTS = "tiny_backbone.safetensors"


def save_tiny_backbone(bb: TinyBackbone, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``tiny_backbone.safetensors`` + ``tiny_backbone.json`` into directory ``path``.

    The json records the config, its key, the data fingerprint and the fingerprint of the
    weights *as saved* (after the dtype round trip), which :func:`load_tiny_backbone` verifies.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().to(dtype).contiguous() for k, v in bb.unet.state_dict().items()}
    reloaded = bb.cfg.build_unet()
    reloaded.load_state_dict({k: v.float() for k, v in tensors.items()})
    meta = {
        "format": _TINY_FORMAT,
        "config": bb.cfg.to_dict(),
        "key": bb.key,
        "data_fingerprint": bb.data_fingerprint,
        "weights_fingerprint": weights_fingerprint({"unet": reloaded}),
        "dtype": str(dtype).replace("torch.", ""),
        "scheduler": bb.cfg.scheduler_config(),
        "info": bb.info,
    }
    save_file(tensors, str(path / _TINY_WEIGHTS), metadata={"format": _TINY_FORMAT, "key": bb.key})
    (path / _TINY_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def load_tiny_backbone(path: str | os.PathLike, *, expected_key: str | None = None) -> TinyBackbone:
    """Load a backbone written by :func:`save_tiny_backbone`; BackboneError if missing or inconsistent."""
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
    bb = TinyBackbone(unet, cfg, data_fp, info=meta.get("info"))
    if meta.get("weights_fingerprint") and bb.fingerprint() != meta["weights_fingerprint"]:
        raise BackboneError(
            f"weights in {wpath} do not match {jpath} (fingerprint {bb.fingerprint()} != {meta['weights_fingerprint']})"
        )
    return bb


def load_default_asset(
    cfg: TinyBackboneConfig, data_fingerprint: str, asset_dir: str | os.PathLike = DEFAULT_ASSET_DIR
) -> TinyBackbone | None:
    """The committed checkpoint whose key matches ``cfg`` + ``data_fingerprint``, else None.

    ``asset_dir`` holds the default backbone and, one folder each, other committed ones (the
    mechanism benchmark's, so that its first run does not pretrain for minutes).
    """
    found = _find_asset(cfg, data_fingerprint, asset_dir)
    return None if found is None else found[0]


def _find_asset(
    cfg: TinyBackboneConfig, data_fingerprint: str, asset_dir: str | os.PathLike
) -> tuple[TinyBackbone, Path] | None:
    asset_dir = Path(asset_dir)
    want = cfg.key(data_fingerprint)
    candidates = [asset_dir, *sorted(p for p in asset_dir.iterdir() if p.is_dir())] if asset_dir.is_dir() else []
    for folder in candidates:
        jpath = folder / _TINY_JSON
        if not jpath.is_file():
            continue
        try:
            recorded = json.loads(jpath.read_text()).get("key")
        except (OSError, json.JSONDecodeError):
            continue
        if recorded != want:
            continue
        try:
            return load_tiny_backbone(folder, expected_key=recorded), folder
        except BackboneError as e:
            warnings.warn(f"ignoring the committed backbone asset {folder}: {e}", stacklevel=2)
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
    show_progress: bool = True,
) -> tuple[TinyBackbone, Path, bool]:
    """Return ``(backbone, path, trained_now)``.

    Looks in ``cache_dir/backbones/<key>/`` first, then the committed asset (used only when
    its key equals ``cfg.key(data_fingerprint)``), else pretrains (with a progress bar on
    stderr unless ``show_progress`` is false: it is the one phase that takes minutes) and
    writes the cache entry atomically (temporary directory + rename; a concurrent writer
    that wins is kept).
    """
    from algorithms.warmfed.diffusion.pretrain import pretrain_tiny_backbone

    key = cfg.key(data_fingerprint)
    final = Path(cache_dir) / "backbones" / key
    if final.is_dir():
        try:
            return load_tiny_backbone(final, expected_key=key), final, False
        except BackboneError as e:
            warnings.warn(f"cached backbone unusable, pretraining again: {e}", stacklevel=2)
            shutil.rmtree(final, ignore_errors=True)
    if asset_dir is not None:
        found = _find_asset(cfg, data_fingerprint, asset_dir)
        if found is not None:
            return found[0], found[1], False
    bb = pretrain_tiny_backbone(
        images, labels, cfg, progress, data_fingerprint=data_fingerprint, show_progress=show_progress
    )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        save_tiny_backbone(bb, tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tiny_backbone(final, expected_key=key), final, True
