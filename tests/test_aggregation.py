"""The aggregation tree's bits, on inputs where float64 addition is not associative.

`tests/test_chunked_training.py` checks that any cut of a round gives the same mean, but on
inputs whose sums are exact in float64 any summation order gives the same bits, so a running
sum or a tree joining the wrong subtrees would pass it. Here the payloads mix 1e16 and 1.0
(1e16 + 1 rounds back to 1e16), so the order of the additions shows in the result, and the
expected sums come from an independent statement of the tree: the pairwise sum over the
positions 0..n-1 padded to a power of two, where a node without a right child is its left
child. The mean is read as float64 (`like` in float64), since a cast to float32 would hide
exactly the low bits these tests look at.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from algorithms.aggregation import Aggregator
from algorithms.base import ClientUpdate
from tests.test_chunked_training import _cut_sum as cut_aggregate

BIG = 1e16


def tree_sum(values: list[float]) -> float:
    """The fixed pairwise tree over positions [0, n) padded to the next power of two."""

    def node(lo: int, hi: int) -> float | None:
        if lo >= len(values):
            return None
        if hi - lo == 1:
            return values[lo]
        mid = (lo + hi) // 2
        left, right = node(lo, mid), node(mid, hi)
        return left if right is None else left + right

    size = 1
    while size < len(values):
        size *= 2
    return node(0, size)


def running_sum(values: list[float]) -> float:
    total = 0.0
    for v in values:
        total = total + v
    return total


def inexact_columns(n: int, columns: int, seed: int) -> np.ndarray:
    """n×columns values drawn from {±1e16, ±1, ±3}: most columns' sums depend on the order of addition."""
    rng = np.random.default_rng(seed)
    return rng.choice([BIG, -BIG, 1.0, -1.0, 3.0, 1.0], size=(n, columns)).astype(np.float64)


def updates_from(values: np.ndarray) -> list[ClientUpdate]:
    """Weight 1 per client: the products are exact, so only the summation order decides the bits."""
    return [ClientUpdate(i, {"w": torch.from_numpy(values[i].copy())}, 1.0) for i in range(len(values))]


def tree_mean(values: np.ndarray) -> torch.Tensor:
    n = len(values)
    sums = [tree_sum(list(values[:, j])) for j in range(values.shape[1])]
    return torch.tensor(sums, dtype=torch.float64) / float(n)


def test_the_inputs_really_tell_a_tree_from_a_running_sum():
    # the guard for every test below: on these inputs the order of addition changes the result
    assert tree_sum([BIG, 1.0, -BIG, 1.0]) == 0.0 and running_sum([BIG, 1.0, -BIG, 1.0]) == 1.0
    values = inexact_columns(16, 200, seed=0)
    differ = sum(tree_sum(list(values[:, j])) != running_sum(list(values[:, j])) for j in range(200))
    assert differ > 20


def test_a_small_tree_worked_by_hand():
    # positions 0..4: ((x0 + x1) + (x2 + x3)) + x4. By hand: 1e16 + 1 = 1e16 and -1e16 + 1 = -1e16
    # (the 1 is lost twice), so the tree gives 0 + 1 = 1; a running sum gives 1e16, 1e16, 0, 1, 2.
    values = np.array([[BIG], [1.0], [-BIG], [1.0], [1.0]])
    assert tree_sum(list(values[:, 0])) == 1.0 and running_sum(list(values[:, 0])) == 2.0
    agg = Aggregator()
    for u in updates_from(values):
        agg.add(u)
    mean = agg.mean({"w": torch.zeros(1, dtype=torch.float64)})["w"]
    assert mean.item() == 1.0 / 5.0
    assert (agg.count, agg.total) == (5, 5.0)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 8, 12, 16, 33])
def test_one_by_one_gives_the_bits_of_the_pairwise_tree(n):
    values = inexact_columns(n, 64, seed=n)
    agg = Aggregator()
    for u in updates_from(values):
        agg.add(u)
    got = agg.mean({"w": torch.zeros(64, dtype=torch.float64)})["w"]
    assert torch.equal(got, tree_mean(values)), (n, (got - tree_mean(values)).abs().max())


