"""A client's pixel map: a per-channel affine map from its images onto the backbone's public look.

A pixel-space backbone pretrained on bright digits on a dark ground cannot learn, in a LoRA's
hundred steps, to draw *dark* digits on a *light* ground: the adapter takes the new colours but
loses the digit (class fidelity at chance on font-digits' shadow and checker domains, README
"Fidelity"). Inverting the polarity is a sign flip of every pixel, a map the adapter would have
to find inside the network; here the client applies it outside, before the LoRA sees its data:

    to_backbone(x)[c] = scale[c] · (x[c] − client_mean[c]) + public_mean[c]
    scale[c] = ± min(MAX_GAIN, public_std[c] / client_std[c])

The sign is the one that gives the client's luminance (the channel mean) the skew the public
images' has: ink is the minority, so plain digits are right-skewed (a long tail of bright
pixels); a client whose tail points the other way (dark ink on a light ground) is flipped. Skew,
not median or mode, because a textured ground (a checkerboard of two greys) has no single
background value. One sign for all channels, because polarity is a property of ink against
ground, not of a colour channel: a channel without contrast has no skew to read, and flipping it
alone would change hues. The gain is capped so that a nearly flat channel is not blown up into
noise. The map assumes that the client's images share one look: ``fit_if_one_look`` fits it only when at
least ``MIN_AGREEMENT`` of them have, each on its own, the luminance skew sign of the set (on
font-digits 0.93-1.00 of a domain's images do); a client mixing dark-on-light and light-on-dark
images gets no map (with one compromise map such clients fell from 0.79 to 0.29 validation global
accuracy). The client's LoRA then learns the residual look in the backbone's space, and
the server maps every sample back with ``to_client``. The map is 3 numbers per channel, uploaded
with the LoRA; like the LoRA it is computed from the client's data (moments of its pixels), so
WarmFed sends none under differential privacy (``privatize_upload`` does not noise it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["PixelStats", "PixelMap", "PIXEL_MAPS", "MAX_GAIN", "MIN_AGREEMENT", "auto_pixel_map", "polarity_agreement"]

#: none: the LoRA trains on the client's pixels as they are | moments: on its pixel-mapped images
PIXEL_MAPS: tuple[str, ...] = ("none", "moments")
_MIN_STD = 1e-3  # a flat channel carries no polarity: it is shifted, not scaled
MAX_GAIN = 4.0
MIN_AGREEMENT = 0.9


def auto_pixel_map(one_look_backbone: bool, has_public: bool, private: bool) -> str:
    """What ``lora_pixel_map: auto`` means: ``moments`` for a backbone that knows one look (a tiny
    backbone pretrained with augment none), on a dataset with a public split, without DP noise;
    ``none`` otherwise. A photometrically augmented backbone already draws every colour and
    polarity, and there a per-client map cost 5 points of validation global accuracy on the
    default benchmark."""
    return "moments" if one_look_backbone and has_public and not private else "none"


def _batch(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """The images as a float64 (N, C, H, W) array."""
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"pixel statistics need a non-empty (N, C, H, W) batch, got shape {x.shape}")
    return x.astype(np.float64)


def _moments(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, standard deviation and skewness of each row of a 2-D array."""
    mean, std = rows.mean(1), rows.std(1)
    z = (rows - mean[:, None]) / np.maximum(std, _MIN_STD)[:, None]
    return mean, std, (z**3).mean(1)


