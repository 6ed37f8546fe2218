"""WarmFed through the engine: phases, bytes, determinism, ablations, the Stable Diffusion path, bad input."""

from __future__ import annotations

import pandas as pd
import pytest

import run_sim
from sim.config import ConfigError, load_config
from sim.orchestration.runner import run_comparison
from sim.results import outcome_frame, read_metrics
from tests.cli import cli, sets
from tests.conftest import attached, run_in_process, small_overrides

# Seconds-scale WarmFed: a briefly pretrained backbone (cached in the test's cache dir), few LoRA and
# sampler steps. The numbers are meaningless; the mechanics are what these tests check.
TINY = [
    "algo.warmfed.pretrain_steps=20",
    "algo.warmfed.backbone_channels=[8,16]",  # a UNet a tenth the default's cost
    "algo.warmfed.pretrain_augment=none",  # one look: lora_pixel_map auto maps the clients' images onto it
    "algo.warmfed.lora_steps=3",
    "algo.warmfed.lora_batch_size=16",
    "algo.warmfed.synth_per_class=3",
    "algo.warmfed.sampler_steps=3",
    "algo.warmfed.server_epochs=2",
    "num_clients=4",
    "clients_per_round=4",
    "rounds=1",
    "data.domains=plain,inverted",
    "train.finetune_epochs=1",
]
PHASES = ("backbone", "lora", "synthesis", "server_finetune", "personalize")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    """TINY with one cache for the module: the backbone is pretrained once, by the first run."""
    return [*TINY, f"cache_dir={tmp_path_factory.mktemp('warmfed_cache')}"]


@pytest.fixture(scope="module")
def two_pool_runs(ray_local, tmp_path_factory, tiny) -> list:
    """Two rounds of TINY WarmFed on one and on two client actors: the determinism and phase checks
    read them, and they are the unbroken reference of the killed-run test."""
    tmp = tmp_path_factory.mktemp("warmfed_pools")
    runs = []
    for pool in (1, 2):  # two actors is the other tests' plan: they take these actors warm
        items = small_overrides(tmp, "algorithms=warmfed", *tiny, "rounds=2", f"ray.pool_size={pool}")
        runs.append(run_in_process([*items, f"run_id=wf{pool}"]))
    return runs


@pytest.mark.slow
def test_warmfed_phases_bytes_and_determinism(two_pool_runs):
    runs = two_pool_runs
    a, b = (outcome_frame(d, ignore=("pretrained_now",)) for d in runs)
    pd.testing.assert_frame_equal(a, b)  # same seed → same numbers, whatever the pool size

    df = read_metrics(runs[0]).to_pandas()
    run = df[df.client_id == -1].set_index("metric").value
    for phase in PHASES:
        assert f"{phase}/wall_s" in run.index
        assert run[f"{phase}/server_peak_rss_mb"] > 50  # every phase reports its own peak memory
    assert run["lora/client_peak_rss_mb"] > 50
    lora_bytes, backbone_bytes = run["lora/lora_bytes_per_client"], run["backbone/backbone_bytes"]
    assert 0 < lora_bytes < backbone_bytes  # (8, 16) widths: the conv_in/conv_out LoRA weighs as much as them
    # Only LoRA tensors (+ 10 int32 class counts) travel up in the one-shot phase.
    assert run["lora/bytes_up"] == 4 * (lora_bytes + 10 * 4)  # lora_bytes: the tensors and the pixel map
    assert run["lora/pixel_mapped"] == 4  # lora_pixel_map auto: a one-look backbone and a public split
    assert run["synthesis/images"] > 0
    # synthesis ran on the pool, one item per client; the one-shot personalization downloaded the warm start
    assert sorted(df[df.metric == "synthesis/work_s"].client_id) == [0, 1, 2, 3]
    # the warm start, and (check_synthetic) each client's own samples: 3 per class of its classes
    samples = run["synthesis/images"]
    image_bytes = samples * 3 * 16 * 16 * 4 + samples * 8  # float32 images, int64 labels
    assert run["personalize/bytes_down"] == 4 * run["lora/classifier_bytes"] + image_bytes
    grids = list((runs[0] / "artifacts" / "warmfed" / "seed0").glob("client*.png"))
    assert len(grids) == 4
    report = (runs[0] / "report.md").read_text()
    assert "Warm-start phases" in report and "After the one-shot warm start" in report
    # one-shot (round 0) and every round's accuracies are reported
    acc = df[(df.metric == "global_acc") & (df.split == "test")]
    assert sorted(set(acc["round"])) == [0, 1, 2]


