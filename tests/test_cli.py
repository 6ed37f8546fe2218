"""The command line as a user meets it: clear one-line errors, list, partition, resume."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.cli import cli_main, sets
from tests.conftest import small_overrides


@pytest.mark.parametrize(
    "items, words",
    [
        (["algorithms=fedavg,nope"], ["unknown algorithm 'nope'", "fedavg"]),
        (["rounds=-2"], ["rounds must be >= 0"]),
        (["dataset=image-folder", "data.path=/nonexistent/pacs"], ["/nonexistent/pacs", "does not exist"]),
        (["dataset=cifar10"], ["data.path"]),
    ],
)
def test_bad_input_is_one_clear_line(items, words, capsys, tmp_path):
    code, out, err = cli_main(["run", *sets(small_overrides(tmp_path, *items))], capsys)
    assert code == 2
    assert err.startswith("error: ") and "Traceback" not in err
    for word in words:
        assert word in err
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


def test_bad_yaml(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: 3\n  algorithms: [fedavg\n")
    code, _, err = cli_main(["run", "--config", str(bad)], capsys)
    assert code == 2 and "not valid YAML" in err and str(bad) in err


def test_gpu_request_on_a_machine_without_gpus_fails_fast(capsys, tmp_path):
    import ray

    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("this machine has GPUs")
    code, _, err = cli_main(["run", *sets(small_overrides(tmp_path, "client_resources.num_gpus=0.5"))], capsys)
    assert code == 2 and "no GPUs" in err and "client_resources.num_gpus" in err


def test_list_shows_every_registry(capsys):
    code, out, _ = cli_main(["list"], capsys)
    assert code == 0
    for word in (
        "fedavg",
        "fedprox",
        "local",
        "mu=0.01",
        "digits-domains",
        "image-folder",
        "cifar10",
        "parquet",
        "dirichlet",
        "shards",
        "domain-dirichlet",
        "small_cnn",
        "resnet_gn",
    ):
        assert word in out


def test_partition_command_builds_then_finds_and_rebuilds_a_corrupt_file(capsys, tmp_path):
    argv = ["partition", *sets([f"cache_dir={tmp_path}", "partition.scheme=dirichlet", "partition.alpha=0.1"])]
    code, out, _ = cli_main(argv, capsys)
    assert code == 0 and "heatmap.png" in out
    path = Path(next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("partition:")))
    assert (path / "heatmap.png").exists() and (path / "manifest.json").exists()
    original = pd.read_parquet(path / "partition.parquet")
    data = (path / "partition.parquet").read_bytes()
    (path / "partition.parquet").write_bytes(data[: len(data) // 2])  # a torn write
    code, out2, _ = cli_main(argv, capsys)
    assert code == 0
    assert any(p.name.startswith(path.name + ".corrupt") for p in path.parent.iterdir())
    pd.testing.assert_frame_equal(pd.read_parquet(path / "partition.parquet"), original)


def test_list_shows_every_new_algorithm_with_its_hyper_parameters(capsys, monkeypatch):
    """A method registered by a user's own module shows up in `list`, with its defaults as written
    in its Params (the expected text is spelled out here, not produced by the code under test)."""
    import dataclasses

    from algorithms import registry
    from algorithms.base import Algorithm
    from sim import plugins

    registry.algorithm_names()  # the built-ins first, so the copy below holds them
    monkeypatch.setattr(plugins, "_ALGORITHMS", dict(plugins._ALGORITHMS))  # the dummy leaves with the test

    @dataclasses.dataclass(frozen=True)
    class DummyParams:
        zeta: float = 0.125
        inner_steps: int | None = None
        mode: str = "fast"

    @registry.register("h4-dummy-method")
    class Dummy(Algorithm):
        Params = DummyParams

    code, out, _ = cli_main(["list"], capsys)
    assert code == 0
    lines = {line.split()[0]: line for line in out.split("datasets:")[0].splitlines() if line.startswith("  ")}
    assert lines["h4-dummy-method"].split(None, 1)[1] == "zeta=0.125, inner_steps=None, mode='fast'"
    for name in (
        "scaffold",
        "moon",
        "fedper",
        "fedrep",
        "fedbn",
        "ditto",
        "apfl",
        "lg-fedavg",
        "fedrod",
        "fedbabu",
        "fedala",
        "per-fedavg",
        "pfedme",
        "fedavg",
        "fedprox",
        "local",
    ):
        assert name in lines, name
    assert "lam=0.1" in lines["ditto"] and "head_epochs=1," in lines["fedrep"] and "mu=0.01" in lines["fedprox"]
