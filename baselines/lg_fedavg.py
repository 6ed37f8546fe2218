"""LG-FedAvg (Liang et al., 2020, "Think Locally, Act Globally"): local representations, global head.

The mirror image of FedPer: each client keeps its own representation layers (`features.*`,
everything below the classifier) and only the head is averaged, so the upload is tiny.
"""

from __future__ import annotations

from algorithms.registry import register
from baselines.common import PartialSharing


@register("lg-fedavg")
class LGFedAvg(PartialSharing):
    personal_patterns = ("features.*",)
