"""Metrics, each declared once: its name, how client values combine, and which way is better.

An algorithm's client verb returns any metrics it likes in `ClientUpdate.metrics`; every one of
them reaches the results table (per client, split "train"). Declaring it here (or in the
algorithm's own module, with `declare_metric`) tells the progress line, the report, sweeps and
tuning how to summarise it: how client values combine, which way is better, what tables call it.
A declared per-client metric gets a column of the "other client metrics" tables of the report,
the sweep summary and the tuning report without any change to those modules; an undeclared one
is kept in the results table but has no column in those tables.

The few names below are structural: the accuracies the summary tables give columns of their own
and the one a round (and a tuning grid point) is chosen on, on validation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

#: Per client and split: the evaluated samples, the weight of a `weighted` metric (a row, not a metric).
SAMPLES = "n"
GLOBAL_ACC = "global_acc"
PERSONAL_ACC = "personal_acc"
NEW_CLIENT_ACC = "new_client_acc"
#: The accuracies the summary tables show in columns of their own (pooled, client mean, worst decile, ...);
#: every other declared metric a run's clients report goes to the "other client metrics" tables.
HEADLINE = (GLOBAL_ACC, PERSONAL_ACC, NEW_CLIENT_ACC)
#: What a round is chosen on, on validation: the first of these a method reports (its personalized model's
#: accuracy, else the global model's). Also the paired-comparison columns, in this order.
SELECTION = (PERSONAL_ACC, GLOBAL_ACC)

Aggregate = Literal["mean", "weighted"]  # weighted: by the client's sample count `n` of the same split


@dataclass(frozen=True)
class Metric:
    name: str
    aggregate: Aggregate = "mean"
    higher_is_better: bool | None = None  # None: neither (a count, a learned coefficient)
    progress: str = ""  # the label the per-round progress line shows it under ("" = not shown)
    description: str = ""
    label: str = ""  # what tables call it ("" = its progress label, else its name)

    @property
    def title(self) -> str:
        """The short name tables use: "personal" for `personal_acc` (so "personal acc", "Δ personal ...")."""
        return self.label or self.progress or self.name

    @property
    def best(self) -> Literal["max", "min"]:
        """The end of a range of values that is the best one, for `Series.agg` / `idx{best}`; a metric
        without a direction has none (choosing on it is a bug)."""
        if self.higher_is_better is None:
            raise ValueError(f"metric {self.name!r} has no direction (higher_is_better=None): nothing to choose on")
        return "max" if self.higher_is_better else "min"

    @property
    def direction(self) -> str:
        return {True: "higher is better", False: "lower is better", None: "no direction"}[self.higher_is_better]

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
    GLOBAL_ACC,
    aggregate="weighted",
    higher_is_better=True,
    progress="global",
    description="the global model's accuracy on the client's split",
)
declare_metric(
    PERSONAL_ACC,
    higher_is_better=True,
    progress="personal",
    description="the client's personalized model's accuracy on its own split",
)
declare_metric(
    NEW_CLIENT_ACC,
    aggregate="weighted",  # pooled over the held-out clients' samples, as the report has always combined it
    higher_is_better=True,
    label="new-client",
    description="a held-out client's accuracy after adapting",
)
declare_metric(
    "global_loss",
    aggregate="weighted",
    higher_is_better=False,
    description="the global model's mean loss on the client's split",
)
declare_metric(
    "personal_loss",
    higher_is_better=False,
    description="the client's personalized model's mean loss on its own split",
)
declare_metric("train_loss", higher_is_better=False, description="mean batch loss of the client's local training")
declare_metric("train_steps", description="optimizer steps of the client's local training")
