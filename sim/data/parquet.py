"""`parquet`: encoded images in a Parquet file or a directory of them (the Hugging Face datasets export format).

Columns: image bytes (PNG/JPEG; a Hugging Face `{bytes, path}` struct also works), a label
(int or string) and optionally a domain string.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sim.data.assemble import encode_values, make_dataset
from sim.data.base import ArrayDataset, DatasetError, require_path
from sim.data.images import decode_image, stack_images
from sim.data.registry import register_dataset

NAME = "parquet"
DEFAULT_DOMAIN_COLUMN = "domain"
LAYOUT = "expected a .parquet file or a directory of .parquet files with an image-bytes column and a label column"


@dataclass(frozen=True)
class ParquetParams:
    path: str | None = None
    image_size: int = 32
    image_column: str = "image"
    label_column: str = "label"
    domain_column: str | None = DEFAULT_DOMAIN_COLUMN
    public_domain: str | None = None

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise DatasetError(f"data.image_size must be >= 1, got {self.image_size}")


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    files = sorted(f for f in root.iterdir() if f.is_file() and f.suffix.lower() == ".parquet")
    if not files:
        raise DatasetError(f"no .parquet files in directory {root}; {LAYOUT}")
    return files


def _columns(f: Path) -> list[str]:
    try:
        return pq.read_schema(f).names
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError on non-parquet files
        raise DatasetError(f"cannot read Parquet file {f}: {exc}; {LAYOUT}") from exc


def _read(files: list[Path], columns: list[str]) -> pa.Table:
    tables = []
    for f in files:
        present = _columns(f)
        for col in columns:
            if col not in present:
                raise DatasetError(f"column {col!r} missing in Parquet file {f}; columns present: {', '.join(present)}")
        tables.append(pq.read_table(f, columns=columns))
    try:
        return pa.concat_tables(tables, promote_options="default")
    except pa.ArrowInvalid as exc:
        raise DatasetError(f"Parquet files under {files[0].parent} have incompatible column types: {exc}") from exc


def _image_bytes(col: pa.ChunkedArray, name: str, source: str) -> list:
    if pa.types.is_struct(col.type) and col.type.get_field_index("bytes") >= 0:
        col = pa.chunked_array([c.field("bytes") for c in col.chunks], type=col.type.field("bytes").type)
    if not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
        raise DatasetError(f"{source}: column {name!r} must hold encoded image bytes (binary), got {col.type}")
    return col.to_pylist()


def _values(col: pa.ChunkedArray, name: str, source: str) -> list:
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if col.null_count:
        raise DatasetError(f"{source}: column {name!r} has {col.null_count} null values")
    return col.to_pylist()


@register_dataset(NAME, ParquetParams)
def build_parquet(p: ParquetParams) -> ArrayDataset:
    root = require_path(p.path, NAME, LAYOUT, directory=False)  # a file or a folder of files
    files = _files(root)
    source = str(root)

    domain_col = p.domain_column
    first_columns = _columns(files[0])
    if domain_col is not None and domain_col not in first_columns:
        if domain_col != DEFAULT_DOMAIN_COLUMN or p.public_domain is not None:
            # An explicitly named (or needed) domain column that is absent is a mistake, not a single-domain set.
            present = ", ".join(first_columns)
            raise DatasetError(f"column {domain_col!r} missing in Parquet file {files[0]}; columns present: {present}")
        domain_col = None
    if p.public_domain is not None and domain_col is None:
        raise DatasetError(f"{source}: public_domain {p.public_domain!r} needs a domain column (data.domain_column)")

    columns = [p.image_column, p.label_column] + ([domain_col] if domain_col else [])
    table = _read(files, columns)
    if table.num_rows == 0:
        raise DatasetError(f"no rows in {source}; {LAYOUT}")
    blobs = _image_bytes(table.column(p.image_column), p.image_column, source)
    images = []
    for i, b in enumerate(blobs):
        if b is None:
            raise DatasetError(f"{source}: row {i} has no image bytes in column {p.image_column!r}")
        images.append(decode_image(b, p.image_size, f"row {i} of {source}"))
    labels, class_names = encode_values(_values(table.column(p.label_column), p.label_column, source), "label", source)
    domains = _values(table.column(domain_col), domain_col, source) if domain_col else None
    if domains is not None and not all(isinstance(d, str) for d in domains):
        domains = [str(d) for d in domains]
    return make_dataset(NAME, stack_images(images, p.image_size), labels, class_names, domains, p.public_domain, source)
