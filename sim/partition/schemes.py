"""The built-in partition schemes, one small class each, plus the shared allocation helpers.

Every scheme returns the owner client of each sample and must give every client at least
`data.min_total` samples. None of them retries: proportions are drawn once, then a
deterministic, bounded repair (or a construction that cannot fail) enforces the minimum, so a
build at 10,000 clients and tiny alpha always terminates. Impossible requests are detected
from counts before any drawing and reported with the numbers involved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeGuard

import numpy as np

from sim.partition.base import PartitionError, SchemeInput, register_scheme

# ----------------------------------------------------------------------------- helpers


def _is_real(x: object) -> TypeGuard[int | float | np.integer | np.floating]:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Split the integer `total` proportionally to `weights` (largest-remainder rounding).

    Deterministic and exact (sums to `total`), unlike multinomial sampling it never needs the
    weights to sum to exactly 1 in floating point.
    """
    w = np.asarray(weights, dtype=np.float64)
    n = w.size
    if total <= 0 or n == 0:
        return np.zeros(n, dtype=np.int64)
    s = w.sum()
    if not np.isfinite(s) or s <= 0:
        w = np.ones(n)
        s = float(n)
    exact = w * (total / s)
    base = np.floor(exact).astype(np.int64)
    short = int(total - base.sum())
    if short > 0:
        # stable order: largest fractional part first, ties by client id
        order = np.lexsort((np.arange(n), -(exact - base)))
        base[order[:short]] += 1
    elif short < 0:  # only possible through float rounding; take back from the largest
        order = np.lexsort((np.arange(n), -base))
        base[order[:-short]] -= 1
    return base