@pytest.mark.slow
def test_ablation_switches_each_change_their_part(ray_local, tiny, tmp_path):
    variants = [
        "variants.warmfed-nolora.algorithm=warmfed",
        "variants.warmfed-nolora.personalize=false",
        "variants.warmfed-plain.algorithm=warmfed",
        "variants.warmfed-plain.server_finetune=false",
        "variants.warmfed-plain.round_server_epochs=0",
        "variants.warmfed-plain.dsd=false",
        "variants.warmfed-plain.round_lr=0.05",  # = train.lr, as FedAvg
    ]
    cfg = load_config(
        None, small_overrides(tmp_path, "algorithms=fedavg,warmfed-nolora,warmfed-plain", *tiny, *variants)
    )
    run_dir = run_comparison(cfg).run_dir
    df = read_metrics(run_dir).to_pandas()
    assert len(list((run_dir / "artifacts" / "warmfed-nolora" / "seed0").glob("client*.png"))) == 4
    run = df[df.client_id == -1]

    def value(algo, metric):
        return float(run[(run.algorithm == algo) & (run.metric == metric)].value.iloc[0])

    # No personalization: nothing but the class counts is uploaded, no LoRA trained, plain backbone samples.
    assert value("warmfed-nolora", "lora/bytes_up") == 4 * 10 * 4
    assert value("warmfed-nolora", "lora/trained") == 0 and value("warmfed-nolora", "synthesis/images") > 0
    # Nothing reads the synthetic set: no backbone, no LoRA, no sampling, no grids.
    plain_phases = {m.split("/")[0] for m in run[run.algorithm == "warmfed-plain"].metric if "/" in m}
    assert plain_phases == {"personalize"}
    assert not (run_dir / "artifacts" / "warmfed-plain").exists()
    # No server fine-tune and no DSD: the global model of the rounds is exactly FedAvg's from the same init.
    test = df[(df.split == "test") & (df.metric == "global_acc")]
    for r in (0, 1):
        fed = test[(test.algorithm == "fedavg") & (test["round"] == r)].sort_values("client_id").value.values
        plain = test[(test.algorithm == "warmfed-plain") & (test["round"] == r)].sort_values("client_id").value.values
        assert list(fed) == list(plain)


