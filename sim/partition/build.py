"""Build a Partition from label/domain arrays: validate, assign owners, split each client, hash.

The held-out split is derived from each client's total size n with one rounding rule
(`split_counts`), chosen so that train(n) never decreases as n grows. That lets the builder
compute, once and up front, the smallest client size `min_total` giving min_size train and
>= 1 test samples, and hand schemes a single number to guarantee.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from sim.partition.base import (
    SPLITS,
    Partition,
    PartitionError,
    SchemeInput,
    SplitFractions,
    get_scheme,
    resolve_params,
)
from sim.rng import stream_rng

# Bump when a change to the algorithms would give different partitions for the same inputs:
# it is part of the hash, so stale cached partitions are simply not found.
ALGORITHM_VERSION = 1


def _int_arg(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        raise PartitionError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise PartitionError(f"{name}: must be >= {minimum}, got {value}")
    return int(value)


def partition_spec(
    dataset_fingerprint: str,
    scheme: str,
    params: Mapping[str, Any] | Any | None,
    num_clients: int,
    seed: int,
    min_size: int,
    split: SplitFractions | Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The validated, canonical description of a partition: exactly what the key hashes."""
    if not isinstance(dataset_fingerprint, str) or not dataset_fingerprint:
        raise PartitionError(f"dataset_fingerprint: expected a non-empty string, got {dataset_fingerprint!r}")
    p = resolve_params(scheme, params)
    sf = SplitFractions.coerce(split)
    return {
        "algorithm_version": ALGORITHM_VERSION,
        "dataset_fingerprint": dataset_fingerprint,
        "scheme": scheme,
        "params": {f.name: _plain(getattr(p, f.name)) for f in dataclasses.fields(p)},
        "num_clients": _int_arg("num_clients", num_clients, 1),
        "seed": _int_arg("seed", seed, 0),
        "min_size": _int_arg("min_size", min_size, 1),
        "split": {"val": sf.val, "test": sf.test},
    }


def _plain(v: Any) -> Any:
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


def key_of_spec(spec: Mapping[str, Any]) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace, shortest float repr) -> 16 hex digits."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:16]


def partition_key(
    dataset_fingerprint: str,
    scheme: str,
    params: Mapping[str, Any] | Any | None,
    num_clients: int,
    seed: int,
    min_size: int,
    split: SplitFractions | Mapping[str, Any] | None,
) -> str:
    """Content hash of everything that determines a partition; identical in every process and machine."""
    return key_of_spec(partition_spec(dataset_fingerprint, scheme, params, num_clients, seed, min_size, split))


# ----------------------------------------------------------------------------- per-client splits


def split_counts(n: np.ndarray | int, split: SplitFractions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) counts for clients of total size n (n >= 2).

    held = clip(round(n * (val+test)), 1, n-1); test = max(1, round(held * test/(val+test)));
    val = held - test. Since val+test < 1, train = n - held is non-decreasing in n.
    """
    n = np.asarray(n, dtype=np.int64)
    h = split.val + split.test
    held = np.clip(np.floor(n * h + 0.5).astype(np.int64), 1, np.maximum(n - 1, 1))
    test = np.clip(np.floor(held * (split.test / h) + 0.5).astype(np.int64), 1, held)
    return n - held, held - test, test


def min_total_per_client(min_size: int, split: SplitFractions) -> int:
    """Smallest client size n with >= min_size train samples (and, by construction, >= 1 test)."""

    def train(n: int) -> int:
        return int(split_counts(n, split)[0])

    lo = min_size + 1  # train <= n - 1
    hi = int(np.ceil((min_size + 2) / (1.0 - split.val - split.test))) + 2
    while train(hi) < min_size:  # never taken for valid fractions; kept as a guard, bounded by float range
        hi *= 2
    while lo < hi:  # binary search: train(n) is monotone
        mid = (lo + hi) // 2
        if train(mid) >= min_size:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _pick(r: np.ndarray, k: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Centered systematic sampling: True for exactly k of the ranks r = 0..n-1, evenly spaced.

    The half-interval offset keeps picks away from the ends of the (class-sorted) order, so
    a class with only a couple of samples in a small client is not the one emptied.
    """
    c = n // 2
    return ((r + 1) * k + c) // n - (r * k + c) // n == 1


