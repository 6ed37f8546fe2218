"""`image-folder`: images on disk as `root/<domain>/<class>/*` (DomainNet, PACS, Office-Home) or `root/<class>/*`.

The layout is detected rather than configured: if first-level directories hold class
sub-directories with images, the first level is the domain; otherwise it is the class and
the whole set is one domain, "default". A class folder without images is an error naming it
(a class that silently vanished would shift every label after it), unless
`data.allow_empty_classes` turns it into a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sim.data.assemble import encode_values, make_dataset
from sim.data.base import ArrayDataset, DatasetError, require_path
from sim.data.images import IMAGE_EXTENSIONS, decode_image, is_image_file, stack_images
from sim.data.registry import register_dataset

log = logging.getLogger(__name__)

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
    allow_empty_classes: bool = False  # an empty class folder: a warning instead of an error

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


def scan(root: Path, allow_empty: bool = False) -> list[tuple[str, str, Path]]:
    """(domain, class, file) for every image, in sorted order so caps and results are deterministic."""
    first = _subdirs(root)
    nested = any(_images_in(sub) for d in first for sub in _subdirs(d))
    if not nested:
        classes = {d: _images_in(d) for d in first}
        _check_empty([d for d, files in classes.items() if not files], allow_empty, any(classes.values()))
        return [("default", d.name, f) for d, files in classes.items() for f in files]
    entries = []
    empty: list[Path] = []
    for dom in first:
        loose = _images_in(dom)
        if loose:
            raise DatasetError(
                f"mixed layout under {root}: {dom} holds images ({loose[0].name}) and class "
                f"directories are used elsewhere; {LAYOUT}"
            )
        for cls in _subdirs(dom):
            files = _images_in(cls)
            empty += [] if files else [cls]
            entries += [(dom.name, cls.name, f) for f in files]
    _check_empty(empty, allow_empty, bool(entries))
    return entries


def _check_empty(empty: list[Path], allow: bool, any_images: bool) -> None:
    if not empty or not any_images:  # nothing at all: the caller's "no images found" says it better
        return
    names = ", ".join(str(d) for d in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
    if not allow:
        raise DatasetError(
            f"empty class folder{'s' if len(empty) > 1 else ''} (no images ending in "
            f"{', '.join(IMAGE_EXTENSIONS)}): {names}; remove {'them' if len(empty) > 1 else 'it'} "
            f"or set data.allow_empty_classes=true"
        )
    log.warning("image-folder: left out empty class folder%s %s", "s" if len(empty) > 1 else "", names)


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
    entries = _cap(scan(root, p.allow_empty_classes), p.max_per_class)
    if not entries:
        raise DatasetError(f"no images found under {root}; {LAYOUT}")
    images = stack_images([decode_image(f, p.image_size, str(f)) for _, _, f in entries], p.image_size)
    labels, class_names = encode_values([c for _, c, _ in entries], "class", str(root))
    return make_dataset(NAME, images, labels, class_names, [d for d, _, _ in entries], p.public_domain, str(root))
