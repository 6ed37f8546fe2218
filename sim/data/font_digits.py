"""`font-digits`: digits typed in the fonts matplotlib ships, in styles the public split lacks.

The mechanism benchmark of WarmFed's personalized diffusion: the public split (what the
server's backbone pretrains on) holds plain white-on-black digits only, while every client
domain is a *style* -- a texture, frame, shadow or background pattern with its own colours --
that no photometric recolouring of plain digits produces. A client LoRA is then worth its
upload only if its samples take on the client's style; the plain backbone cannot.

Glyphs: 21 fonts (DejaVu Sans/Serif/Mono with their bold/italic/oblique faces, STIX General,
Computer Modern), each digit drawn at a random size, rotation and offset at 4x the image size
and box-downsampled (anti-aliasing). No download: the fonts are matplotlib's package data.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from sim.data.base import ArrayDataset, DatasetError
from sim.data.registry import register_dataset
from sim.rng import stream_rng

NAME = "font-digits"
CLASS_NAMES = tuple(str(d) for d in range(10))
FONTS: tuple[str, ...] = (
    "DejaVuSans",
    "DejaVuSans-Bold",
    "DejaVuSans-Oblique",
    "DejaVuSans-BoldOblique",
    "DejaVuSansMono",
    "DejaVuSansMono-Bold",
    "DejaVuSansMono-Oblique",
    "DejaVuSansMono-BoldOblique",
    "DejaVuSerif",
    "DejaVuSerif-Bold",
    "DejaVuSerif-Italic",
    "DejaVuSerif-BoldItalic",
    "STIXGeneral",
    "STIXGeneralBol",
    "STIXGeneralItalic",
    "STIXGeneralBolIta",
    "cmr10",
    "cmb10",
    "cmss10",
    "cmti10",
    "cmtt10",
)
#: The public split's style; never a client domain.
PUBLIC_STYLE = "plain"
STYLES: tuple[str, ...] = ("stripes", "frame", "shadow", "checker", "gradient")
DEFAULT_DOMAINS: tuple[str, ...] = ("stripes", "frame", "shadow", "checker")

_SUPER = 4  # glyphs are drawn at 4x the image size, then box-downsampled
_PUBLIC_STREAM = 1
_DOMAIN_STREAM = {d: 10 + i for i, d in enumerate(STYLES)}


@dataclass(frozen=True)
class FontDigitsParams:
    image_size: int = 16
    domains: tuple[str, ...] = DEFAULT_DOMAINS
    per_class: int = 150  # client images per class and domain
    public_per_class: int = 200  # public (plain) images per class
    fonts: tuple[str, ...] = FONTS
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "domains", tuple(self.domains))
        object.__setattr__(self, "fonts", tuple(self.fonts))
        if not 12 <= self.image_size <= 64:
            raise DatasetError(f"data.image_size must be in [12, 64], got {self.image_size}")
        if not self.domains:
            raise DatasetError(f"data.domains must name at least one style; allowed: {', '.join(STYLES)}")
        unknown = [d for d in self.domains if d not in STYLES]
        if unknown:
            hint = " (the public split's style)" if unknown[0] == PUBLIC_STYLE else ""
            raise DatasetError(
                f"data.domains: {unknown[0]!r} is not a client style{hint}; allowed: {', '.join(STYLES)}"
            )
        if len(set(self.domains)) != len(self.domains):
            raise DatasetError(f"data.domains lists a style twice: {list(self.domains)}")
        if self.per_class < 1 or self.public_per_class < 0:
            raise DatasetError("data.per_class must be >= 1 and data.public_per_class >= 0")
        if not self.fonts:
            raise DatasetError(f"data.fonts must name at least one font; allowed: {', '.join(FONTS)}")
        bad = [f for f in self.fonts if f not in FONTS]
        if bad:
            raise DatasetError(f"data.fonts: unknown font {bad[0]!r}; allowed: {', '.join(FONTS)}")
        if self.seed < 0:
            raise DatasetError(f"data.seed must be >= 0, got {self.seed}")


@lru_cache(maxsize=1)
def _font_dir() -> Path:
    try:
        import matplotlib
    except ImportError as e:  # a dependency of the project; say what to install if it is gone
        raise DatasetError("dataset 'font-digits' needs matplotlib (its bundled fonts): pip install matplotlib") from e
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@lru_cache(maxsize=64)
def _glyph_bank(fonts: tuple[str, ...], big: int) -> np.ndarray:
    """Every (font, digit) drawn once, centred, digit height half the canvas: (F, 10, big, big) in [0, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    bank = np.zeros((len(fonts), 10, big, big), np.float32)
    for f, name in enumerate(fonts):
        path = _font_dir() / f"{name}.ttf"
        if not path.is_file():
            raise DatasetError(f"dataset 'font-digits': font file missing from matplotlib: {path}")
        font = ImageFont.truetype(str(path), int(round(0.5 * big / 0.73)))  # cap height ~0.73 em
        for d in range(10):
            img = Image.new("L", (big, big), 0)
            ImageDraw.Draw(img).text((big / 2, big / 2), str(d), fill=255, font=font, anchor="mm")
            bank[f, d] = np.asarray(img, np.float32) / 255.0
    bank.setflags(write=False)
    return bank


def glyphs(labels: np.ndarray, fonts: tuple[str, ...], size: int, rng: np.random.Generator) -> np.ndarray:
    """Ink masks (N, size, size) in [0, 1] of the digits ``labels``, one random font, scale,
    rotation and offset each (drawn from ``rng`` in a fixed order: deterministic).

    Each glyph is drawn once per font and moved by a batched affine warp at 4x the image
    size, then box-downsampled: one PIL draw per (font, digit), not per image.
    """
    import torch
    import torch.nn.functional as F

    n, big = len(labels), size * _SUPER
    bank = _glyph_bank(tuple(fonts), big)
    font_idx = rng.integers(0, len(fonts), n)
    height = rng.uniform(0.55, 0.8, n)  # digit height as a fraction of the image
    angle = np.deg2rad(rng.uniform(-12.0, 12.0, n))
    offset = rng.uniform(-0.16, 0.16, (n, 2))  # in the warp's [-1, 1] coordinates
    src = torch.from_numpy(np.ascontiguousarray(bank[font_idx, np.asarray(labels)]))[:, None]
    inv = 0.5 / height  # output -> source coordinates: the bank's digits are half the canvas high
    cos, sin = np.cos(angle) * inv, np.sin(angle) * inv
    theta = np.stack([np.stack([cos, -sin, -offset[:, 0] * inv], 1), np.stack([sin, cos, -offset[:, 1] * inv], 1)], 1)
    # affine_grid by hand (pixel centres, align_corners=False): torch's own is slow on CPU
    c = (np.arange(big, dtype=np.float32) * 2 + 1) / big - 1
    base = np.stack([np.tile(c, big), np.repeat(c, big), np.ones(big * big, np.float32)], 1)  # (P, 3): x, y, 1
    grid = torch.matmul(torch.from_numpy(base), torch.from_numpy(theta.astype(np.float32)).transpose(1, 2))
    grid = grid.reshape(n, big, big, 2)
    warped = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return F.avg_pool2d(warped, _SUPER)[:, 0].clamp_(0, 1).numpy()


def _rgb(*c: float) -> np.ndarray:
    return np.array(c, np.float32)[None, :, None, None]


def _jitter(rng: np.random.Generator, n: int, base: np.ndarray, amount: float = 0.06) -> np.ndarray:
    """A per-image colour near the style's own (so a style is a family, not one colour)."""
    return np.clip(base + rng.uniform(-amount, amount, (n, 3, 1, 1)).astype(np.float32), 0.0, 1.0)


def _over(bg: np.ndarray, ink: np.ndarray, colour: np.ndarray) -> np.ndarray:
    a = ink[:, None]
    return bg * (1.0 - a) + colour * a


def style(ink: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    """Compose ink masks (N, S, S) into RGB images (N, 3, S, S) in [0, 1] in style ``name``."""
    n, s = ink.shape[0], ink.shape[-1]
    yy, xx = np.mgrid[0:s, 0:s]
    if name == "plain":
        return np.repeat(ink[:, None], 3, axis=1)
    if name == "stripes":  # orange digit over navy/black horizontal stripes (period 4 px)
        phase = np.asarray(rng.integers(0, 4, n))[:, None, None]  # asarray: numpy's stubs type a sized draw as a scalar
        band = (((yy[None] + phase) // 2) % 2).astype(np.float32)[:, None]
        bg = _jitter(rng, n, _rgb(0.1, 0.15, 0.55)) * band + _rgb(0.02, 0.02, 0.08) * (1 - band)
        return _over(bg, ink, _jitter(rng, n, _rgb(1.0, 0.6, 0.1)))
    if name == "frame":  # light-green digit on dark grey inside a 1-px magenta frame
        border = ((yy == 0) | (xx == 0) | (yy == s - 1) | (xx == s - 1)).astype(np.float32)[None, None]
        bg = _jitter(rng, n, _rgb(0.18, 0.18, 0.18))
        bg = bg * (1 - border) + _jitter(rng, n, _rgb(1.0, 0.2, 0.8)) * border
        return _over(bg, ink, _jitter(rng, n, _rgb(0.6, 1.0, 0.6)))
    if name == "shadow":  # dark-red digit with a grey drop shadow (+1, +1 px) on cream
        shadow = np.zeros_like(ink)
        shadow[:, 1:, 1:] = ink[:, :-1, :-1]
        bg = _over(_jitter(rng, n, _rgb(0.95, 0.9, 0.72)), shadow, _rgb(0.5, 0.5, 0.55))
        return _over(bg, ink, _jitter(rng, n, _rgb(0.6, 0.05, 0.05)))
    if name == "checker":  # blue digit over a light/mid grey checkerboard of 4-px cells
        oy, ox = rng.integers(0, 8, (2, n))[:, :, None, None]
        cell = ((((yy[None] + oy) // 4) + ((xx[None] + ox) // 4)) % 2).astype(np.float32)[:, None]
        bg = _rgb(0.92, 0.92, 0.92) * cell + _rgb(0.62, 0.62, 0.62) * (1 - cell)
        return _over(bg, ink, _jitter(rng, n, _rgb(0.05, 0.1, 0.85)))
    if name == "gradient":  # cyan digit on a vertical magenta-to-black gradient
        ramp = (1.0 - yy / (s - 1)).astype(np.float32)[None, None]
        bg = _jitter(rng, n, _rgb(0.8, 0.1, 0.6)) * ramp
        return _over(bg, ink, _jitter(rng, n, _rgb(0.2, 0.95, 0.95)))
    raise DatasetError(f"unknown font-digits style {name!r}; allowed: {PUBLIC_STYLE}, {', '.join(STYLES)}")


def render(labels: np.ndarray, name: str, fonts: tuple[str, ...], size: int, rng: np.random.Generator) -> np.ndarray:
    """Digits ``labels`` in style ``name`` as float32 (N, 3, size, size) in [-1, 1]."""
    rgb = style(glyphs(labels, fonts, size, rng), name, rng)
    return np.ascontiguousarray(np.clip(rgb, 0.0, 1.0) * 2.0 - 1.0, dtype=np.float32)


@register_dataset(NAME, FontDigitsParams)
def build_font_digits(p: FontDigitsParams) -> ArrayDataset:
    """Client images: ``per_class`` per class in every requested style (domain-major); public:
    ``public_per_class`` per class in the plain style. Every style draws its glyphs from its
    own RNG stream, so a style's images do not depend on which other styles are requested."""
    labels = np.repeat(np.arange(10, dtype=np.int64), p.per_class)
    parts = [render(labels, d, p.fonts, p.image_size, stream_rng(p.seed, _DOMAIN_STREAM[d])) for d in p.domains]
    images = np.concatenate(parts) if len(parts) > 1 else parts[0]
    client_labels = np.tile(labels, len(p.domains))
    domains = np.repeat(np.arange(len(p.domains), dtype=np.int64), labels.size)
    public = None
    if p.public_per_class:
        pub_labels = np.repeat(np.arange(10, dtype=np.int64), p.public_per_class)
        pub = render(pub_labels, PUBLIC_STYLE, p.fonts, p.image_size, stream_rng(p.seed, _PUBLIC_STREAM))
        public = ArrayDataset(
            f"{NAME}:public", pub, pub_labels, np.zeros(pub_labels.size, np.int64), CLASS_NAMES, (PUBLIC_STYLE,)
        )
    return ArrayDataset(NAME, images, client_labels, domains, CLASS_NAMES, tuple(p.domains), public)
