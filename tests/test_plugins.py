"""Extensions are found by package scan: one new file makes a baseline, dataset, scheme or model exist."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch

import baselines
import run_sim
import sim.data
import sim.models
import sim.partition
from sim import plugins
from sim.config import load_config
from sim.data import registry as data_registry
from sim.models import ModelSpec, build_model, model_names, register_model
from sim.partition import base as partition_base
from sim.typed import ConfigError
from tests.cli import sets
from tests.conftest import small_overrides

BASELINE = """
from algorithms.base import Algorithm
from algorithms.registry import register


@register("toy-mean")
class ToyMean(Algorithm):
    \"\"\"FedAvg under another name: enough to be listed and configured.\"\"\"
"""

DATASET = """
from dataclasses import dataclass

from sim.data.registry import register_dataset
from sim.errors import UserError


class NoBlobsError(UserError):
    pass


@dataclass(frozen=True)
class ToyBlobsParams:
    blobs: int = 3


@register_dataset("toy-blobs", ToyBlobsParams)
def toy_blobs(params):
    raise NoBlobsError(f"toy-blobs: no {params.blobs} blobs on this machine")
"""

SCHEME = """
from dataclasses import dataclass

import numpy as np

from sim.partition.base import register_scheme


@dataclass(frozen=True)
class ToyHalvesParams:
    first: float = 0.5


@register_scheme("toy-halves", ToyHalvesParams)
class ToyHalves:
    def assign(self, data, params, rng):
        # the first `first` of the samples to client 0, the rest to client 1
        return (np.arange(data.labels.size) >= round(params.first * data.labels.size)).astype(np.int64)
"""

MODEL = """
from torch import nn

from sim.models import Classifier, register_model


@register_model("toy-linear")
def toy_linear(spec):
    features = nn.Sequential(nn.Flatten(), nn.Linear(spec.in_channels * spec.image_size**2, spec.width))
    return Classifier(features, spec.width, spec.num_classes)