def _split_clients(
    owner: np.ndarray, labels: np.ndarray, num_clients: int, split: SplitFractions, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Cut every client's samples into train/val/test, stratified by label, fully vectorized.

    Each client's samples are ordered by (a random class order, random tie-break) and the
    held-out samples are taken at evenly spaced ranks (systematic sampling), so a client's test
    split mirrors its own label mix: personalized accuracy is measured on the client's
    distribution.
    """
    assigned = np.flatnonzero(owner >= 0)
    own = owner[assigned]
    class_rank = rng.permutation(int(labels.max()) + 1 if labels.size else 1)
    order = np.lexsort((rng.random(assigned.size), class_rank[labels[assigned]], own))
    idx, own = assigned[order], own[order]
    n = np.bincount(own, minlength=num_clients)
    _, n_val, n_test = split_counts(n, split)
    starts = np.concatenate(([0], np.cumsum(n)[:-1]))
    r = np.arange(idx.size, dtype=np.int64) - starts[own]
    nn, tt = n[own], n_test[own]
    is_test = _pick(r, tt, nn)
    # rank among the not-yet-held-out samples of the same client
    rest = ~is_test
    cs = np.cumsum(rest)
    before = np.concatenate(([0], cs))[starts][own]
    r2 = cs - 1 - before
    rn, vv = (n - n_test)[own], n_val[own]
    is_val = rest & _pick(r2, vv, rn)
    masks = {"train": rest & ~is_val, "val": is_val, "test": is_test}
    indices, offsets = {}, {}
    for s in SPLITS:
        i_s, o_s = idx[masks[s]], own[masks[s]]
        o2 = np.lexsort((i_s, o_s))  # canonical: client order, ascending sample index inside
        indices[s] = i_s[o2]
        offsets[s] = np.concatenate(([0], np.cumsum(np.bincount(o_s, minlength=num_clients))))
    return indices, offsets


def majority_domain(
    indices: Mapping[str, np.ndarray],
    offsets: Mapping[str, np.ndarray],
    domains: np.ndarray,
    num_clients: int,
    num_domains: int,
) -> np.ndarray:
    """Domain holding a strict majority of each client's samples (all splits), else -1."""
    counts = np.zeros((num_clients, num_domains), dtype=np.int64)
    for s in SPLITS:
        own = np.repeat(np.arange(num_clients, dtype=np.int64), np.diff(offsets[s]))
        counts += np.bincount(own * num_domains + domains[indices[s]], minlength=num_clients * num_domains).reshape(
            num_clients, num_domains
        )
    best = counts.argmax(axis=1)
    total = counts.sum(axis=1)
    return np.where(2 * counts[np.arange(num_clients), best] > total, best, -1).astype(np.int64)


# ----------------------------------------------------------------------------- entry point


def check_arrays(
    labels: Any, domains: Any, num_classes: Any, num_domains: Any
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Validate the dataset arrays; domains=None means a single domain."""
    num_classes = _int_arg("num_classes", num_classes, 1)
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise PartitionError(f"labels: expected a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise PartitionError(
            f"labels: values must be in [0, num_classes={num_classes}), found [{labels.min()}, {labels.max()}]"
        )
    if domains is None:
        domains, num_domains = np.zeros(labels.size, dtype=np.int64), 1
    num_domains = _int_arg("num_domains", num_domains, 1)
    domains = np.asarray(domains)
    if domains.shape != labels.shape or not (np.issubdtype(domains.dtype, np.integer) or domains.size == 0):
        raise PartitionError(
            f"domains: expected an integer array shaped like labels {labels.shape}, got {domains.shape} {domains.dtype}"
        )
    domains = domains.astype(np.int64, copy=False)
    if domains.size and (domains.min() < 0 or domains.max() >= num_domains):
        raise PartitionError(
            f"domains: values must be in [0, num_domains={num_domains}), found [{domains.min()}, {domains.max()}]"
        )
    return labels, domains, num_classes, num_domains


def build_partition(
    labels: np.ndarray,
    domains: np.ndarray | None,
    num_classes: int,
    num_domains: int,
    *,
    scheme: str,
    params: Mapping[str, Any] | Any | None = None,
    num_clients: int,
    seed: int,
    min_size: int = 10,
    split: SplitFractions | Mapping[str, Any] | None = None,
    dataset_fingerprint: str,
) -> Partition:
    """Deterministically partition the dataset; same arguments give the same Partition and key.

    Every client gets >= min_size train, >= 1 test sample; sample indices are disjoint across
    clients and splits. Raises PartitionError (before any drawing) when that is impossible.
    """
    labels, domains, num_classes, num_domains = check_arrays(labels, domains, num_classes, num_domains)
    spec = partition_spec(dataset_fingerprint, scheme, params, num_clients, seed, min_size, split)
    sf = SplitFractions(**spec["split"])
    p = resolve_params(scheme, spec["params"])
    J = spec["num_clients"]
    min_total = min_total_per_client(spec["min_size"], sf)
    if labels.size < J * min_total:
        raise PartitionError(
            f"min_size: impossible, {labels.size} samples cannot give {J} clients {min_total} samples each "
            f"(min_size={spec['min_size']} train + val {sf.val:g} / test {sf.test:g} share); need >= {J * min_total}. "
            "Use fewer clients, a smaller min_size or smaller val/test fractions."
        )
    rng = stream_rng(spec["seed"])
    data = SchemeInput(labels, domains, num_classes, num_domains, J, min_total, spec["min_size"])
    owner = np.asarray(get_scheme(scheme).assign(data, p, rng), dtype=np.int64)
    sizes = np.bincount(owner[owner >= 0], minlength=J)
    if owner.shape != labels.shape or owner.max(initial=-1) >= J or sizes.min() < min_total:
        raise AssertionError(f"internal: scheme {scheme!r} broke its contract (owner shape/range or min size)")
    indices, offsets = _split_clients(owner, labels, J, sf, rng)
    client_domain = majority_domain(indices, offsets, domains, J, num_domains)
    meta = dict(spec, n_samples=int(labels.size), num_classes=num_classes, num_domains=num_domains)
    return Partition(J, indices, offsets, client_domain, key_of_spec(spec), meta)
