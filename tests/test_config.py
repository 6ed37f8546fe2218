"""Config parsing: YAML + --set overrides, strict types, registry-checked names."""

from __future__ import annotations

from pathlib import Path

import pytest

from sim.config import ConfigError, RunConfig, dump_config, load_config
from sim.typed import from_mapping

SHIPPED_CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_are_the_embedded_benchmark():
    cfg = load_config()
    assert cfg.dataset == "digits-domains"
    assert cfg.algorithms == ["warmfed", "fedavg", "fedprox", "local", "fedbabu"]
    assert cfg.num_clients == 10 and cfg.partition.scheme == "domain-dirichlet"


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rounds: 3\npartition:\n  alpha: 0.3\nalgo:\n  fedprox:\n    mu: 0.5\n")
    cfg = load_config(
        path,
        [
            "algorithms=fedavg,fedprox",
            "num_clients=20",
            "clients_per_round=5",
            "seed=0,1,2",
            "partition.scheme=dirichlet",
            "partition.alpha=0.1",
            "client_resources.num_cpus=0.5",
            "client_resources.num_gpus=auto",
            "ray.address=auto",
            "out=/tmp/x",
            "dataset=digits-domains",
        ],
    )
    assert cfg.rounds == 3 and cfg.algorithms == ["fedavg", "fedprox"]
    assert cfg.num_clients == 20 and cfg.clients_per_round == 5 and cfg.seeds == [0, 1, 2]
    assert cfg.partition.scheme == "dirichlet" and cfg.partition.params == {"alpha": 0.1}
    assert cfg.client_resources.num_cpus == 0.5 and cfg.client_resources.num_gpus == "auto"
    assert cfg.ray.address == "auto" and cfg.out == "/tmp/x"
    assert cfg.algo["fedprox"]["mu"] == 0.5


