"""FedPer (Arivazhagan et al., 2019): a shared body and a personal classification head.

Clients train the whole model locally (plain local SGD) but only the body is averaged; the
head ("personalization layers", here the model's `head` Linear) never leaves the client.
"""

from __future__ import annotations

from algorithms.registry import register
from baselines.common import PartialSharing


@register("fedper")
class FedPer(PartialSharing):
    personal_patterns = ("head.*",)
