"""Classifier architectures, chosen by `model.name`, found by package scan like datasets and schemes.

A model family is one file in `sim/models/` (or in a WARMFED_SIM_PLUGINS package) whose builders
register themselves with `@register_model("name")`; `build_model` and `model_names` scan for them.

Every model is `features` (body → flat representation) followed by `head` (one Linear), so
personalized methods can name their personal parts by prefix (`head.` for FedPer/FedRep,
`features.` for LG-FedAvg) and representation methods (MOON, FedRoD) can reach the embedding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sim.plugins import scan
from sim.typed import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    in_channels: int
    num_classes: int
    image_size: int
    width: int = 32


class Classifier(nn.Module):
    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


Builder = Callable[[ModelSpec], Classifier]

_MODELS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register `fn(spec) -> Classifier` as model `name` (the value of `model.name`)."""

    def decorate(fn: Builder) -> Builder:
        old = _MODELS.get(name)
        # Re-registering the same function (a module reload) is harmless; a second builder claiming the name is a bug.
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(
                f"model name {name!r} is registered twice "
                f"({old.__module__}.{old.__qualname__}, {fn.__module__}.{fn.__qualname__})"
            )
        _MODELS[name] = fn
        return fn

    return decorate


def model_names() -> list[str]:
    scan("sim.models")
    return sorted(_MODELS)


def build_model(name: str, spec: ModelSpec) -> Classifier:
    scan("sim.models")
    try:
        builder = _MODELS[name]
    except KeyError:
        raise ConfigError(f"model.name: unknown model {name!r}; registered: {', '.join(model_names())}") from None
    # channels-last: CPU BatchNorm, pooling and conv kernels run about twice as fast on it (and GPUs' too)
    model = builder(spec)
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # in place; torch's stubs omit it
    return model