@dataclass(frozen=True)
class PixelStats:
    """Mean, standard deviation and skewness of each channel's pixels."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    skew: tuple[float, ...]

    @classmethod
    def of(cls, images: np.ndarray | torch.Tensor) -> PixelStats:
        x = _batch(images)
        mean, std, skew = _moments(x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1))
        return cls(tuple(mean.tolist()), tuple(std.tolist()), tuple(skew.tolist()))

    def per_channel(self, channels: int) -> PixelStats:
        """These statistics for ``channels`` channels (a grey reference serves every colour channel)."""
        if len(self.mean) == channels:
            return self
        if len(self.mean) != 1:
            avg = [float(np.mean(v)) for v in (self.mean, self.std, self.skew)]
            return PixelStats((avg[0],) * channels, (avg[1],) * channels, (avg[2],) * channels)
        return PixelStats(self.mean * channels, self.std * channels, self.skew * channels)


def _luminance(images: np.ndarray | torch.Tensor) -> np.ndarray:
    return _batch(images).mean(1, keepdims=True)


def polarity_agreement(images: np.ndarray | torch.Tensor) -> float:
    """Fraction of the images whose own luminance skew has the sign of the whole set's."""
    lum = _luminance(images)
    per_image = _moments(lum.reshape(len(lum), -1))[2]
    overall = PixelStats.of(lum).skew[0]
    return float(np.mean(np.sign(per_image) == np.sign(overall)))


@dataclass(frozen=True)
class PixelMap:
    """``to_backbone`` / ``to_client``: the client's affine pixel map (see the module docstring)."""

    scale: tuple[float, ...]
    client_mean: tuple[float, ...]
    public_mean: tuple[float, ...]

    def __post_init__(self) -> None:
        n = len(self.scale)
        if n == 0 or len(self.client_mean) != n or len(self.public_mean) != n:
            raise ValueError("a pixel map needs one scale and two means per channel")
        if any(not np.isfinite(s) or s == 0 for s in self.scale):
            raise ValueError(f"pixel map scales must be finite and non-zero, got {self.scale}")

    @classmethod
    def fit(cls, client_images: np.ndarray | torch.Tensor, reference: PixelStats) -> PixelMap:
        client = PixelStats.of(client_images)
        ref = reference.per_channel(len(client.mean))
        luminance = PixelStats.of(_luminance(client_images))
        sign = -1.0 if luminance.skew[0] * float(np.mean(ref.skew)) < 0 else 1.0
        scale = [
            sign * min(MAX_GAIN, r_std / c_std) if c_std >= _MIN_STD else 1.0
            for c_std, r_std in zip(client.std, ref.std, strict=True)
        ]
        return cls(tuple(scale), client.mean, ref.mean)

    @classmethod
    def fit_if_one_look(cls, client_images: np.ndarray | torch.Tensor, reference: PixelStats) -> PixelMap | None:
        """`fit`, or None when the images do not share one polarity (see the module docstring)."""
        if polarity_agreement(client_images) < MIN_AGREEMENT:
            return None
        return cls.fit(client_images, reference)

    @property
    def channels(self) -> int:
        return len(self.scale)

    def _coefficients(self, like: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if like.shape[1] != self.channels:
            raise ValueError(f"pixel map is for {self.channels} channels, images have {like.shape[1]}")
        shape = (1, self.channels, 1, 1)
        scale, cm, pm = (
            np.asarray(v, np.float32).reshape(shape) for v in (self.scale, self.client_mean, self.public_mean)
        )
        return scale, cm, pm

    def to_backbone(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The client's images in the backbone's look, clipped to the backbone's [-1, 1]."""
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images, np.float32))
        scale, cm, pm = (torch.from_numpy(v) for v in self._coefficients(x))
        return ((x.float() - cm) * scale + pm).clamp_(-1.0, 1.0)

    def to_client(self, images: np.ndarray) -> np.ndarray:
        """Backbone samples back in the client's look, in [-1, 1]."""
        scale, cm, pm = self._coefficients(images)
        return np.clip((np.asarray(images, np.float32) - pm) / scale + cm, -1.0, 1.0).astype(np.float32)

    def to_dict(self) -> dict[str, list[float]]:
        return {"scale": list(self.scale), "client_mean": list(self.client_mean), "public_mean": list(self.public_mean)}

    @classmethod
    def from_dict(cls, d: dict[str, Sequence[float]]) -> PixelMap:
        try:
            return cls(
                tuple(map(float, d["scale"])), tuple(map(float, d["client_mean"])), tuple(map(float, d["public_mean"]))
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed pixel map {d!r}: {e}") from e

    @property
    def num_bytes(self) -> int:
        return 3 * self.channels * 4  # three float32 per channel on the wire
