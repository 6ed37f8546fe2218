"""Baseline methods; importing the package registers them all."""

from baselines import fedavg, fedavg_ft, fedprox, local  # noqa: F401
