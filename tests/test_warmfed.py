"""WarmFed through the engine: phases, bytes, determinism, ablations, the Stable Diffusion path, bad input."""

from __future__ import annotations

import pandas as pd
import pytest

import run_sim
from sim.config import ConfigError, load_config
from sim.results import outcome_frame, read_metrics
from sim.runner import run_comparison
from tests.conftest import small_overrides

# Seconds-scale WarmFed: a briefly pretrained backbone (cached in the test's cache dir), few LoRA and
# sampler steps. The numbers are meaningless; the mechanics are what these tests check.
TINY = [
    "algo.warmfed.pretrain_steps=20", "algo.warmfed.lora_steps=3", "algo.warmfed.lora_batch_size=16",
    "algo.warmfed.synth_per_class=3", "algo.warmfed.sampler_steps=3", "algo.warmfed.server_epochs=2",
    "num_clients=4", "clients_per_round=4", "rounds=1", "data.domains=plain,inverted",
]


@pytest.mark.slow
def test_warmfed_phases_bytes_and_determinism(ray_local, tmp_path):
    runs = []
    for pool, cpus in ((1, 1.0), (2, 0.5)):
        cfg = load_config(None, small_overrides(tmp_path, "algorithms=warmfed", *TINY, f"ray.pool_size={pool}",
                                                f"client_resources.num_cpus={cpus}", f"run_id=wf{pool}"))
        runs.append(run_comparison(cfg).run_dir)
    a, b = (outcome_frame(d, ignore=("pretrained_now",)) for d in runs)
    pd.testing.assert_frame_equal(a, b)  # same seed → same numbers, whatever the pool size

    df = read_metrics(runs[0]).to_pandas()
    run = df[df.client_id == -1].set_index("metric").value
    for phase in ("backbone", "lora", "synthesis", "server_finetune"):
        assert f"{phase}/wall_s" in run.index
        assert run[f"{phase}/server_peak_rss_mb"] > 50  # every phase reports its own peak memory
    assert run["lora/client_peak_rss_mb"] > 50
    lora_bytes, backbone_bytes = run["lora/lora_bytes_per_client"], run["backbone/backbone_bytes"]
    assert 0 < lora_bytes < 0.25 * backbone_bytes
    # Only LoRA tensors (+ 10 int32 class counts) travel up in the one-shot phase.
    assert run["lora/bytes_up"] == 4 * (lora_bytes + 10 * 4)
    assert run["synthesis/images"] > 0
    grids = list((runs[0] / "artifacts" / "warmfed" / "seed0").glob("client*.png"))
    assert len(grids) == 4
    report = (runs[0] / "report.md").read_text()
    assert "Warm-start phases" in report and "After the one-shot warm start" in report
    # one-shot (round 0) and round-1 accuracies are both reported
    acc = df[(df.metric == "global_acc") & (df.split == "test")]
    assert sorted(set(acc["round"])) == [0, 1]


@pytest.mark.slow
def test_ablation_switches_each_change_their_part(ray_local, tmp_path):
    variants = [
        "variants.warmfed-nolora.algorithm=warmfed", "variants.warmfed-nolora.personalize=false",
        "variants.warmfed-plain.algorithm=warmfed", "variants.warmfed-plain.server_finetune=false",
        "variants.warmfed-plain.dsd=false", "variants.warmfed-plain.round_lr=0.05",  # = train.lr, as FedAvg
    ]
    cfg = load_config(None, small_overrides(tmp_path, "algorithms=fedavg,warmfed-nolora,warmfed-plain",
                                            *TINY, *variants))
    run_dir = run_comparison(cfg).run_dir
    df = read_metrics(run_dir).to_pandas()
    for variant in ("warmfed-nolora", "warmfed-plain"):  # each variant's sample grids, none overwritten
        assert len(list((run_dir / "artifacts" / variant / "seed0").glob("client*.png"))) == 4
    run = df[df.client_id == -1]

    def value(algo, metric):
        return float(run[(run.algorithm == algo) & (run.metric == metric)].value.iloc[0])

    # No personalization: nothing but the class counts is uploaded, samples come from the plain backbone.
    assert value("warmfed-nolora", "lora/bytes_up") == 4 * 10 * 4
    # No server fine-tune and no DSD: the rounds are exactly FedAvg's from the same init.
    test = df[(df.split == "test") & (df.metric == "global_acc")]
    for r in (0, 1):
        fed = test[(test.algorithm == "fedavg") & (test["round"] == r)].sort_values("client_id").value.values
        plain = test[(test.algorithm == "warmfed-plain") & (test["round"] == r)].sort_values("client_id").value.values
        assert list(fed) == list(plain)


def test_stable_diffusion_backbone_through_the_engine(ray_local, tmp_path):
    from tests.test_warmfed_diffusion import _build_tiny_sd

    sd = _build_tiny_sd(tmp_path / "sd")
    cfg = load_config(None, small_overrides(
        tmp_path, "algorithms=warmfed", *TINY, "algo.warmfed.backbone=stable-diffusion", f"algo.warmfed.sd_model={sd}",
        "algo.warmfed.lora_steps=1", "algo.warmfed.synth_per_class=1", "algo.warmfed.sampler_steps=2", "num_clients=2",
        "clients_per_round=2", "partition.scheme=iid", "partition.min_size=5", "rounds=1"))
    df = read_metrics(run_comparison(cfg).run_dir).to_pandas()
    run = df[df.client_id == -1].set_index("metric").value
    assert run["synthesis/images"] > 0 and run["lora/lora_bytes_per_client"] > 0
    assert set(df[df.metric == "personal_acc"].client_id) == {0, 1}


@pytest.mark.parametrize(
    "items, words",
    [
        (["algo.warmfed.lora_rank=0"], ["lora_rank", ">= 1"]),
        (["algo.warmfed.prompt_template=a photo"], ["prompt_template", "class_name"]),
        (["algo.warmfed.backbone=stable-diffusion"], ["sd_model"]),
        (["algo.warmfed.backbone=dalle"], ["backbone", "tiny"]),
        (["algo.warmfed.round_lr=0"], ["round_lr", "> 0"]),
    ],
)
def test_bad_warmfed_config(items, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["algorithms=warmfed", *items])
    for word in words:
        assert word in str(info.value)


def test_missing_backbone_path_is_one_clear_line(capsys, tmp_path):
    missing = tmp_path / "no" / "such" / "sd-model"
    code = run_sim.main(["run", "--set", "algorithms=warmfed", "--set", "algo.warmfed.backbone=stable-diffusion",
                         "--set", f"algo.warmfed.sd_model={missing}", "--set", f"out={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2 and "backbone path does not exist" in err and str(missing) in err
