"""Baseline methods; importing the package registers them all."""

from baselines import fedavg, fedprox, local  # noqa: F401
