"""`image-folder`: images on disk as `root/<domain>/<class>/*` (DomainNet, PACS, Office-Home) or `root/<class>/*`.

The layout is detected rather than configured: if first-level directories hold class
sub-directories with images, the first level is the domain; otherwise it is the class and
the whole set is one domain, "default".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from sim.data.assemble import encode_values, make_dataset
from sim.data.base import ArrayDataset, DatasetError, require_path
from sim.data.images import IMAGE_EXTENSIONS, decode_image, is_image_file, stack_images
from sim.data.registry import register_dataset

NAME = "image-folder"
LAYOUT = (
    f"expected root/<domain>/<class>/<image> or root/<class>/<image> with images ending in "
    f"{', '.join(IMAGE_EXTENSIONS)}"
)


@dataclass(frozen=True)
class ImageFolderParams:
    path: str | None = None
    image_size: int = 32
    max_per_class: int | None = None
    public_domain: str | None = None

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise DatasetError(f"data.image_size must be >= 1, got {self.image_size}")
        if self.max_per_class is not None and self.max_per_class < 1:
            raise DatasetError(f"data.max_per_class must be >= 1 or null, got {self.max_per_class}")


def _subdirs(d: Path) -> list[Path]:
    """Visible sub-directories in sorted order (skips .git, __MACOSX and similar archive debris)."""
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def _images_in(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if is_image_file(p))


def scan(root: Path) -> list[tuple[str, str, Path]]:
    """(domain, class, file) for every image, in sorted order so caps and results are deterministic."""
    first = _subdirs(root)
    nested = any(_images_in(sub) for d in first for sub in _subdirs(d))
    if not nested:
        return [("default", d.name, f) for d in first for f in _images_in(d)]
    entries = []
    for dom in first:
        loose = _images_in(dom)
        if loose:
            raise DatasetError(
                f"mixed layout under {root}: {dom} holds images ({loose[0].name}) and class "
                f"directories are used elsewhere; {LAYOUT}"
            )
        entries += [(dom.name, cls.name, f) for cls in _subdirs(dom) for f in _images_in(cls)]
    return entries


def _cap(entries: list[tuple[str, str, Path]], k: int | None) -> list[tuple[str, str, Path]]:
    if k is None:
        return entries
    seen: dict[tuple[str, str], int] = {}
    kept = []
    for dom, cls, f in entries:
        n = seen.get((dom, cls), 0)
        if n < k:
            kept.append((dom, cls, f))
        seen[(dom, cls)] = n + 1
    return kept


@register_dataset(NAME, ImageFolderParams)
def build_image_folder(p: ImageFolderParams) -> ArrayDataset:
    root = require_path(p.path, NAME, LAYOUT)
    entries = _cap(scan(root), p.max_per_class)
    if not entries:
        raise DatasetError(f"no images found under {root}; {LAYOUT}")
    images = stack_images([decode_image(f, p.image_size, str(f)) for _, _, f in entries], p.image_size)
    labels, class_names = encode_values([c for _, c, _ in entries], "class", str(root))
    return make_dataset(
        NAME, images, labels, class_names, [d for d, _, _ in entries], p.public_domain, str(root)
    )