def test_single_algorithm_override_is_a_list():
    assert load_config(None, ["algorithms=fedavg"]).algorithms == ["fedavg"]


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["rounds=2", "seed=1,2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["algorithms=fedavgg"], ["fedavgg", "fedavg", "fedprox"]),
        (["rounds=-1"], ["rounds", ">= 0"]),
        (["rounds=many"], ["rounds", "integer"]),
        (["num_clients=2.5"], ["num_clients", "integer"]),
        (["nonsense=1"], ["nonsense", "allowed keys"]),
        (["partition.alpah=1"], ["partition.alpah", "alpha"]),
        (["partition.scheme=shards", "partition.alpah=0.1"], ["partition.alpah", "shards", "classes_per_client"]),
        (["partition.scheme=iid", "partition.beta=0.1"], ["partition.beta", "iid", "none", "val_fraction"]),
        (["partition.alpha=high"], ["partition.alpha", "high"]),
        (["partition.alpha=-1"], ["alpha", "-1"]),
        (["partition.scheme=spiral"], ["partition.scheme", "dirichlet"]),
        (["dataset=mnist"], ["dataset", "digits-domains"]),
        (["data.colour=red"], ["colour"]),
        (["algo.fedprox.nu=1"], ["nu", "mu"]),
        (["algo.fedprox.mu=-1"], ["mu"]),
        (["model.name=vgg"], ["model.name", "small_cnn"]),
        (["clients_per_round=50"], ["clients_per_round", "num_clients"]),
        (["client_resources.num_gpus=lots"], ["num_gpus", "auto"]),
        (["rounds"], ["key=value"]),
    ],
)
def test_bad_values_name_the_key(overrides, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    for word in words:
        assert word in str(info.value)


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rounds: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_from_mapping_rejects_bool_as_int():
    with pytest.raises(ConfigError, match="rounds"):
        from_mapping(RunConfig, {"rounds": True})


def test_variants_are_named_rows_with_their_own_params():
    from sim.config import algorithm_spec, run_algorithms

    cfg = load_config(
        None,
        [
            "algorithms=fedavg,prox-strong",
            "variants.prox-strong.algorithm=fedprox",
            "variants.prox-strong.mu=0.5",
            "algo.fedprox.mu=0.2",
        ],
    )
    assert run_algorithms(cfg) == ["fedavg", "prox-strong"]
    cls, params = algorithm_spec(cfg, "prox-strong")
    assert cls.__name__ == "FedProx" and params.mu == 0.5
    with pytest.raises(ConfigError, match="variants.bad"):
        load_config(None, ["algorithms=bad", "variants.bad.algorithm=fedprox", "variants.bad.nu=1"])
    with pytest.raises(ConfigError, match="missing key 'algorithm'"):
        load_config(None, ["algorithms=v", "variants.v.mu=1"])
    with pytest.raises(ConfigError, match="variants: prox-strong"):
        load_config(None, ["algorithms=nope", "variants.prox-strong.algorithm=fedprox"])


def test_clients_per_round_defaults_to_every_training_client():
    assert load_config(None, ["num_clients=4"]).clients_per_round == 4
    assert load_config(None, ["num_clients=8", "holdout_clients=2", "clients_per_round=all"]).clients_per_round == 6
    assert load_config(None, ["num_clients=8", "clients_per_round=3"]).clients_per_round == 3


def test_new_client_budget_follows_the_finetune_budget_unless_set():
    assert load_config(None, ["train.finetune_epochs=3"]).eval.new_client_epochs == 3
    assert load_config(None, ["train.finetune_epochs=3", "eval.new_client_epochs=1"]).eval.new_client_epochs == 1


def test_a_scheme_owns_its_parameters_and_the_config_keeps_them_flat(tmp_path):
    """`partition: {scheme, <its keys>}`: the scheme's keys are validated against its params class, filled
    with its defaults (the run directory records the numbers used) and written back flat."""
    cfg = load_config(None, ["partition.scheme=shards"])
    assert cfg.partition.params == {"classes_per_client": 2}  # the scheme's default, recorded
    # another scheme's key does not stop a shards run (a sweep over schemes shares one config) and is not recorded
    assert load_config(None, ["partition.scheme=shards", "partition.alpha=0.1"]) == cfg
    one = load_config(None, ["partition.scheme=dirichlet", "partition.alpha=1"])
    assert one.partition.params == {"alpha": 1.0} and isinstance(one.partition.params["alpha"], float)
    text = dump_config(one)
    assert "partition:\n  scheme: dirichlet\n  alpha: 1.0\n" in text and "params" not in text
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert load_config(path) == one  # what a run directory holds loads back to the same config
    assert dump_config(load_config(None, ["partition.scheme=dirichlet", "partition.alpha=1.0"])) == text


def test_a_run_directory_or_sweep_cell_refuses_a_different_config_but_not_another_progress_bar(tmp_path):
    """Reusing a run_id (or a sweep's --name) with another config is one clear error, not a mixed run;
    the progress bar is a display choice and may differ on resume."""
    import dataclasses

    from sim.orchestration.runner import prepare_run_dir
    from sim.orchestration.sweep import check_cells, plan_sweep

    base = [f"out={tmp_path / 'out'}", "run_id=same", "progress=false"]
    cfg, run_dir, lock, created = prepare_run_dir(load_config(None, base))
    lock.release()
    assert created and (run_dir / "config.yaml").is_file()
    again = prepare_run_dir(load_config(None, [*base, "progress=true"]))
    again[2].release()
    assert again[1] == run_dir and not again[3]
    with pytest.raises(ConfigError, match="holds a run with a different config"):
        prepare_run_dir(load_config(None, [*base, "rounds=3"]))

    sweep = plan_sweep(None, [f"out={tmp_path / 'out'}", "progress=false"], ["rounds=1,2"], "s")
    cell = sweep.cells[0]
    cell.dir.mkdir(parents=True)
    (cell.dir / "config.yaml").write_text(dump_config(dataclasses.replace(cell.cfg, num_clients=12)))
    with pytest.raises(ConfigError, match=f"cell {cell.id} .* was run with a different config"):
        check_cells(sweep)


def test_the_shipped_configs_are_found():
    assert {"benchmark.yaml", "warmfed_mechanism.yaml", "warmfed_judge.yaml"} <= {p.name for p in SHIPPED_CONFIGS}


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_its_algorithms_take_their_parameters(path):
    """A config the README tells users to run must parse, and every run name (variants included)
    must build its typed hyper-parameters: a renamed or removed parameter fails here, not mid-run."""
    from sim.config import algorithm_spec, run_algorithms

    cfg = load_config(path)
    names = run_algorithms(cfg)
    assert names
    for name in names:
        cls, params = algorithm_spec(cfg, name)
        assert isinstance(params, cls.Params)