@pytest.mark.slow
def test_variants_reuse_lora_and_synthesis_and_report_one_shot_personal_models(ray_local, tiny, tmp_path):
    variants = [
        "variants.warmfed-nodsd.algorithm=warmfed",
        "variants.warmfed-nodsd.dsd=false",
        "variants.warmfed-no1shot.algorithm=warmfed",
        "variants.warmfed-no1shot.oneshot_personal=false",
        "variants.warmfed-no1shot.round_server_epochs=0",
    ]
    cfg = load_config(
        None, small_overrides(tmp_path, "algorithms=warmfed,warmfed-nodsd,warmfed-no1shot", *tiny, *variants)
    )
    run_dir = run_comparison(cfg).run_dir
    df = read_metrics(run_dir).to_pandas()
    run = df[df.client_id == -1]

    def value(algo, metric):
        return float(run[(run.algorithm == algo) & (run.metric == metric)].value.iloc[0])

    assert value("warmfed", "lora/trained") == 4 and value("warmfed", "lora/reused") == 0
    for variant in ("warmfed-nodsd", "warmfed-no1shot"):  # same LoRA fields and data: nothing trained or sampled again
        assert value(variant, "lora/trained") == 0 and value(variant, "lora/reused") == 4
        assert value(variant, "synthesis/reused") == 4
        assert value(variant, "lora/bytes_up") == value("warmfed", "lora/bytes_up")
    assert len(list((run_dir / "cache" / "warmfed" / "lora").glob("*.safetensors"))) == 4
    assert len(list((run_dir / "cache" / "warmfed" / "synthesis").glob("*.npz"))) == 4
    # identical uploads and samples -> the identical one-shot global model
    test = df[df.split == "test"]
    g0 = {
        a: g.sort_values("client_id").value.tolist()
        for a, g in test[(test.metric == "global_acc") & (test["round"] == 0)].groupby("algorithm")
    }
    assert g0["warmfed"] == g0["warmfed-nodsd"] == g0["warmfed-no1shot"]
    # round 0: the one-shot personalized model is reported beside the one-shot global one
    p0 = {
        a: g.sort_values("client_id").value.tolist()
        for a, g in test[(test.metric == "personal_acc") & (test["round"] == 0)].groupby("algorithm")
    }
    assert p0["warmfed"] != g0["warmfed"]  # DSD from the warm start moved each client's model
    assert p0["warmfed-no1shot"] == g0["warmfed-no1shot"]  # no one-shot personal model: the global one
    assert value("warmfed", "personalize/bytes_down") > 0 and "personalize/wall_s" not in set(
        run[run.algorithm == "warmfed-no1shot"].metric
    )
    # DSD on vs off: different personalized models after the round
    p1 = {
        a: g.sort_values("client_id").value.tolist()
        for a, g in df[(df.metric == "personal_loss") & (df["round"] == 1)].groupby("algorithm")
    }
    assert p1["warmfed"] != p1["warmfed-nodsd"]


