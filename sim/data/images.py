"""Pixel plumbing shared by the file-based formats: decode, resize, and scale to [-1, 1].

Every format funnels through `decode_image` + `stack_images` (or `resize_nchw` for arrays
already in memory), so all datasets agree on channel order, interpolation and value range.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from sim.data.base import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def decode_image(source: str | Path | bytes, size: int, where: str) -> np.ndarray:
    """Decode one file or byte string to an RGB uint8 (size, size, 3) array.

    Images are squashed to a square (no crop) so nothing of the object is lost; PIL's bilinear
    filter antialiases when shrinking. `where` names the file or row in the error, because one
    corrupt image among thousands is otherwise impossible to find.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            rgb = img.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"cannot read image {where}: {exc}") from exc


def uint8_to_float(images: np.ndarray) -> np.ndarray:
    """uint8 (N, C, H, W) → float32 in [-1, 1]; 0 and 255 map exactly to -1 and 1."""
    out = images.astype(np.float32)
    out /= 127.5
    out -= 1.0
    return np.ascontiguousarray(out)


def stack_images(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """HWC uint8 arrays from `decode_image` → one float32 (N, 3, size, size) array in [-1, 1]."""
    if not images:
        return np.zeros((0, 3, size, size), dtype=np.float32)
    return uint8_to_float(np.stack(images).transpose(0, 3, 1, 2))


def resize_nchw(images: np.ndarray, size: int) -> np.ndarray:
    """Resize a float (N, C, H, W) batch to size×size with bilinear interpolation.

    Antialiasing only when shrinking, matching what PIL does for decoded files, so a dataset
    looks the same whether it came from files or from arrays.
    """
    if images.shape[-2:] == (size, size):
        return np.ascontiguousarray(images, dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    shrink = size < max(images.shape[-2:])
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return np.ascontiguousarray(y.numpy(), dtype=np.float32)
