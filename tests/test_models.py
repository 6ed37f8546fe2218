"""Model registry: every architecture builds, runs on its input size and exposes features → head."""

from __future__ import annotations

import pytest
import torch

from sim.models import ModelSpec, build_model, model_names
from sim.typed import ConfigError


@pytest.mark.parametrize("name, size", [("small_cnn", 16), ("small_cnn", 32), ("resnet_bn", 32), ("resnet_gn", 32)])
def test_forward_shapes(name, size):
    model = build_model(name, ModelSpec(in_channels=3, num_classes=7, image_size=size, width=8))
    x = torch.randn(4, 3, size, size)
    assert model(x).shape == (4, 7)
    assert model.features(x).shape == (4, model.feature_dim)
    assert all(k.startswith(("features.", "head.")) for k in model.state_dict())


def test_norm_variants_differ():
    bn = build_model("resnet_bn", ModelSpec(3, 10, 32, 8))
    gn = build_model("resnet_gn", ModelSpec(3, 10, 32, 8))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in gn.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in gn.modules())


def test_unknown_model():
    with pytest.raises(ConfigError, match="small_cnn"):
        build_model("vgg", ModelSpec(3, 10, 32))
    assert set(model_names()) >= {"small_cnn", "resnet_bn", "resnet_gn"}