def test_stable_diffusion_backbone_through_the_engine(ray_local, tmp_path):
    from tests.test_warmfed_diffusion import _build_tiny_sd

    sd = _build_tiny_sd(tmp_path / "sd")
    cfg = load_config(
        None,
        small_overrides(
            tmp_path,
            "algorithms=warmfed",
            *TINY,
            "algo.warmfed.backbone=stable-diffusion",
            f"algo.warmfed.sd_model={sd}",
            "algo.warmfed.lora_steps=1",
            "algo.warmfed.synth_per_class=1",
            "algo.warmfed.sampler_steps=2",
            "num_clients=2",
            "clients_per_round=2",
            "partition.scheme=iid",
            "partition.min_size=5",
            "rounds=1",
        ),
    )
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
    code = run_sim.main(
        [
            "run",
            "--set",
            "algorithms=warmfed",
            "--set",
            "algo.warmfed.backbone=stable-diffusion",
            "--set",
            f"algo.warmfed.sd_model={missing}",
            "--set",
            f"out={tmp_path / 'r'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "backbone path does not exist" in err and str(missing) in err


@pytest.mark.slow
def test_killed_warmfed_run_resumes_to_the_same_metrics(ray_local, two_pool_runs, tiny, capsys, tmp_path):
    """The synthetic set and round counter live in the checkpointed server state and the personalized
    models in the state store: a run killed after round 1 ends with the numbers of an unbroken one.
    The killed run joins the session's Ray and the resume runs in-process; the unbroken reference
    is the one-actor run of the phases test (same config but the pool, which changes no number)."""
    from tests.faults import crash_env

    items = small_overrides(tmp_path, "algorithms=warmfed", *tiny, "rounds=2")
    crashed = cli(["run", *sets(attached(ray_local, items) + ["run_id=crashed"])], crash_env(1))
    assert crashed.returncode == 17, crashed.stderr[-2000:]
    code = run_sim.main(["run", "--resume", str(tmp_path / "results" / "crashed")])
    assert code == 0, capsys.readouterr().err[-2000:]
    pd.testing.assert_frame_equal(
        outcome_frame(tmp_path / "results" / "crashed", ignore=("pretrained_now",)),
        outcome_frame(two_pool_runs[0], ignore=("pretrained_now",)),
    )


@pytest.fixture(scope="module")
def checked_run(ray_local, tiny, tmp_path_factory) -> tuple:
    """Unchecked WarmFed beside three checked variants: judged by the one-shot personalized model,
    by a CE judge, and without DSD (where the personalized model is that CE judge)."""
    tmp = tmp_path_factory.mktemp("warmfed_check")
    variants = {
        "warmfed-check": "check_synthetic=true",
        "warmfed-ce-judge": "check_judge=ce",
        "warmfed-nodsd-check": "dsd=false",
    }
    items = [f"variants.{name}.algorithm=warmfed" for name in variants]
    items += [f"variants.{name}.{setting}" for name, setting in variants.items()]
    items += [f"variants.{name}.check_synthetic=true" for name in variants]
    items += ["variants.warmfed-check.check_judge=personal", "variants.warmfed-nodsd-check.check_judge=personal"]
    # a rate far from DSD's, so the two judges disagree even on the toy backbone's samples
    items += ["variants.warmfed-ce-judge.check_lr=0.3", "variants.warmfed-nodsd-check.personal_lr=0.3"]
    algorithms = "algorithms=" + ",".join(["warmfed", *variants])
    unchecked = "algo.warmfed.check_synthetic=false"
    cfg = load_config(None, small_overrides(tmp, algorithms, *tiny, *items, unchecked))
    return cfg, run_comparison(cfg).run_dir


def _accuracies(run_dir, metric: str) -> dict:
    df = read_metrics(run_dir).to_pandas()
    acc = df[(df.split == "test") & (df.metric == metric)].sort_values("client_id")
    return {(a, r): g.value.values for (a, r), g in acc.groupby(["algorithm", "round"])}


@pytest.mark.slow
def test_the_ce_judge_is_the_plain_ce_fine_tune_of_the_warm_start(checked_run):
    """check_judge=ce: the samples are judged by the warm start fine-tuned by plain CE on the
    client's real data (at `check_lr`), the very model dsd=false keeps as personalized at that
    rate; so the CE-judged run keeps the no-DSD run's samples and its global models are that
    run's to the bit, while its personalized models stay DSD's."""
    import numpy as np
    import torch

    _, run_dir = checked_run

    def kept(algo: str) -> np.ndarray:
        state = torch.load(run_dir / "checkpoints" / algo / "seed0" / "server_r0.pt", weights_only=False)
        return state.synthetic_x

    np.testing.assert_array_equal(kept("warmfed-ce-judge"), kept("warmfed-nodsd-check"))
    assert len(kept("warmfed-ce-judge")) < len(kept("warmfed"))
    assert not np.array_equal(kept("warmfed-ce-judge"), kept("warmfed-check"))  # not the DSD model's verdicts
    glob, personal = _accuracies(run_dir, "global_acc"), _accuracies(run_dir, "personal_acc")
    for r in (0, 1):
        np.testing.assert_array_equal(glob["warmfed-ce-judge", r], glob["warmfed-nodsd-check", r])
    np.testing.assert_array_equal(personal["warmfed-ce-judge", 0], personal["warmfed-check", 0])  # DSD's own
    assert not np.array_equal(personal["warmfed-ce-judge", 0], personal["warmfed-nodsd-check", 0])


@pytest.mark.slow
def test_clients_check_their_own_synthetic_samples_and_the_rounds_train_on_what_they_keep(checked_run):
    """check_synthetic: each client is sent only its own samples with the warm start, answers one
    bit per sample (does its one-shot personalized model label it as asked?), and the rounds'
    server fine-tunes read exactly the kept samples. Round 0 is the unchecked run's to the bit."""
    import numpy as np
    import torch

    from sim.data import load_dataset
    from sim.orchestration.runner import run_context

    cfg, run_dir = checked_run
    df = read_metrics(run_dir).to_pandas()
    run = df[df.client_id == -1]

    def value(algo, metric):
        return float(run[(run.algorithm == algo) & (run.metric == metric)].value.iloc[0])

    seed_dir = "seed0"
    plain = torch.load(run_dir / "checkpoints" / "warmfed" / seed_dir / "server_r0.pt", weights_only=False)
    checked = torch.load(run_dir / "checkpoints" / "warmfed-check" / seed_dir / "server_r0.pt", weights_only=False)
    n_total = len(plain.synthetic_y)
    assert value("warmfed-check", "personalize/synthetic_kept") == pytest.approx(len(checked.synthetic_y) / n_total)
    assert 0 < len(checked.synthetic_y) < n_total  # the toy backbone's samples: some pass, some do not
    # one bit per sample up; down: the warm start plus the client's own samples (images and labels)
    per_client = [int((plain.synthetic_owner == c).sum()) for c in range(4)]
    assert value("warmfed-check", "personalize/bytes_up") == sum((n + 7) // 8 for n in per_client)
    down_plain = value("warmfed", "personalize/bytes_down")
    extra = plain.synthetic_x.nbytes + plain.synthetic_y.nbytes
    assert value("warmfed-check", "personalize/bytes_down") == down_plain + extra

    # each verdict is its client's one-shot personalized model's prediction on its own samples
    data = load_dataset(cfg.dataset, cfg.data)
    model = run_context(cfg, data, 0, str(run_dir)).build_model().eval()
    for c in range(4):
        state = torch.load(
            run_dir / "client_state" / "warmfed-check" / seed_dir / "0000" / f"{c}_r0.pt", weights_only=False
        )
        model.load_state_dict(state.personal)
        mine = plain.synthetic_owner == c
        with torch.no_grad():
            pred = model(torch.from_numpy(plain.synthetic_x[mine])).argmax(1).numpy()
        keep = pred == plain.synthetic_y[mine]
        np.testing.assert_array_equal(checked.synthetic_x[checked.synthetic_owner == c], plain.synthetic_x[mine][keep])

    by = _accuracies(run_dir, "global_acc")
    np.testing.assert_array_equal(by["warmfed", 0], by["warmfed-check", 0])  # the check changes the rounds only
    assert not np.array_equal(by["warmfed", 1], by["warmfed-check", 1])


def test_check_synthetic_without_a_one_shot_personalization_is_refused(tmp_path):
    """Refused before Ray starts (the preflight builds every algorithm), naming the key."""
    from sim.data import load_dataset
    from sim.orchestration.runner import preflight

    bad = small_overrides(
        tmp_path, "algorithms=warmfed", "algo.warmfed.check_synthetic=true", "train.finetune_epochs=0"
    )
    cfg = load_config(None, bad)
    with pytest.raises(ConfigError, match="check_synthetic: true, but it needs the one-shot personalization"):
        preflight(cfg, load_dataset(cfg.dataset, cfg.data))
    idle = small_overrides(
        tmp_path, "algorithms=warmfed", "algo.warmfed.check_synthetic=true", "algo.warmfed.round_server_epochs=0"
    )
    cfg = load_config(None, idle)
    with pytest.raises(ConfigError, match="no round reads the checked set"):
        preflight(cfg, load_dataset(cfg.dataset, cfg.data))
    # unset (the default), it simply checks whenever there is a one-shot personalized model to check with
    quiet = small_overrides(tmp_path, "algorithms=warmfed", "algo.warmfed.oneshot_personal=false")
    cfg = load_config(None, quiet)
    preflight(cfg, load_dataset(cfg.dataset, cfg.data))


def test_every_warmfed_field_is_classed_as_shaping_the_lora_upload_or_not():
    """Reuse between variants keys a LoRA upload by the fields that can change it; a new field left
    out of `NOT_LORA` silently retrains every client's LoRA in each variant that sets it (as
    check_synthetic first did), one wrongly put in would reuse an upload it should not."""
    import dataclasses

    from algorithms.warmfed.params import WarmFedParams
    from algorithms.warmfed.reuse import NOT_LORA

    shapes_the_upload = {
        "backbone", "sd_model", "prompt_template", "pretrain_steps", "pretrain_augment", "backbone_channels",
        "personalize", "lora_rank", "lora_steps", "lora_lr", "lora_batch_size", "lora_resnet_convs",
        "lora_embeddings", "lora_pixel_map", "dp_clip", "dp_noise",
    }  # fmt: skip
    fields = {f.name for f in dataclasses.fields(WarmFedParams)}
    assert fields - NOT_LORA == shapes_the_upload
    assert fields >= NOT_LORA  # no stale names
