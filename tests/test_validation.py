"""Everything knowable before Ray starts is checked first: one line, exit 2, and no run folder."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from PIL import Image

from sim.data import DatasetError, load_dataset
from tests.cli import cli_main, sets
from tests.conftest import small_overrides


def _run_dirs(tmp_path):
    out = tmp_path / "results"
    return sorted(p.name for p in out.iterdir() if p.name != "cache") if out.exists() else []


@pytest.mark.parametrize(
    "items, words",
    [
        (["client_resources.num_gpus=0.5"], ["client_resources.num_gpus=0.5", "no GPUs"]),
        (["num_clients=4", "clients_per_round=4"], ["num_clients (4) must be >= num_domains (5)"]),
        (
            ["algorithms=warmfed", "algo.warmfed.backbone=stable-diffusion", "algo.warmfed.sd_model=/nonexistent/sd"],
            ["/nonexistent/sd", "algo.warmfed.sd_model"],
        ),
    ],
)
def test_config_errors_found_before_ray_leave_no_run_folder(items, words, capsys, tmp_path):
    import ray

    if "client_resources.num_gpus=0.5" in items and ray.is_initialized() and ray.cluster_resources().get("GPU"):
        pytest.skip("this machine has GPUs")
    started = time.monotonic()
    code, _, err = cli_main(["run", *sets(small_overrides(tmp_path, *items))], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err
    assert _run_dirs(tmp_path) == []
    if not ray.is_initialized():
        assert time.monotonic() - started < 15  # no Ray was started to find out


def test_a_resource_error_on_a_running_cluster_leaves_nothing_half_made(ray_local, capsys, tmp_path):
    code, _, err = cli_main(["run", *sets(small_overrides(tmp_path, "client_resources.num_cpus=64"))], capsys)
    assert code == 2 and "client_resources.num_cpus=64" in err
    assert _run_dirs(tmp_path) == []


def test_an_unwritable_out_is_one_line(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = cli_main(["run", *sets(small_overrides(tmp_path, f"out={blocker / 'results'}"))], capsys)
    assert (
        code == 2 and err.startswith(f"error: out={blocker / 'results'}: cannot write there") and err.count("\n") == 1
    )


def test_a_missing_resume_path_is_one_line(capsys, tmp_path):
    code, _, err = cli_main(["run", "--resume", str(tmp_path / "nope")], capsys)
    assert code == 2 and err == f"error: --resume {tmp_path / 'nope'}: no such directory\n"
    (tmp_path / "empty").mkdir()
    code, _, err = cli_main(["run", "--resume", str(tmp_path / "empty")], capsys)
    assert code == 2 and "no config.yaml there" in err


def test_a_run_id_in_use_is_refused(capsys, tmp_path):
    from sim.orchestration.runner import RunLock

    run_dir = tmp_path / "results" / "taken"
    run_dir.mkdir(parents=True)
    holder = RunLock(run_dir)  # another run holds it (flock: a second open file conflicts, even in this process)
    try:
        code, _, err = cli_main(["run", *sets(small_overrides(tmp_path, "run_id=taken"))], capsys)
        assert code == 2 and err.count("\n") == 1
        assert f"run directory {run_dir} is in use by a running run (pid " in err
        assert not (run_dir / "config.yaml").exists()
    finally:
        holder.release()
    again = RunLock(run_dir)  # released with its holder: the next run gets it
    again.release()


def _folder(root, empty_class="b", domains=None):
    for domain in domains or [None]:
        for c in ("a", "b", "c"):
            d = root / domain / c if domain else root / c
            d.mkdir(parents=True)
            if c == empty_class and domain in (None, "d1"):
                continue
            for i in range(3):
                Image.fromarray((np.random.default_rng(i).random((8, 8, 3)) * 255).astype("uint8")).save(d / f"{i}.png")


@pytest.mark.parametrize("domains", [None, ["d0", "d1"]])
def test_an_empty_class_folder_is_an_error_naming_it(tmp_path, domains, caplog):
    root = tmp_path / "imgs"
    _folder(root, domains=domains)
    empty = root / "d1" / "b" if domains else root / "b"
    with pytest.raises(DatasetError, match=f"empty class folder .*{empty}.*data.allow_empty_classes=true"):
        load_dataset("image-folder", {"path": str(root)}, cache=False)
    with caplog.at_level(logging.WARNING):
        dataset = load_dataset("image-folder", {"path": str(root), "allow_empty_classes": True}, cache=False)
    assert str(empty) in caplog.text
    assert list(dataset.class_names) == (["a", "b", "c"] if domains else ["a", "c"])
