"""`digits-domains`: scikit-learn's bundled 8×8 digits rendered in several visual domains.

A no-download stand-in for Digits-5 / DomainNet feature skew (FedBN, WarmFed): the same
digit shapes appear in every domain, so label semantics are shared while low-level image
statistics (intensity, colour, noise, stroke width) differ per domain — exactly what domain
partitions and per-domain personalisation must cope with.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sim.data.assemble import stratified_holdout
from sim.data.base import ArrayDataset, DatasetError
from sim.data.registry import register_dataset
from sim.rng import stream_rng

NAME = "digits-domains"
ALL_DOMAINS: tuple[str, ...] = ("plain", "inverted", "colored", "noisy", "thick")
CLASS_NAMES = tuple(str(d) for d in range(10))

# Separate RNG streams, so e.g. the "noisy" images are the same whichever other domains are
# requested, and changing the public fraction never changes how a domain is drawn.
_SPLIT_STREAM, _PUBLIC_STREAM = 0, 1
_DOMAIN_STREAM = {d: 10 + i for i, d in enumerate(ALL_DOMAINS)}


@dataclass(frozen=True)
class DigitsDomainsParams:
    image_size: int = 16
    domains: tuple[str, ...] = ALL_DOMAINS
    public_fraction: float = 0.2
    seed: int = 0
    shift: int = 1
    copies: int = 1  # renders of every client digit per domain (fresh shifts, colours, noise each)

    def __post_init__(self) -> None:
        object.__setattr__(self, "domains", tuple(self.domains))
        if self.image_size < 8:
            raise DatasetError(f"data.image_size must be >= 8 (the source digits are 8×8), got {self.image_size}")
        if not self.domains:
            raise DatasetError(f"data.domains must name at least one domain; allowed: {', '.join(ALL_DOMAINS)}")
        unknown = [d for d in self.domains if d not in ALL_DOMAINS]
        if unknown:
            raise DatasetError(f"data.domains: unknown domain {unknown[0]!r}; allowed: {', '.join(ALL_DOMAINS)}")
        if len(set(self.domains)) != len(self.domains):
            raise DatasetError(f"data.domains lists a domain twice: {list(self.domains)}")
        if not 0.0 <= self.public_fraction <= 0.9:
            raise DatasetError(f"data.public_fraction must be in [0, 0.9], got {self.public_fraction}")
        if self.seed < 0:
            raise DatasetError(f"data.seed must be >= 0, got {self.seed}")
        if not 0 <= self.shift < self.image_size // 2:
            raise DatasetError(f"data.shift must be in [0, {self.image_size // 2 - 1}], got {self.shift}")
        if self.copies < 1:
            raise DatasetError(f"data.copies must be >= 1, got {self.copies}")


@lru_cache(maxsize=1)
def _source_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as float32 in [0, 1] (ink = 1) and their labels; read once per process.

    Reads scikit-learn's bundled CSV directly: `import sklearn` alone costs ~0.9 s on a cold
    process, ten times the whole build. Falls back to `load_digits()` if the file has moved.
    """
    spec = importlib.util.find_spec("sklearn")
    locations = spec.submodule_search_locations if spec else None
    csv = Path(locations[0]) / "datasets" / "data" / "digits.csv.gz" if locations else None
    if csv is not None and csv.is_file():
        with gzip.open(csv) as f:
            raw = np.loadtxt(f, delimiter=",")
        flat, target = raw[:, :-1], raw[:, -1]
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        flat, target = d.data, d.target
    images = (flat.reshape(-1, 8, 8) / 16.0).astype(np.float32)
    labels = target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _upscale(gray: np.ndarray, size: int) -> np.ndarray:
    x = torch.tensor(gray)[:, None]  # a copy: the cached source array is read-only
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return y[:, 0].clamp_(0.0, 1.0).numpy()


def _translate(gray: np.ndarray, shift: int, rng: np.random.Generator) -> np.ndarray:
    """Shift every image by its own random (dy, dx) in [-shift, shift], filling with background."""
    if shift == 0:
        return gray
    n, h, w = gray.shape
    padded = np.pad(gray, ((0, 0), (shift, shift), (shift, shift)))
    oy = np.asarray(rng.integers(0, 2 * shift + 1, size=n))  # asarray: numpy's stubs type a sized draw as a scalar
    ox = np.asarray(rng.integers(0, 2 * shift + 1, size=n))
    rows = (oy[:, None] + np.arange(h))[:, :, None]
    cols = (ox[:, None] + np.arange(w))[:, None, :]
    return padded[np.arange(n)[:, None, None], rows, cols]


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV → RGB, (N,) each → (N, 3); avoids importing matplotlib for one function."""
    i = np.floor(h * 6.0).astype(int) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack(
        [
            np.stack([v, t, p], 1),
            np.stack([q, v, p], 1),
            np.stack([p, v, t], 1),
            np.stack([p, q, v], 1),
            np.stack([t, p, v], 1),
            np.stack([v, p, q], 1),
        ]
    )
    return table[i, np.arange(h.size)].astype(np.float32)


def _blend(gray: np.ndarray, bg: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Digit in colour `fg` over background `bg`; bg/fg broadcast against (N, 3, H, W)."""
    g = gray[:, None]
    return bg * (1.0 - g) + fg * g


