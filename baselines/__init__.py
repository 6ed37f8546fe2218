"""Baseline methods; importing the package registers them all."""

from baselines import (  # noqa: F401
    apfl,
    ditto,
    fedala,
    fedavg,
    fedavg_ft,
    fedbabu,
    fedbn,
    fedper,
    fedprox,
    fedrep,
    fedrod,
    lg_fedavg,
    local,
    moon,
    per_fedavg,
    pfedme,
    scaffold,
)
