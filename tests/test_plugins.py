"""Extensions are found by package scan: one new file makes a baseline, dataset or scheme exist."""

from __future__ import annotations

import sys
import textwrap

import pytest

import baselines
import run_sim
import sim.data
import sim.partition
from sim import plugins
from sim.config import load_config
from sim.data import registry as data_registry
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


@pytest.fixture
def registries(monkeypatch):
    """Registries as they are now (built-ins scanned), restored after the test."""
    plugins.algorithm_names(), sim.data.dataset_names(), sim.partition.scheme_names()
    monkeypatch.setattr(plugins, "_ALGORITHMS", dict(plugins._ALGORITHMS))
    monkeypatch.setattr(data_registry, "_REGISTRY", dict(data_registry._REGISTRY))
    monkeypatch.setattr(partition_base, "_SCHEMES", dict(partition_base._SCHEMES))
    before = set(sys.modules)
    yield monkeypatch
    for name in set(sys.modules) - before:
        if name.startswith(("baselines.", "sim.data.", "sim.partition.", "toy_plugins")):
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
    ):
        folder = tmp_path / package.__name__
        folder.mkdir()
        (folder / f"{name}.py").write_text(textwrap.dedent(text))
        registries.setattr(package, "__path__", [*package.__path__, str(folder)])  # as if the file were in the package
    listed = _listed(capsys)
    assert "toy-mean" in listed["algorithms"] and "fedavg" in listed["algorithms"]
    assert "toy-blobs" in listed["datasets"] and "digits-domains" in listed["datasets"]
    assert "toy-halves" in listed["partition schemes"] and "dirichlet" in listed["partition schemes"]
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


def test_another_package_plugs_in_through_the_environment(registries, tmp_path, capsys):
    package = tmp_path / "toy_plugins"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mean.py").write_text(textwrap.dedent(BASELINE))
    registries.syspath_prepend(str(tmp_path))
    registries.setenv(plugins.PLUGINS_ENV, "toy_plugins")
    assert "toy-mean" in _listed(capsys)["algorithms"]


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
