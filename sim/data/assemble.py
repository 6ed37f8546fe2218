"""Turn per-sample label / domain values into an `ArrayDataset`, optionally holding one domain out as public.

Shared by image-folder, parquet and cifar10 so that class-name ordering, domain indexing and
the public split behave identically whatever the file format.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sim.data.base import ArrayDataset, DatasetError

DEFAULT_DOMAIN = "default"


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def encode_values(values: Sequence, what: str, source: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Map values to indices into their sorted unique set (numeric order for ints, lexicographic for strings)."""
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64), ()
    if all(_is_int(v) for v in values):
        arr = np.asarray(values, dtype=np.int64)
    elif all(isinstance(v, str) for v in values):
        arr = np.asarray(values, dtype=str)
    else:
        bad = next((v for v in values if not (_is_int(v) or isinstance(v, str))), None)
        if bad is None:  # a mix of ints and strings: show a string, the odd one out is ambiguous
            bad = next(v for v in values if isinstance(v, str))
        raise DatasetError(
            f"{source}: {what} values must be all integers or all strings; found {bad!r} ({type(bad).__name__})"
        )
    names, codes = np.unique(arr, return_inverse=True)
    return codes.reshape(-1).astype(np.int64), tuple(str(n) for n in names)


def make_dataset(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    domain_values: Sequence[str] | None,
    public_domain: str | None,
    source: str,
) -> ArrayDataset:
    """Build the client dataset, moving the samples of `public_domain` (if any) into `.public`.

    `labels` are indices into `class_names`, computed over *all* samples first so client and
    public data share one class indexing.
    """
    n = images.shape[0]
    if domain_values is None:
        domain_values = [DEFAULT_DOMAIN] * n
    dom_arr = np.asarray(list(domain_values), dtype=str)
    if public_domain is None:
        codes, dom_names = encode_values(list(dom_arr), "domain", source)
        return ArrayDataset(name, images, labels, codes, tuple(class_names), dom_names)
    present = sorted(set(dom_arr.tolist()))
    if public_domain not in present:
        raise DatasetError(
            f"{source}: public_domain {public_domain!r} is not a domain of this dataset; "
            f"domains found: {', '.join(present)}"
        )
    if len(present) == 1:
        raise DatasetError(
            f"{source}: public_domain {public_domain!r} is the only domain, so no client data would be left"
        )
    is_pub = dom_arr == public_domain
    public = ArrayDataset(
        f"{name}:public",
        np.ascontiguousarray(images[is_pub]),
        labels[is_pub],
        np.zeros(int(is_pub.sum()), dtype=np.int64),
        tuple(class_names),
        (public_domain,),
    )
    keep = ~is_pub
    codes, dom_names = encode_values(list(dom_arr[keep]), "domain", source)
    return ArrayDataset(
        name, np.ascontiguousarray(images[keep]), labels[keep], codes, tuple(class_names), dom_names, public
    )


def stratified_holdout(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (held-out, rest), taking round(fraction · n_c) of every class c.

    Stratified so the public set has every class in the same proportion as the client data:
    a diffusion backbone pretrained on it must know every class.
    """
    held, rest = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        k = int(round(fraction * idx.size))
        held.append(idx[:k])
        rest.append(idx[k:])
    return np.sort(np.concatenate(held)), np.sort(np.concatenate(rest))