def fill_owner(sample_pos: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Owners for the samples at `sample_pos`, shuffled, so that client j gets counts[j] of them."""
    if int(counts.sum()) != sample_pos.size:
        raise AssertionError(f"internal: counts sum {int(counts.sum())} != {sample_pos.size} samples")
    owner = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
    return owner[rng.permutation(sample_pos.size)]


def equal_sizes(n: int, k: int) -> np.ndarray:
    """Sizes of k nearly equal parts of n (first n % k parts one larger)."""
    sizes = np.full(k, n // k, dtype=np.int64)
    sizes[: n % k] += 1
    return sizes


def repair_min_size(
    owner: np.ndarray, num_clients: int, min_total: int, rng: np.random.Generator, labels: np.ndarray | None = None
) -> np.ndarray:
    """Move samples from the largest clients to those below `min_total`; one pass, no retries.

    Donors are cut down to a common water level L >= min_total (the highest level that frees
    enough samples), so the big clients shrink a little each instead of one client being
    emptied; the moved samples are a random subset of each donor's samples, so donors keep
    their label mix. Given `labels`, the moved samples are handed out in (donor, label) runs,
    so a topped-up client is as skewed as the others instead of an IID blend. Requires
    len(owner) >= num_clients * min_total, which callers check up front.
    """
    owner = owner.copy()
    sizes = np.bincount(owner, minlength=num_clients)
    deficit = np.maximum(0, min_total - sizes)
    need = int(deficit.sum())
    if need == 0:
        return owner
    if owner.size < num_clients * min_total:
        raise AssertionError("internal: repair_min_size called on an infeasible group")

    def freed(level: int) -> int:
        return int(np.maximum(0, sizes - level).sum())

    lo, hi = min_total, int(sizes.max())  # freed(lo) >= need, freed(hi) == 0 < need
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if freed(mid) >= need:
            lo = mid
        else:
            hi = mid
    level = lo
    take = np.maximum(0, sizes - level)
    excess = int(take.sum()) - need  # < number of clients above `level`
    if excess > 0:
        above = np.flatnonzero(sizes > level)
        order = above[np.lexsort((above, sizes[above]))]  # the smallest donors give one less
        take[order[:excess]] -= 1

    # a random subset of each donor: sort by (owner, random key), take the first take[j] of each block
    key = rng.random(owner.size)
    order = np.lexsort((key, owner))
    sorted_owner = owner[order]
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    rank = np.arange(owner.size) - starts[sorted_owner]
    moved = order[rank < take[sorted_owner]]  # grouped by donor
    if labels is not None:
        moved = moved[np.lexsort((labels[moved], owner[moved]))]
    needy = rng.permutation(np.flatnonzero(deficit))  # which needy client meets which donor run: random
    owner[moved] = np.repeat(needy, deficit[needy])
    return owner


def _safe_dirichlet(alpha: float, k: int, rng: np.random.Generator) -> np.ndarray:
    p = rng.dirichlet(np.full(k, alpha))
    if not np.all(np.isfinite(p)) or p.sum() <= 0:  # all gammas underflowed: mass on one client
        p = np.zeros(k)
        p[rng.integers(k)] = 1.0
    return p


def dirichlet_owner(
    labels: np.ndarray, num_classes: int, num_clients: int, alpha: float, min_total: int, rng: np.random.Generator
) -> np.ndarray:
    """Hsu et al. label skew over one group of samples: class k is shared out by p_k ~ Dir_J(alpha)."""
    owner = np.empty(labels.size, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    per_class = np.bincount(labels, minlength=num_classes)
    bounds = np.concatenate(([0], np.cumsum(per_class)))
    for k in range(num_classes):  # a loop over classes, never over samples
        n_k = int(per_class[k])
        if n_k == 0:
            continue
        counts = apportion(n_k, _safe_dirichlet(alpha, num_clients, rng))
        pos = order[bounds[k] : bounds[k + 1]]
        owner[pos] = fill_owner(pos, counts, rng)
    return repair_min_size(owner, num_clients, min_total, rng, labels)


def _need(n: int, clients: int, data: SchemeInput, where: str) -> None:
    if n < clients * data.min_total:
        raise PartitionError(
            f"min_size: impossible, {where} has {n} samples for {clients} clients but each client needs "
            f"{data.min_total} (min_size={data.min_size} train + val/test share); need >= {clients * data.min_total}. "
            "Use fewer clients, a smaller min_size or smaller val/test fractions."
        )


def _domain_groups(data: SchemeInput) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(domain, sample positions, global client ids) with clients assigned round-robin j -> j % D."""
    D, J = data.num_domains, data.num_clients
    if J < D:
        raise PartitionError(
            f"num_clients: domain schemes give each client exactly one domain, so num_clients ({J}) "
            f"must be >= num_domains ({D})"
        )
    order = np.argsort(data.domains, kind="stable")
    per_domain = np.bincount(data.domains, minlength=D)
    bounds = np.concatenate(([0], np.cumsum(per_domain)))
    groups = []
    for d in range(D):
        clients = np.arange(d, J, D, dtype=np.int64)
        _need(int(per_domain[d]), clients.size, data, f"domain {d}")
        groups.append((d, order[bounds[d] : bounds[d + 1]], clients))
    return groups


def _check_positive(scheme: str, name: str, value: object, allow_zero: bool = False) -> None:
    ok = _is_real(value) and np.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise PartitionError(f"{scheme}: {name} must be a finite number {bound}, got {value!r}")


# ----------------------------------------------------------------------------- schemes


@dataclass(frozen=True)
class IIDParams:
    pass


@register_scheme("iid", IIDParams)
class IIDScheme:
    """Uniform random split into nearly equal clients: the homogeneous reference point."""

    def assign(self, data: SchemeInput, params: IIDParams, rng: np.random.Generator) -> np.ndarray:
        n = data.labels.size
        _need(n, data.num_clients, data, "the dataset")
        return fill_owner(np.arange(n), equal_sizes(n, data.num_clients), rng)


@dataclass(frozen=True)
class DirichletParams:
    alpha: float = 0.5

    def __post_init__(self) -> None:
        _check_positive("dirichlet", "alpha", self.alpha)


@register_scheme("dirichlet", DirichletParams)
class DirichletScheme:
    """Label skew (Hsu et al. 2019): per class, client shares ~ Dir(alpha); small alpha = few classes per client."""

    def assign(self, data: SchemeInput, params: DirichletParams, rng: np.random.Generator) -> np.ndarray:
        _need(data.labels.size, data.num_clients, data, "the dataset")
        return dirichlet_owner(data.labels, data.num_classes, data.num_clients, params.alpha, data.min_total, rng)


@dataclass(frozen=True)
class ShardsParams:
    classes_per_client: int = 2

    def __post_init__(self) -> None:
        c = self.classes_per_client
        if not isinstance(c, (int, np.integer)) or isinstance(c, bool) or c < 1:
            raise PartitionError(f"shards: classes_per_client must be an integer >= 1, got {c!r}")


@register_scheme("shards", ShardsParams)
class ShardsScheme:
    """Pathological non-IID (McMahan et al. shards, "#C classes"): each client holds exactly C classes.

    Class sets come from random Latin rectangles over blocks of K clients, so every class is
    held by the same number of clients (within C) while each client's set is a uniformly random
    C-subset; each class is then cut into equal shards among its holders. This cannot fail
    half-way, so there is no retry loop. With fewer than K clients some classes have no
    holder and their samples stay unassigned (owner -1).
    """

    def assign(self, data: SchemeInput, params: ShardsParams, rng: np.random.Generator) -> np.ndarray:
        J, C = data.num_clients, params.classes_per_client
        _need(data.labels.size, J, data, "the dataset")
        per_class = np.bincount(data.labels, minlength=data.num_classes)
        present = np.flatnonzero(per_class > 0)
        K = present.size
        if C > K:
            raise PartitionError(
                f"shards: classes_per_client={C} exceeds the {K} classes present in the data "
                f"(num_classes={data.num_classes})"
            )
        # --- class sets: block b of K clients uses Latin rectangle L[i, x] = sigma[(pi[x] + shift_i) % K]
        blocks = -(-J // K)
        sigma = np.argsort(rng.random((blocks, K)), axis=1)
        pi = np.argsort(rng.random((blocks, K)), axis=1)
        shifts = np.argsort(rng.random((blocks, K)), axis=1)[:, :C]
        slot = rng.permutation(J)  # client -> position in the block layout
        b, x = slot // K, slot % K
        cols = (pi[b, x][:, None] + shifts[b]) % K  # (J, C), distinct per row
        held = present[sigma[b[:, None], cols]]  # (J, C) class ids
        # --- cut each class into equal shards among its holders
        pair_client = np.repeat(np.arange(J, dtype=np.int64), C)
        pair_class = held.ravel()
        porder = np.lexsort((rng.random(pair_class.size), pair_class))
        holders = np.bincount(pair_class, minlength=data.num_classes)
        short = np.flatnonzero((holders > 0) & (per_class < holders))
        if short.size:
            k = int(short[0])
            raise PartitionError(
                f"shards: class {k} has {int(per_class[k])} samples but {int(holders[k])} clients must hold it; "
                f"use fewer clients or a smaller classes_per_client"
            )
        hstart = np.concatenate(([0], np.cumsum(holders)[:-1]))
        sorder = np.lexsort((rng.random(data.labels.size), data.labels))
        slab = data.labels[sorder]
        cstart = np.concatenate(([0], np.cumsum(per_class)[:-1]))
        rank = np.arange(slab.size) - cstart[slab]
        part = (rank * holders[slab]) // per_class[slab]  # equal shards, sizes differ by <= 1
        owner = np.full(data.labels.size, -1, dtype=np.int64)
        used = holders[slab] > 0
        owner[sorder[used]] = pair_client[porder][hstart[slab[used]] + part[used]]
        sizes = np.bincount(owner[owner >= 0], minlength=J)
        small = np.flatnonzero(sizes < data.min_total)
        if small.size:
            j = int(small[0])
            raise PartitionError(
                f"min_size: shards give client {j} only {int(sizes[j])} samples (classes {sorted(held[j].tolist())}), "
                f"{small.size} client(s) below the {data.min_total} needed for min_size={data.min_size}; "
                "use fewer clients, a larger classes_per_client or a smaller min_size"
            )
        return owner


@dataclass(frozen=True)
class QuantityParams:
    sigma: float = 1.0

    def __post_init__(self) -> None:
        _check_positive("quantity", "sigma", self.sigma, allow_zero=True)


@register_scheme("quantity", QuantityParams)
class QuantityScheme:
    """Quantity skew: client sizes ~ log-normal(0, sigma) on top of the minimum, labels IID.

    The minimum is granted first and only the rest is shared by the log-normal weights, so
    the size constraint holds by construction.
    """

    def assign(self, data: SchemeInput, params: QuantityParams, rng: np.random.Generator) -> np.ndarray:
        n, J = data.labels.size, data.num_clients
        _need(n, J, data, "the dataset")
        weights = rng.lognormal(0.0, params.sigma, J)
        sizes = data.min_total + apportion(n - J * data.min_total, weights)
        return fill_owner(np.arange(n), sizes, rng)


@dataclass(frozen=True)
class DomainParams:
    pass


@register_scheme("domain", DomainParams)
class DomainScheme:
    """Feature skew (FedBN style): client j holds only domain j % D, an IID share of it."""

    def assign(self, data: SchemeInput, params: DomainParams, rng: np.random.Generator) -> np.ndarray:
        owner = np.empty(data.labels.size, dtype=np.int64)
        for _, pos, clients in _domain_groups(data):
            local = fill_owner(pos, equal_sizes(pos.size, clients.size), rng)
            owner[pos] = clients[local]
        return owner


@dataclass(frozen=True)
class DomainDirichletParams:
    alpha: float = 0.5

    def __post_init__(self) -> None:
        _check_positive("domain-dirichlet", "alpha", self.alpha)


@register_scheme("domain-dirichlet", DomainDirichletParams)
class DomainDirichletScheme:
    """Feature skew x label skew: clients of a domain as in "domain", labels Dir(alpha) inside each domain."""

    def assign(self, data: SchemeInput, params: DomainDirichletParams, rng: np.random.Generator) -> np.ndarray:
        owner = np.empty(data.labels.size, dtype=np.int64)
        for _, pos, clients in _domain_groups(data):
            local = dirichlet_owner(data.labels[pos], data.num_classes, clients.size, params.alpha, data.min_total, rng)
            owner[pos] = clients[local]
        return owner
