"""Metrics, each declared once: its name, how client values combine, and which way is better.

An algorithm's client verb returns any metrics it likes in `ClientUpdate.metrics`; every one of
them reaches the results table (per client, split "train"). Declaring it here (or in the
algorithm's own module, with `declare_metric`) tells the progress line, the report and sweeps
how to summarise it; an undeclared metric is kept and averaged over clients.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Aggregate = Literal["mean", "weighted"]  # weighted: by the client's sample count `n` of the same split


@dataclass(frozen=True)
class Metric:
    name: str
    aggregate: Aggregate = "mean"
    higher_is_better: bool | None = None  # None: neither (a count, a learned coefficient)
    progress: str = ""  # the label the per-round progress line shows it under ("" = not shown)
    description: str = ""

    def combine(self, values: Iterable[tuple[float, float]]) -> float:
        """One number from (value, n) pairs of clients; NaNs (a client without the split) are skipped."""
        pairs = [(v, n) for v, n in values if not math.isnan(v)]
        if self.aggregate == "weighted":
            total = sum(n for _, n in pairs)
            return sum(v * n for v, n in pairs) / total if total else math.nan
        return sum(v for v, _ in pairs) / len(pairs) if pairs else math.nan


_METRICS: dict[str, Metric] = {}


def declare_metric(name: str, **fields: object) -> Metric:
    """Declare (or re-declare identically) a metric; two different declarations of a name are a bug."""
    metric = Metric(name, **fields)  # type: ignore[arg-type]
    old = _METRICS.setdefault(name, metric)
    if old != metric:
        raise ValueError(f"metric {name!r} declared twice, differently: {old} and {metric}")
    return metric


def metric(name: str) -> Metric:
    """The declaration of `name`, or the default (a mean over clients, no direction) if undeclared."""
    return _METRICS.get(name) or Metric(name)


def declared() -> list[Metric]:
    return list(_METRICS.values())


declare_metric(
    "global_acc",
    aggregate="weighted",
    higher_is_better=True,
    progress="global",
    description="the global model's accuracy on the client's split",
)
declare_metric(
    "personal_acc",
    higher_is_better=True,
    progress="personal",
    description="the client's personalized model's accuracy on its own split",
)
declare_metric("new_client_acc", higher_is_better=True, description="a held-out client's accuracy after adapting")
declare_metric("global_loss", aggregate="weighted", higher_is_better=False)
declare_metric("personal_loss", higher_is_better=False)
declare_metric("train_loss", higher_is_better=False, description="mean batch loss of the client's local training")
declare_metric("train_steps", description="optimizer steps of the client's local training")
