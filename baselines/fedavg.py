"""FedAvg (McMahan et al., 2017): the base class's behaviour, registered under its name."""

from __future__ import annotations

from algorithms.base import Algorithm
from algorithms.registry import register


@register("fedavg")
class FedAvg(Algorithm):
    """Local SGD from the global weights, sample-weighted averaging; personalized model = global."""
