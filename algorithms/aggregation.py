"""The weighted mean of client updates, summed over a fixed binary tree in client order.

Why a tree: client actors sum the updates of the clients they train before sending them up
(one message per task instead of one per client), and how a round's clients are cut into
tasks depends on the pool size. A plain running sum would then depend on the cut (float
addition is not associative). Summing over a fixed pairwise tree — leaf i is the i-th client
of the round in id order, a node is the sum of its two children — makes every cut give the
same bits: a task returns the sums of the whole subtrees it covers, the server joins sibling
subtrees as they arrive in order, and what it ends with is the same tree whoever summed which
part. Pairwise summation is also more accurate than a running sum.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from algorithms.base import ClientUpdate

Weights = dict[str, torch.Tensor]


@dataclass
class SubtreeSum:
    """The float64 weighted sums of the clients at positions [index·2^level, (index+1)·2^level)."""

    level: int
    index: int
    sums: Weights
    total: float
    count: int

    def joined(self, right: SubtreeSum) -> SubtreeSum:
        """This (left) subtree and its right sibling as their parent; new tensors, inputs untouched."""
        sums = {key: value + right.sums[key] if key in right.sums else value for key, value in self.sums.items()}
        sums.update({key: value for key, value in right.sums.items() if key not in self.sums})
        return SubtreeSum(self.level + 1, self.index // 2, sums, self.total + right.total, self.count + right.count)


class Aggregator:
    """Streaming weighted mean of client payloads: `add` takes updates, `merge` takes another
    aggregator's subtrees, both strictly in client order from position `start` on.

    The pending subtrees form a stack of decreasing sizes (the binary digits of the number of
    clients folded so far), so the server holds O(log n) sums, never one per client.
    """

    def __init__(self, start: int = 0) -> None:
        self.start = start
        self.end = start  # the position of the next client
        self._stack: list[SubtreeSum] = []

    @property
    def count(self) -> int:
        return sum(node.count for node in self._stack)

    @property
    def total(self) -> float:
        """The summed weights, joined like the sums (so the mean does not depend on the cut either)."""
        if not self._stack:
            return 0.0
        total = self._stack[-1].total
        for left in reversed(self._stack[:-1]):
            total = left.total + total
        return total

    def _push(self, node: SubtreeSum) -> None:
        self._stack.append(node)
        while len(self._stack) >= 2:
            left, right = self._stack[-2], self._stack[-1]
            if left.level != right.level or left.index % 2 or right.index != left.index + 1:
                break
            self._stack[-2:] = [left.joined(right)]

    def add(self, update: ClientUpdate) -> None:
        w = float(update.weight)
        sums = {key: value.detach().to(torch.float64) * w for key, value in update.payload.items()}
        self._push(SubtreeSum(0, self.end, sums, w, 1))
        self.end += 1

    def merge(self, other: Aggregator) -> None:
        """Fold in the subtrees of the clients right after ours (another task's partial sums)."""
        if other.start != self.end:
            raise ValueError(
                f"partial aggregates must arrive in client order: expected one starting at position "
                f"{self.end}, got one starting at {other.start}"
            )
        for node in other._stack:
            self._push(node)
        self.end = other.end

    def _root(self) -> SubtreeSum:
        """The whole tree: pending subtrees joined right to left (a node without a right child is its left child)."""
        node = self._stack[-1]
        for left in reversed(self._stack[:-1]):
            node = left.joined(node)
        return node

    def mean(self, like: Mapping[str, torch.Tensor]) -> Weights:
        """The weighted mean cast back to the dtypes of `like`; keys nobody sent keep `like`'s value."""
        root = self._root() if self._stack else None
        out: Weights = {}
        for key, ref in like.items():
            if root is not None and key in root.sums and root.total > 0:
                avg = root.sums[key] / root.total
                out[key] = avg.round().to(ref.dtype) if not ref.is_floating_point() else avg.to(ref.dtype)
            else:
                out[key] = ref.clone()
        return out
