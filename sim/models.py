"""Classifier architectures, chosen by `model.name`.

Every model is `features` (body → flat representation) followed by `head` (one Linear), so
personalized methods can name their personal parts by prefix (`head.` for FedPer/FedRep,
`features.` for LG-FedAvg) and representation methods (MOON, FedRoD) can reach the embedding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

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


def _small_cnn(spec: ModelSpec) -> Classifier:
    """Two conv blocks and a hidden layer: trains in seconds per client on a CPU core."""
    w = spec.width
    spatial = spec.image_size // 4
    features = nn.Sequential(
        # pool before ReLU: the same function (max commutes with a monotone map), a quarter of the ReLU work
        nn.Conv2d(spec.in_channels, w, 3, padding=1),
        nn.BatchNorm2d(w),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, padding=1),
        nn.BatchNorm2d(2 * w),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * w * spatial * spatial, 4 * w),
        nn.ReLU(),
    )
    return Classifier(features, 4 * w, spec.num_classes)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def _resnet(spec: ModelSpec, norm: Callable[[int], nn.Module]) -> Classifier:
    """A compact ResNet (8 layers, 3 stages) for 32×32+ images."""
    w = spec.width
    layers: list[nn.Module] = [nn.Conv2d(spec.in_channels, w, 3, 1, 1, bias=False), norm(w), nn.ReLU()]
    cin = w
    for cout, stride in ((w, 1), (2 * w, 2), (4 * w, 2)):
        layers.append(_BasicBlock(cin, cout, stride, norm))
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(nn.Sequential(*layers), cin, spec.num_classes)


def _group_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(min(8, channels), channels)


_MODELS: dict[str, Callable[[ModelSpec], Classifier]] = {
    "small_cnn": _small_cnn,
    "resnet_bn": lambda spec: _resnet(spec, nn.BatchNorm2d),
    "resnet_gn": lambda spec: _resnet(spec, _group_norm),
}


def model_names() -> list[str]:
    return sorted(_MODELS)


def build_model(name: str, spec: ModelSpec) -> Classifier:
    try:
        builder = _MODELS[name]
    except KeyError:
        raise ConfigError(f"model.name: unknown model {name!r}; registered: {', '.join(model_names())}") from None
    # channels-last: CPU BatchNorm, pooling and conv kernels run about twice as fast on it (and GPUs' too)
    model = builder(spec)
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # in place; torch's stubs omit it
    return model