"""


@pytest.fixture
def registries(monkeypatch):
    """Registries as they are now (built-ins scanned), restored after the test."""
    plugins.algorithm_names(), sim.data.dataset_names(), sim.partition.scheme_names(), sim.models.model_names()
    monkeypatch.setattr(plugins, "_ALGORITHMS", dict(plugins._ALGORITHMS))
    monkeypatch.setattr(sim.models, "_MODELS", dict(sim.models._MODELS))
    monkeypatch.setattr(data_registry, "_REGISTRY", dict(data_registry._REGISTRY))
    monkeypatch.setattr(partition_base, "_SCHEMES", dict(partition_base._SCHEMES))
    before = set(sys.modules)
    yield monkeypatch
    for name in set(sys.modules) - before:
        if name.startswith(("baselines.", "sim.data.", "sim.partition.", "sim.models.", "toy_plugins")):
            del sys.modules[name]


def _listed(capsys) -> dict[str, list[str]]:
    assert run_sim.main(["list"]) == 0
    sections: dict[str, list[str]] = {}
    current = ""
    for line in capsys.readouterr().out.splitlines():
        if not line.startswith(" "):
            current = line.rstrip(":")
        elif line.strip():
            sections.setdefault(current, []).append(line.split()[0])
    return sections


def test_a_new_file_in_each_scanned_package_is_listed_and_configurable(registries, tmp_path, capsys):
    for package, name, text in (
        (baselines, "toy_mean", BASELINE),
        (sim.data, "toy_blobs", DATASET),
        (sim.partition, "toy_halves", SCHEME),
        (sim.models, "toy_linear", MODEL),
    ):
        folder = tmp_path / package.__name__
        folder.mkdir()
        (folder / f"{name}.py").write_text(textwrap.dedent(text))
        registries.setattr(package, "__path__", [*package.__path__, str(folder)])  # as if the file were in the package
    listed = _listed(capsys)
    assert "toy-mean" in listed["algorithms"] and "fedavg" in listed["algorithms"]
    assert "toy-blobs" in listed["datasets"] and "digits-domains" in listed["datasets"]
    assert "toy-halves" in listed["partition schemes"] and "dirichlet" in listed["partition schemes"]
    assert "toy-linear" in listed["models"] and "small_cnn" in listed["models"]
    items = ["algorithms=toy-mean", "dataset=toy-blobs", "data.blobs=5", "partition.scheme=toy-halves"]
    cfg = load_config(None, items)
    assert cfg.algorithms == ["toy-mean"] and cfg.data == {"blobs": 5}
    # the plug-in's own error class derives from UserError: the CLI prints it as one line, no list to extend
    argv = ["run", *sets([*small_overrides(tmp_path), *items])]
    assert run_sim.main(argv) == 2
    err = capsys.readouterr().err
    assert err == "error: toy-blobs: no 5 blobs on this machine\n"

    # the scheme's own parameter, declared only in its file, is a config key and reaches the scheme
    from sim.data import load_dataset
    from sim.orchestration.partition_build import partition_for

    cfg = load_config(
        None,
        [
            *small_overrides(tmp_path),
            "num_clients=2",
            "clients_per_round=all",
            "partition.scheme=toy-halves",
            "partition.first=0.25",
        ],
    )
    dataset = load_dataset(cfg.dataset, cfg.data)
    partition, _ = partition_for(cfg, dataset, 0)
    sizes = [sum(len(partition.client_indices(c, s)) for s in ("train", "val", "test")) for c in (0, 1)]
    assert sizes[0] == round(0.25 * len(dataset.labels)) and sum(sizes) == len(dataset.labels)
    with pytest.raises(
        ConfigError, match="partition.frist: no partition scheme has this parameter; scheme 'toy-halves' takes: first"
    ):
        load_config(None, ["partition.scheme=toy-halves", "partition.frist=0.1"])


def test_without_the_file_the_names_are_unknown(registries, capsys):
    listed = _listed(capsys)
    assert "toy-mean" not in listed["algorithms"] and "toy-blobs" not in listed["datasets"]
    assert "toy-linear" not in listed["models"] and "toy-linear" not in model_names()


def _plugin_package(registries, tmp_path, module: str, source: str) -> None:
    """A package `toy_plugins` holding one plug-in module, named in WARMFED_SIM_PLUGINS."""
    package = tmp_path / "toy_plugins"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / f"{module}.py").write_text(textwrap.dedent(source))
    registries.syspath_prepend(str(tmp_path))
    registries.setenv(plugins.PLUGINS_ENV, "toy_plugins")


def test_another_package_plugs_in_through_the_environment(registries, tmp_path, capsys):
    _plugin_package(registries, tmp_path, "mean", BASELINE)
    assert "toy-mean" in _listed(capsys)["algorithms"]


def test_a_model_plugs_in_through_the_environment(registries, tmp_path, capsys):
    _plugin_package(registries, tmp_path, "linear", MODEL)
    listed = _listed(capsys)["models"]
    assert "toy-linear" in listed and "small_cnn" in listed
    assert model_names() == ["resnet_bn", "resnet_gn", "small_cnn", "toy-linear"]
    assert load_config(None, ["model.name=toy-linear"]).model.name == "toy-linear"
    model = build_model("toy-linear", ModelSpec(in_channels=1, num_classes=3, image_size=4, width=5))
    assert model(torch.zeros(2, 1, 4, 4)).shape == (2, 3) and model.feature_dim == 5
    assert model.features[1].in_features == 16
    # an unknown name lists every registered one, the plug-in's included
    with pytest.raises(ConfigError) as exc:
        build_model("vgg", ModelSpec(3, 10, 32))
    assert str(exc.value) == (
        "model.name: unknown model 'vgg'; registered: resnet_bn, resnet_gn, small_cnn, toy-linear"
    )


def test_a_second_model_under_a_taken_name_is_an_error_naming_both(registries, tmp_path):
    _plugin_package(registries, tmp_path, "linear", MODEL)
    package = tmp_path / "toy_plugins"
    assert "toy-linear" in model_names()
    # the same builder registered again by a reload of its module is harmless
    module = importlib.reload(sys.modules["toy_plugins.linear"])
    assert sim.models._MODELS["toy-linear"] is module.toy_linear

    # another plug-in file claiming the name: the scan that finds it fails, naming both builders
    other = textwrap.dedent(MODEL).replace("def toy_linear", "def other_linear")
    (package / "other.py").write_text(other)
    importlib.invalidate_caches()  # the folder was read by the first scan: let the import system see the new file
    with pytest.raises(ValueError) as exc:
        model_names()
    assert str(exc.value) == (
        "model name 'toy-linear' is registered twice (toy_plugins.linear.toy_linear, toy_plugins.other.other_linear)"
    )

    def small_cnn(spec):
        raise AssertionError("never built")

    with pytest.raises(
        ValueError, match=r"'small_cnn' is registered twice \(sim\.models\.small_cnn\.small_cnn, tests\."
    ):
        register_model("small_cnn")(small_cnn)
    assert sim.models._MODELS["small_cnn"].__module__ == "sim.models.small_cnn"


def test_every_user_facing_error_shares_the_base_class():
    from actors.pool import ClientTaskError
    from algorithms.warmfed.diffusion import BackboneError
    from algorithms.warmfed.lora import LoraMismatchError
    from sim.data import DatasetError
    from sim.errors import UserError
    from sim.orchestration.checkpoints import CheckpointError
    from sim.orchestration.cluster import ResourceError
    from sim.partition import PartitionError
    from sim.typed import ConfigError

    for cls in (ConfigError, DatasetError, PartitionError, ResourceError, ClientTaskError, CheckpointError):
        assert issubclass(cls, UserError), cls
    for cls in (BackboneError, LoraMismatchError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError), cls