@pytest.mark.parametrize("n", [5, 6, 7, 11, 16, 33])
def test_every_cut_gives_the_bits_of_the_pairwise_tree(n):
    """Partials starting at odd positions hold subtrees that must NOT be joined with their
    neighbours (they are not siblings): a cut that joins them gives other bits."""
    values = inexact_columns(n, 64, seed=100 + n)
    updates = updates_from(values)
    expected = tree_mean(values)
    rng = np.random.default_rng(n)
    cuts_to_try = [[1], [3], [1, 2, 3], list(range(1, n)), [n // 2], [1, n - 2]]
    cuts_to_try += [
        sorted(rng.choice(np.arange(1, n), size=int(rng.integers(1, n)), replace=False).tolist()) for _ in range(6)
    ]
    for cuts in cuts_to_try:
        cuts = sorted(set(c for c in cuts if 0 < c < n))
        agg = cut_aggregate(updates, cuts)
        got = agg.mean({"w": torch.zeros(64, dtype=torch.float64)})["w"]
        assert agg.count == n and agg.end == n
        assert torch.equal(got, expected), (n, cuts)


def test_weights_are_summed_over_the_same_tree():
    # large and small positive weights: the total itself depends on the order of addition
    weights = [BIG, BIG, BIG, BIG, 3.0, 3.0, 1.0]
    updates = [ClientUpdate(i, {"w": torch.ones(1, dtype=torch.float64)}, w) for i, w in enumerate(weights)]
    assert tree_sum(weights) != running_sum(weights)
    for cuts in ([], [1], [3], [1, 4, 5], [2, 3, 6]):
        agg = cut_aggregate(updates, cuts)
        assert agg.total == tree_sum(weights), cuts
        # Σ w·1 over the tree divided by the tree's Σ w: exactly 1 only if both use the same order
        assert agg.mean({"w": torch.zeros(1, dtype=torch.float64)})["w"].item() == 1.0, cuts


def test_the_mean_weighs_each_client_by_its_weight():
    updates = [
        ClientUpdate(0, {"w": torch.tensor([1.0, 0.0])}, 3.0),
        ClientUpdate(1, {"w": torch.tensor([0.0, 1.0])}, 1.0),
    ]
    agg = Aggregator()
    for u in updates:
        agg.add(u)
    assert torch.equal(agg.mean({"w": torch.zeros(2)})["w"], torch.tensor([0.75, 0.25]))


# ----- edge cases of the mean (each written against a mutant that survived `make mutation`) ----------
def test_one_client_of_weight_one_and_fractional_weights_are_averaged():
    # SCAFFOLD sends weight 1.0 per client: one client alone is a total of exactly 1
    one = Aggregator()
    one.add(ClientUpdate(0, {"w": torch.tensor([2.0, -4.0])}, 1.0))
    assert torch.equal(one.mean({"w": torch.zeros(2)})["w"], torch.tensor([2.0, -4.0]))
    halves = Aggregator()
    for cid, value in enumerate((1.0, 3.0)):
        halves.add(ClientUpdate(cid, {"w": torch.tensor([value])}, 0.25))
    assert halves.total == 0.5 and torch.equal(halves.mean({"w": torch.zeros(1)})["w"], torch.tensor([2.0]))


def test_nothing_to_average_keeps_the_reference_values():
    like = {"w": torch.tensor([5.0, 6.0])}
    empty = Aggregator()
    assert empty.count == 0 and empty.total == 0.0
    assert torch.equal(empty.mean(like)["w"], like["w"])
    silent = Aggregator()  # clients that send weight 0 (Local-only) must not divide by zero
    silent.add(ClientUpdate(0, {"w": torch.tensor([1.0, 1.0])}, 0.0))
    out = silent.mean(like)["w"]
    assert torch.equal(out, like["w"]) and out is not like["w"]


def test_clients_sending_different_keys():
    # a key only some clients send is averaged over the clients that sent it
    agg = Aggregator()
    agg.add(ClientUpdate(0, {"w": torch.tensor([1.0]), "extra": torch.tensor([4.0])}, 1.0))
    agg.add(ClientUpdate(1, {"w": torch.tensor([3.0])}, 1.0))
    agg.add(ClientUpdate(2, {"w": torch.tensor([5.0]), "late": torch.tensor([7.0])}, 2.0))
    mean = agg.mean({"w": torch.zeros(1), "extra": torch.zeros(1), "late": torch.zeros(1), "none": torch.ones(1)})
    assert torch.equal(mean["w"], torch.tensor([(1.0 + 3.0 + 10.0) / 4]))
    assert torch.equal(mean["extra"], torch.tensor([4.0 / 4])) and torch.equal(mean["late"], torch.tensor([14.0 / 4]))
    assert torch.equal(mean["none"], torch.ones(1))


def test_integer_entries_are_rounded_to_their_dtype():
    # BatchNorm's num_batches_tracked is int64: the mean of 2 and 3 (weights 2:3) is 2.6, stored as 3
    agg = Aggregator()
    agg.add(ClientUpdate(0, {"n": torch.tensor(2), "f": torch.tensor([1.0])}, 2.0))
    agg.add(ClientUpdate(1, {"n": torch.tensor(3), "f": torch.tensor([2.0])}, 3.0))
    mean = agg.mean({"n": torch.tensor(0), "f": torch.zeros(1, dtype=torch.float16)})
    assert mean["n"].dtype == torch.int64 and mean["n"].item() == 3
    assert mean["f"].dtype == torch.float16 and mean["f"].item() == pytest.approx(1.6, abs=1e-3)


def test_the_mean_keeps_each_reference_tensors_memory_layout():
    """A channels-last conv weight is averaged into a channels-last tensor: a method that runs the
    broadcast weights directly (FedALA's adaptive mix) would otherwise convolve with another kernel."""
    like = {"conv": torch.zeros(4, 3, 3, 3).to(memory_format=torch.channels_last), "b": torch.zeros(4)}
    agg = Aggregator()
    for i in range(3):
        torch.manual_seed(i)
        agg.add(ClientUpdate(i, {k: torch.randn_like(v) for k, v in like.items()}, 1.0 + i))
    mean = agg.mean(like)
    assert (
        mean["conv"].is_contiguous(memory_format=torch.channels_last) and mean["conv"].stride() == like["conv"].stride()
    )
    expected = sum((1.0 + i) * _randn_like(i, like)["conv"].double() for i in range(3)) / 6.0
    assert torch.equal(mean["conv"], expected.float())


def _randn_like(seed: int, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: torch.randn_like(v) for k, v in like.items()}


def test_joins_in_place_leave_the_callers_tensors_and_a_read_mean_untouched():
    """Joins reuse the stack's own vectors; nothing the caller still holds may change with them."""
    values = inexact_columns(7, 64, seed=7)
    updates = updates_from(values)
    kept = [u.payload["w"].clone() for u in updates]
    part = Aggregator(3)
    for u in updates[3:]:
        part.add(u)
    server = Aggregator()
    for u in updates[:3]:
        server.add(u)
    like = {"w": torch.zeros(64, dtype=torch.float64)}
    early = server.mean(like)["w"].clone()
    assert torch.equal(server.mean(like)["w"], early)  # reading the mean joins nothing on the stack
    server.merge(part)
    # merge takes the partial's subtrees over: it is left empty, at its end
    assert (part.count, part.start, part.end) == (0, 7, 7)
    assert torch.equal(server.mean(like)["w"], tree_mean(values))
    assert all(torch.equal(u.payload["w"], k) for u, k in zip(updates, kept, strict=True))


def test_a_payload_of_mixed_dtypes_is_summed_as_float64_per_tensor():
    """One float64 vector per subtree: an int64 counter beyond float32's 24 bits keeps its value."""
    big = 2**40 + 1
    agg = Aggregator()
    agg.add(ClientUpdate(0, {"w": torch.tensor([0.1], dtype=torch.float32), "n": torch.tensor(big)}, 1.0))
    mean = agg.mean({"w": torch.zeros(1), "n": torch.tensor(0)})
    assert int(mean["n"]) == big
    assert mean["w"].item() == torch.tensor([0.1], dtype=torch.float32).item()
