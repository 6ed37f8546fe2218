"""resnet_bn, resnet_gn: a compact ResNet with BatchNorm or GroupNorm."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sim.models import Classifier, ModelSpec, register_model


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


@register_model("resnet_bn")
def resnet_bn(spec: ModelSpec) -> Classifier:
    return _resnet(spec, nn.BatchNorm2d)


@register_model("resnet_gn")
def resnet_gn(spec: ModelSpec) -> Classifier:
    return _resnet(spec, _group_norm)
