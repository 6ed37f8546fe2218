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


MODELS = [("small_cnn", 16), ("resnet_bn", 32), ("resnet_gn", 32)]


@pytest.mark.parametrize("name, size", MODELS)
def test_same_seed_same_output_other_seed_other_output(name, size):
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        model = build_model(name, ModelSpec(3, 5, size, 8)).eval()
        with torch.no_grad():
            outs.append(model(x))
    assert torch.equal(outs[0], outs[1])  # the run seed alone fixes the initial model
    assert not torch.allclose(outs[0], outs[2])
    assert torch.isfinite(outs[0]).all() and outs[0].std() > 0


@pytest.mark.parametrize("name, size", MODELS)
def test_every_parameter_gets_a_gradient(name, size):
    torch.manual_seed(0)
    model = build_model(name, ModelSpec(3, 5, size, 8)).train()
    x = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(1))
    torch.nn.functional.cross_entropy(model(x), torch.arange(6) % 5).backward()
    for key, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, key


@pytest.mark.parametrize("name, size", MODELS)
def test_width_and_num_classes_are_honoured(name, size):
    for width, classes in ((4, 3), (8, 10)):
        model = build_model(name, ModelSpec(3, classes, size, width))
        convs = [m for m in model.features.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs[0].out_channels == width and convs[0].in_channels == 3
        assert model.head.out_features == classes and model.head.in_features == model.feature_dim == 4 * width
    narrow = sum(p.numel() for p in build_model(name, ModelSpec(3, 10, size, 4)).parameters())
    wide = sum(p.numel() for p in build_model(name, ModelSpec(3, 10, size, 8)).parameters())
    assert wide > 2 * narrow


def test_one_channel_input_and_a_known_output():
    model = build_model("small_cnn", ModelSpec(in_channels=1, num_classes=2, image_size=8, width=2)).eval()
    # body weights zero: the features are relu(bias of the hidden layer), whatever the input
    with torch.no_grad():
        for p in model.features.parameters():
            p.zero_()
        hidden = model.features[9]
        hidden.bias.copy_(torch.tensor([1.0, -1.0, 2.0, 0.5, 0.0, 3.0, -2.0, 1.5]))
        model.head.weight.copy_(torch.arange(16, dtype=torch.float32).reshape(2, 8))
        model.head.bias.copy_(torch.tensor([0.5, -0.5]))
        out = model(torch.randn(2, 1, 8, 8))
    relu = torch.tensor([1.0, 0.0, 2.0, 0.5, 0.0, 3.0, 0.0, 1.5])
    by_hand = torch.tensor(
        [float((torch.arange(8.0) * relu).sum()) + 0.5, float((torch.arange(8.0, 16.0) * relu).sum()) - 0.5]
    )
    assert torch.equal(out, by_hand.expand(2, 2))


@pytest.mark.parametrize("name, size", MODELS)
def test_eval_logits_do_not_depend_on_batch_mates(name, size):
    torch.manual_seed(0)
    model = build_model(name, ModelSpec(3, 4, size, 4)).eval()
    x = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_small_cnn_is_the_same_network_as_before_the_registry():
    """The layers, their order and the order parameters are drawn in are those of the nn.Sequential
    below (written out by hand): a seeded run starts from the same tensors as before models became plug-ins."""
    spec = ModelSpec(in_channels=3, num_classes=10, image_size=16, width=8)
    torch.manual_seed(0)
    model = build_model("small_cnn", spec)
    torch.manual_seed(0)
    w, spatial = 8, 16 // 4
    features = torch.nn.Sequential(
        torch.nn.Conv2d(3, w, 3, padding=1),
        torch.nn.BatchNorm2d(w),
        torch.nn.MaxPool2d(2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(w, 2 * w, 3, padding=1),
        torch.nn.BatchNorm2d(2 * w),
        torch.nn.MaxPool2d(2),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(2 * w * spatial * spatial, 4 * w),
        torch.nn.ReLU(),
    )
    head = torch.nn.Linear(4 * w, 10)  # Classifier makes its head after the body
    expected = {
        **{f"features.{k}": v for k, v in features.state_dict().items()},
        **{f"head.{k}": v for k, v in head.state_dict().items()},
    }
    got = model.state_dict()
    assert list(got) == list(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
    assert [type(m) for m in model.features] == [type(m) for m in features]
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)  # build_model's conversion