def _render_plain(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.repeat(gray[:, None], 3, axis=1)


def _render_inverted(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.repeat(1.0 - gray[:, None], 3, axis=1)


def _render_colored(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """MNIST-M style: a per-image saturated colour with a smooth random texture, digit in the complementary colour.

    Saturation ≥ 0.6 and value ≥ 0.7 keep at least one channel ≥ 0.4 away from its complement,
    so the digit stays readable on every background.
    """
    n, size = int(gray.shape[0]), int(gray.shape[-1])
    base = _hsv_to_rgb(rng.random(n), rng.uniform(0.6, 1.0, n), rng.uniform(0.7, 1.0, n))
    coarse = torch.from_numpy(rng.random((n, 3, 4, 4), dtype=np.float32))
    texture = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp_(0, 1).numpy()
    bg = base[:, :, None, None] * (0.65 + 0.35 * texture)
    fg = (1.0 - base)[:, :, None, None]
    return _blend(gray, bg, fg)


def _render_noisy(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Plain digit under strong per-channel Gaussian noise plus 5 % salt-and-pepper pixels."""
    out = _render_plain(gray, rng) + rng.normal(0.0, 0.3, size=(gray.shape[0], 3) + gray.shape[1:]).astype(np.float32)
    hit = rng.random(gray.shape) < 0.05
    salt = rng.random(gray.shape) < 0.5
    out = np.where(hit[:, None], salt[:, None].astype(np.float32), out)
    return out


def _render_thick(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dilated strokes (a max-pool scaled to the image size) in amber on dark navy."""
    size = gray.shape[-1]
    k = 2 * max(1, round(size / 16)) + 1
    thick = F.max_pool2d(torch.from_numpy(gray)[:, None], k, stride=1, padding=k // 2)[:, 0].numpy()
    bg = np.array([0.05, 0.08, 0.25], dtype=np.float32)[None, :, None, None]
    fg = np.array([1.0, 0.78, 0.2], dtype=np.float32)[None, :, None, None]
    return _blend(thick, bg, fg)


_RENDERERS = {
    "plain": _render_plain,
    "inverted": _render_inverted,
    "colored": _render_colored,
    "noisy": _render_noisy,
    "thick": _render_thick,
}


def render(gray: np.ndarray, domain: str, shift: int, rng: np.random.Generator) -> np.ndarray:
    """Upscaled [0, 1] digits (N, S, S) → float32 (N, 3, S, S) in [-1, 1] in the look of `domain`."""
    moved = _translate(gray, shift, rng)
    rgb = _RENDERERS[domain](moved, rng)
    out = np.clip(rgb, 0.0, 1.0) * 2.0 - 1.0
    return np.ascontiguousarray(out, dtype=np.float32)


@register_dataset(NAME, DigitsDomainsParams)
def build_digits_domains(p: DigitsDomainsParams) -> ArrayDataset:
    """Split source digits once into public/client, then render the client digits in every requested domain.

    `copies` > 1 renders each client digit that many times per domain (domain-major, then copy),
    so large client counts get distinct samples: client digits (1,438 by default) × domains × copies.
    """
    src, labels = _source_digits()
    pub_idx, cli_idx = stratified_holdout(labels, p.public_fraction, stream_rng(p.seed, _SPLIT_STREAM))
    gray = _upscale(src, p.image_size)

    parts = []
    for d in p.domains:
        for copy in range(p.copies):
            # Copy 0 uses the original stream (copies=1 is byte-identical to the single render);
            # every further copy draws its own shifts, colours and noise from a stream of its own.
            stream = (p.seed, _DOMAIN_STREAM[d]) + ((copy,) if copy else ())
            parts.append(render(gray[cli_idx], d, p.shift, stream_rng(*stream)))
    n_cli = cli_idx.size * p.copies
    images = np.concatenate(parts) if len(parts) > 1 else parts[0]
    client_labels = np.tile(labels[cli_idx], len(p.domains) * p.copies)
    domains = np.repeat(np.arange(len(p.domains), dtype=np.int64), n_cli)

    public = None
    if pub_idx.size:
        pub_images = render(gray[pub_idx], "plain", p.shift, stream_rng(p.seed, _PUBLIC_STREAM))
        public = ArrayDataset(
            f"{NAME}:public",
            pub_images,
            labels[pub_idx].copy(),
            np.zeros(pub_idx.size, dtype=np.int64),
            CLASS_NAMES,
            ("plain",),
        )
    return ArrayDataset(NAME, images, client_labels, domains, CLASS_NAMES, tuple(p.domains), public)
