"""WarmFed's protocol, client and server verbs called directly (no Ray, no diffusion): self-distillation
from the client's own past model, KL = 0 at identical weights, the λ schedule, the per-round server
fine-tune, what is uploaded vs kept, and which phases an ablation runs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from algorithms.aggregation import Aggregator
from algorithms.base import (
    Broadcast,
    ClientContext,
    ClientData,
    ClientUpdate,
    PersonalState,
    RunContext,
    load_weights,
    model_weights,
)
from algorithms.warmfed import algorithm as wf_module
from algorithms.warmfed.algorithm import WarmFed
from algorithms.warmfed.dsd import DSDConfig, DSDObjective, client_weight
from algorithms.warmfed.messages import WarmFedServerState
from algorithms.warmfed.params import WarmFedParams
from sim.config import TrainConfig
from sim.models import ModelSpec
from sim.training import local_sgd

SPEC = ModelSpec(in_channels=3, num_classes=4, image_size=8, width=4)


def _run(finetune_epochs: int = 2, **train) -> RunContext:
    return RunContext(
        num_clients=2,
        clients_per_round=2,
        rounds=2,
        seed=0,
        train=TrainConfig(finetune_epochs=finetune_epochs, batch_size=16, **train),
        model_name="small_cnn",
        model_spec=SPEC,
        cache_dir="",
        run_dir="",
    )


def _data(seed: int, n: int = 48) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    y = {s: torch.arange(n) % 4 for s in ("train", "val", "test")}
    # class-dependent means: a model can learn the task in a few steps
    x = {s: torch.randn(n, 3, 8, 8, generator=g) * 0.5 + y[s].float()[:, None, None, None] - 1.5 for s in y}
    return ClientData(x, y)


def _ctx(run: RunContext, round: int, data: ClientData, client_id: int = 0) -> ClientContext:
    scratch: dict[str, torch.nn.Module] = {}
    model = run.build_model()

    def make(key: str) -> torch.nn.Module:
        if key not in scratch:
            scratch[key] = run.build_model()
        return scratch[key]

    return ClientContext(client_id, round, run, data, model, make, torch.device("cpu"))


def _random_weights(seed: int, run: RunContext) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return model_weights(run.build_model())


def _params(names: tuple[str, ...], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: weights[k] for k in names}


def _param_names(run: RunContext) -> tuple[str, ...]:
    return tuple(k for k, _ in run.build_model().named_parameters())


def test_round_two_teacher_is_the_clients_round_one_personal_model_not_the_global():
    run = _run()
    algo = WarmFed(WarmFedParams(), run)
    data = _data(1)
    g1, g2 = _random_weights(1, run), _random_weights(2, run)
    ctx1 = _ctx(run, 1, data)
    _, state1 = algo.local_train(ctx1, Broadcast(g1), None)
    teacher1 = model_weights(ctx1.scratch_model("teacher"))
    names = _param_names(run)
    # round 1 without a personalized model yet: the teacher is the model received (the warm start)
    for k in names:
        assert torch.equal(teacher1[k], g1[k])
    ctx2 = _ctx(run, 2, data)
    _, state2 = algo.local_train(ctx2, Broadcast(g2), state1)
    teacher2 = model_weights(ctx2.scratch_model("teacher"))
    for k in names:
        assert torch.equal(teacher2[k], state1.personal[k]), k
    assert any(not torch.equal(teacher2[k], g2[k]) for k in names)
    # and the student started from the new global model: with the teacher as the global model the result differs
    as_global = WarmFed(WarmFedParams(dsd_teacher="global"), run)
    _, other = as_global.local_train(_ctx(run, 2, data), Broadcast(g2), state1)
    assert any(not torch.equal(other.personal[k], state2.personal[k]) for k in names)


def test_both_teachers_distil_the_mean_logits_of_the_own_past_and_the_new_global_model():
    from algorithms.warmfed.dsd import LogitEnsemble

    run = _run()
    data = _data(1)
    g1, g2 = _random_weights(1, run), _random_weights(2, run)
    algo = WarmFed(WarmFedParams(dsd_teacher="both"), run)
    _, state1 = algo.local_train(_ctx(run, 1, data), Broadcast(g1), None)
    ctx2 = _ctx(run, 2, data)
    _, state2 = algo.local_train(ctx2, Broadcast(g2), state1)
    names = _param_names(run)
    own, newest = model_weights(ctx2.scratch_model("teacher")), model_weights(ctx2.scratch_model("teacher_global"))
    for k in names:
        assert torch.equal(own[k], state1.personal[k]) and torch.equal(newest[k], g2[k]), k
    x = data.x["train"][:8]
    a, b = ctx2.scratch_model("teacher").eval(), ctx2.scratch_model("teacher_global").eval()
    with torch.no_grad():
        assert torch.allclose(LogitEnsemble(a, b)(x), (a(x) + b(x)) / 2)
    others = {
        t: WarmFed(WarmFedParams(dsd_teacher=t), run).local_train(_ctx(run, 2, data), Broadcast(g2), state1)[1]
        for t in ("personal", "global")
    }
    for t, other in others.items():
        assert any(not torch.equal(other.personal[k], state2.personal[k]) for k in names), t
    # round 1 has no own past yet: the one teacher is the model received, as with `personal`
    _, first = WarmFed(WarmFedParams(dsd_teacher="personal"), run).local_train(_ctx(run, 1, data), Broadcast(g1), None)
    assert all(torch.equal(first.personal[k], state1.personal[k]) for k in names)


def test_kl_is_zero_at_identical_weights_in_the_training_mode():
    run = _run()
    student = run.build_model()
    teacher = run.build_model()
    load_weights(teacher, model_weights(student))
    data = _data(3)
    x, y = data.x["train"][:16], data.y["train"][:16]
    student.train()
    objective = DSDObjective(teacher, DSDConfig(client_weighting="none", selection="all"), total_steps=10)
    loss = objective(student, x, y)
    assert objective.kls[0] == pytest.approx(0.0, abs=1e-7)
    assert float(loss.detach()) == pytest.approx(
        float(torch.nn.functional.cross_entropy(student(x), y).detach()), abs=1e-6
    )
    # the old setting (teacher on running statistics, student on batch statistics) is not zero
    student2 = run.build_model()
    load_weights(student2, model_weights(teacher))
    student2.train()
    running = DSDObjective(teacher, DSDConfig(client_weighting="none", selection="all", teacher_mode="running"), 10)
    running(student2, x, y)
    assert running.kls[0] > 1e-4


def test_lambda_schedule_advances_every_step_of_training():
    run = _run(finetune_epochs=3)
    data = _data(4)
    ctx = _ctx(run, 1, data)
    teacher = ctx.scratch_model("teacher")
    steps = 3 * 3  # 48 samples / batch 16, three epochs
    objective = DSDObjective(teacher, DSDConfig(lambda0=2.0, schedule="linear"), steps, client_weight=0.5)
    metrics = local_sgd(ctx, ctx.model, loss_fn=objective, epochs=3)
    assert metrics["train_steps"] == steps == objective.step
    assert objective.lambdas == pytest.approx([0.5 * 2.0 * (1 - i / (steps - 1)) for i in range(steps)])


def test_client_weight_follows_the_teachers_validation_advantage():
    cfg = DSDConfig(margin=0.1)
    assert client_weight(cfg, 0.8, 0.8) == 1.0
    assert client_weight(cfg, 0.7, 0.8) == pytest.approx(0.0)
    assert client_weight(cfg, 0.85, 0.8) == pytest.approx(1.5)
    assert client_weight(cfg, 1.0, 0.5) == 2.0
    assert client_weight(DSDConfig(client_weighting="none"), 0.0, 1.0) == 1.0


def test_rounds_run_dsd_and_dsd_on_vs_off_differ(monkeypatch):
    calls = []

    class Spy(DSDObjective):
        def __call__(self, model, x, y):
            calls.append(len(y))
            return super().__call__(model, x, y)

    monkeypatch.setattr(wf_module, "DSDObjective", Spy)
    run = _run(finetune_epochs=2)
    data = _data(5)
    g = _random_weights(1, run)
    previous = PersonalState(_random_weights(9, run))
    update, with_dsd = WarmFed(WarmFedParams(), run).local_train(_ctx(run, 1, data), Broadcast(g), previous)
    assert sum(calls) == 2 * 48  # every sample of every personalization epoch went through DSD
    assert update.metrics["dsd_steps"] == 6 and update.metrics["dsd_kl"] > 0
    calls.clear()
    _, without = WarmFed(WarmFedParams(dsd=False), run).local_train(_ctx(run, 1, data), Broadcast(g), previous)
    assert not calls
    assert any(not torch.equal(with_dsd.personal[k], without.personal[k]) for k in _param_names(run))


def test_upload_is_the_ce_model_and_the_personal_model_stays():
    run = _run(finetune_epochs=2, lr=0.05)
    data = _data(6)
    g = _random_weights(1, run)
    update, state = WarmFed(WarmFedParams(round_lr=0.05), run).local_train(_ctx(run, 1, data), Broadcast(g), None)
    # the upload is exactly FedAvg's local model from the same global weights
    from algorithms.registry import get_algorithm
    from baselines import fedavg  # noqa: F401  registers fedavg

    fed = get_algorithm("fedavg")
    fed_update, _ = fed(fed.Params(), run).local_train(_ctx(run, 1, data), Broadcast(g), None)
    for k in update.payload:
        assert torch.equal(update.payload[k], fed_update.payload[k]), k
    assert any(not torch.equal(update.payload[k], state.personal[k]) for k in _param_names(run))
    # upload=dsd: the personalized student is what is averaged (pFedSD)
    update2, state2 = WarmFed(WarmFedParams(upload="dsd"), run).local_train(_ctx(run, 1, data), Broadcast(g), None)
    for k in update2.payload:
        assert torch.equal(update2.payload[k], state2.personal[k])


def test_personal_epochs_are_the_shared_finetune_budget():
    data = _data(7)
    for epochs in (1, 3):
        run = _run(finetune_epochs=epochs)
        update, _ = WarmFed(WarmFedParams(), run).local_train(
            _ctx(run, 1, data), Broadcast(_random_weights(1, run)), None
        )
        assert update.metrics["dsd_steps"] == 3 * epochs


def _synthetic_state(run: RunContext, n: int = 64) -> WarmFedServerState:
    data = _data(8, n)
    return WarmFedServerState(
        _random_weights(3, run), synthetic_x=data.x["train"].numpy(), synthetic_y=data.y["train"].numpy()
    )


def _aggregate(run: RunContext) -> Aggregator:
    agg = Aggregator()
    agg.add(ClientUpdate(0, _random_weights(4, run), 10.0))
    return agg


def test_round_server_finetune_on_vs_off_changes_the_global_model():
    run = _run()
    off = WarmFed(WarmFedParams(round_server_epochs=0), run)
    on = WarmFed(WarmFedParams(round_server_epochs=1), run)
    mean = off.finish_round(_synthetic_state(run), _aggregate(run))
    tuned = on.finish_round(_synthetic_state(run), _aggregate(run))
    plain = _random_weights(4, run)  # the mean of one update is that update
    for k in plain:
        assert torch.allclose(mean.weights[k].float(), plain[k].float())
    assert any(not torch.equal(tuned.weights[k], mean.weights[k]) for k in _param_names(run))
    assert tuned.rounds_done == 1 and tuned.has_synthetic
    again = on.finish_round(tuned, _aggregate(run))  # round 2 draws its own seed: not a replay of round 1
    assert again.rounds_done == 2


def test_warm_start_keeps_the_synthetic_set_only_when_the_rounds_read_it(tmp_path):
    run = dataclasses.replace(_run(), run_dir=str(tmp_path))
    from algorithms.base import ServerContext

    ctx = ServerContext(run, torch.device("cpu"), lambda *a: None, tmp_path)
    keep = WarmFed(WarmFedParams(server_epochs=1), run)._server_finetune(ctx, _synthetic_state(run), [])
    drop = WarmFed(WarmFedParams(server_epochs=1, round_server_epochs=0), run)._server_finetune(
        ctx, _synthetic_state(run), []
    )
    assert keep.has_synthetic and not drop.has_synthetic
    for k in _param_names(run):
        assert torch.equal(keep.weights[k], drop.weights[k])


def _phases(**kw) -> list[str]:
    return [p.name for p in WarmFed(WarmFedParams(**kw), _run()).setup_phases()]


def test_phases_an_ablation_does_not_use_are_skipped():
    assert _phases() == ["backbone", "lora", "synthesis", "server_finetune", "personalize"]
    # nothing reads the synthetic set: no backbone, no LoRA, no sampling
    assert _phases(server_finetune=False, round_server_epochs=0) == ["personalize"]
    assert _phases(server_finetune=False) == ["backbone", "lora", "synthesis", "server_finetune"] + ["personalize"]
    assert "personalize" not in _phases(oneshot_personal=False)
    assert [p.name for p in WarmFed(WarmFedParams(), _run(finetune_epochs=0)).setup_phases()][-1] == "server_finetune"
    kinds = {p.name: p.kind for p in WarmFed(WarmFedParams(), _run()).setup_phases()}
    assert kinds == {
        "backbone": "server",
        "lora": "client",
        "synthesis": "work",
        "server_finetune": "server",
        "personalize": "personal",
    }


def test_no_personalization_trains_no_lora(monkeypatch):
    import algorithms.warmfed.lora as lora

    def boom(*args, **kwargs):
        raise AssertionError("LoRA trained in the no-personalization ablation")

    monkeypatch.setattr(lora, "train_client_lora", boom)
    run = _run()
    bundle = WarmFed(WarmFedParams(personalize=False), run)._client_lora_reused(_ctx(run, -1, _data(9)))
    assert bundle.lora is None and bundle.nbytes == 4 * 4
    assert list(bundle.class_counts) == [12, 12, 12, 12]


def test_one_shot_personal_model_is_dsd_from_the_warm_start():
    run = _run()
    g = _random_weights(1, run)
    data = _data(10)
    algo = WarmFed(WarmFedParams(), run)
    upload, state = algo._oneshot_personal(_ctx(run, 0, data), Broadcast(g), None)
    assert upload is None
    names = _param_names(run)
    assert any(not torch.equal(state.personal[k], g[k]) for k in names)
    assert algo.personal_weights(_ctx(run, 0, data), Broadcast(g), state) is state.personal
    assert algo.personal_weights(_ctx(run, 0, data), Broadcast(g), None) is None


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"upload": "both"}, ["upload", "ce"]),
        ({"dsd_teacher": "self"}, ["dsd_teacher", "personal"]),
        ({"round_server_epochs": -1}, ["round_server_epochs"]),
        ({"personal_lr": 0}, ["personal_lr"]),
        ({"check_judge": "global"}, ["check_judge", "ce", "personal"]),
        ({"check_lr": -0.01}, ["check_lr"]),
        ({"dsd_selection": "x"}, ["selection", "credibility"]),
        ({"dsd_teacher_mode": "eval"}, ["teacher_mode", "batch"]),
        ({"dsd_client_weighting": "x"}, ["client_weighting", "advantage"]),
        ({"dsd_margin": 0}, ["margin"]),
        ({"dsd_combine": "sum"}, ["combine", "additive", "convex"]),
        ({"pretrain_augment": "colour"}, ["pretrain_augment", "none", "photometric", "polarity"]),
    ],
)
def test_bad_protocol_params(kwargs, words):
    with pytest.raises(ValueError) as info:
        WarmFedParams(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_content_key_changes_with_every_part():
    from algorithms.warmfed.reuse import content_key

    base = content_key("lora", "fp", {"a": 1}, 0, 3, np.arange(4))
    assert base == content_key("lora", "fp", {"a": 1}, 0, 3, np.arange(4))
    for other in (
        content_key("lora", "fp2", {"a": 1}, 0, 3, np.arange(4)),
        content_key("lora", "fp", {"a": 2}, 0, 3, np.arange(4)),
        content_key("lora", "fp", {"a": 1}, 1, 3, np.arange(4)),
        content_key("lora", "fp", {"a": 1}, 0, 3, np.arange(1, 5)),
    ):
        assert other != base


def test_synthesis_differs_per_client_lora_and_is_reused_by_content(tmp_path, monkeypatch):
    from algorithms.base import ServerContext
    from algorithms.warmfed.diffusion import TinyBackboneConfig, pretrain_tiny_backbone
    from algorithms.warmfed.lora import LoraConfig, train_client_lora
    from algorithms.warmfed.messages import SynthesisJob

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (24, 3, 16, 16)).astype(np.float32)
    y = (np.arange(24) % 10).astype(np.int64)
    backbone = pretrain_tiny_backbone(
        x,
        y,
        TinyBackboneConfig(block_out_channels=(16, 32), train_steps=3, batch_size=8, warmup_steps=1),
        data_fingerprint="toy",
    )
    monkeypatch.setattr(wf_module, "load_backbone", lambda *args, **kwargs: backbone)
    cfg = LoraConfig(rank=4, steps=3, batch_size=8, lr=1e-2)
    lora_a = train_client_lora(backbone, x, y, cfg)
    lora_b = train_client_lora(backbone, -x, y, cfg)  # another client, another domain
    run = dataclasses.replace(_run(), run_dir=str(tmp_path))
    algo = WarmFed(WarmFedParams(sampler_steps=2, synth_per_class=2), run)
    ctx = ServerContext(run, torch.device("cpu"), lambda *a: None, tmp_path)
    want = np.array([2, 2, 0, 0, 0, 0, 0, 0, 0, 0])
    a = algo._synthesize_one(ctx, SynthesisJob(0, lora_a, want, 5, "key-a"))
    b = algo._synthesize_one(ctx, SynthesisJob(1, lora_b, want, 5, "key-b"))
    base = algo._synthesize_one(ctx, SynthesisJob(2, None, want, 5, ""))
    assert list(a.labels) == [0, 0, 1, 1] and not a.reused
    assert not np.allclose(a.images, b.images) and not np.allclose(a.images, base.images)
    again = algo._synthesize_one(ctx, SynthesisJob(0, lora_a, want, 5, "key-a"))
    assert again.reused and np.array_equal(again.images, a.images)
    fresh = WarmFed(WarmFedParams(sampler_steps=2, synth_per_class=2, reuse=False), run)._synthesize_one(
        ctx, SynthesisJob(0, lora_a, want, 5, "key-a")
    )
    assert not fresh.reused and np.array_equal(fresh.images, a.images)  # the cache holds what sampling gives
    other_steps = WarmFed(WarmFedParams(sampler_steps=3, synth_per_class=2), run)._synthesize_one(
        ctx, SynthesisJob(0, lora_a, want, 5, "key-a")
    )
    assert not other_steps.reused  # a synthesis field is part of the key


def test_checkpoints_from_before_the_module_split_still_load(tmp_path):
    """The server state and uploads moved from algorithm.py to messages.py; a checkpoint written
    before names them by their old module, so that module must still resolve them."""
    import pickle

    from algorithms.warmfed.messages import ClientUploadBundle

    state = WarmFedServerState(
        weights={}, uploads=[ClientUploadBundle(None, np.arange(3, dtype=np.int32))], rounds_done=2
    )
    # a pre-split checkpoint: the same pickle with the classes under their old module
    legacy = pickle.dumps(state, protocol=0).replace(b"algorithms.warmfed.messages", b"algorithms.warmfed.algorithm")
    assert b"algorithms.warmfed.algorithm\nWarmFedServerState" in legacy
    loaded = pickle.loads(legacy)
    assert isinstance(loaded, WarmFedServerState) and loaded.rounds_done == 2
    assert isinstance(loaded.uploads[0], ClientUploadBundle)
    assert loaded.uploads[0].class_counts.tolist() == [0, 1, 2]
