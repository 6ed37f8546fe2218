"""Tests that pin what a method computes, not only that it computes something different.

Each test here was written against a deliberate bug (issue 15's table) that the older tests let
through: the steps of FedProx, Ditto and FedRep are worked out independently (plain SGD, one
full batch per epoch, so one epoch is one step) and compared with what the method did; the DP
noise is checked with a non-zero multiplier; client selection must change with the round; the
global model must weigh clients by their train size when they differ. No Ray: the algorithm
verbs are driven directly, on a softmax regression or a one-layer MLP over 12 inputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from algorithms.base import ClientContext, ClientData, NoParams, PersonalState, RunContext, model_weights
from sim.config import TrainConfig
from sim.models import Classifier, ModelSpec

D, CLASSES = 12, 3
SPEC = ModelSpec(in_channels=3, num_classes=CLASSES, image_size=2, width=4)
TOL = {"atol": 1e-6, "rtol": 1e-5}


def softmax_regression() -> Classifier:
    return Classifier(nn.Flatten(), D, CLASSES)


def one_layer_mlp() -> Classifier:
    """A body with parameters (FedRep's two phases need one)."""
    return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(D, 5), nn.Tanh()), 5, CLASSES)


def run_context(lr: float, *, epochs: int = 1, num_clients: int = 2, seed: int = 0) -> RunContext:
    """Plain SGD, batches larger than any client's data: one epoch is one full-batch step."""
    train = TrainConfig(local_epochs=epochs, batch_size=256, lr=lr, momentum=0.0, weight_decay=0.0)
    return RunContext(
        num_clients=num_clients,
        clients_per_round=num_clients,
        rounds=2,
        seed=seed,
        train=train,
        model_name="small_cnn",
        model_spec=SPEC,
        cache_dir="",
        run_dir="",
    )


def client_data(seed: int, n: int = 10) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    return ClientData(
        {s: torch.randn(n, 3, 2, 2, generator=g) for s in ("train", "val", "test")},
        {s: torch.randint(0, CLASSES, (n,), generator=g) for s in ("train", "val", "test")},
    )


def context(
    run: RunContext, data: ClientData, factory: Callable[[], Classifier], cid: int = 0, round: int = 1
) -> ClientContext:
    scratch: dict[str, nn.Module] = {}

    def scratch_model(key: str) -> nn.Module:
        if key not in scratch:
            scratch[key] = factory()
        return scratch[key]

    return ClientContext(cid, round, run, data, factory(), scratch_model, torch.device("cpu"))


def perturbed(weights: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in weights.items()}


def initial_weights(factory: Callable[[], Classifier], seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return model_weights(factory())


def ce_grad(
    factory: Callable[[], Classifier], weights: dict[str, torch.Tensor], data: ClientData
) -> dict[str, torch.Tensor]:
    """∇ of the mean cross-entropy over the whole train split, in float64, by autograd on a fresh model."""
    model = factory().double()
    params = {k: v.double().clone().requires_grad_(True) for k, v in weights.items()}
    logits = torch.func.functional_call(model, params, (data.x["train"].double(),))
    loss = F.cross_entropy(logits, data.y["train"])
    grads = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params, grads, strict=True))


def sgd_step(
    weights: dict[str, torch.Tensor], grad: dict[str, torch.Tensor], lr: float, keys=None
) -> dict[str, torch.Tensor]:
    return {k: (v.double() - lr * grad[k]) if keys is None or k in keys else v.double() for k, v in weights.items()}


def assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], keys=None) -> None:
    for k in keys if keys is not None else expected:
        torch.testing.assert_close(got[k].double(), expected[k].double(), **TOL, msg=lambda m, k=k: f"{k}: {m}")


def far_apart(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys=None) -> bool:
    """The guard of a by-hand test: the wrong answer is far outside the tolerance of the right one."""
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in (keys or a)) > 1e-3


# ----- FedProx: w ← w − η(∇f(w) + μ(w − w_g)) -------------------------------------------------------
def test_proximal_step_worked_by_hand_from_a_point_away_from_the_anchor():
    from baselines.fedprox import proximal_loss
    from sim.training import local_sgd

    lr, mu = 0.1, 2.0
    run, data = run_context(lr), client_data(1)
    w_g = initial_weights(softmax_regression)
    w = perturbed(w_g, 0.5, seed=2)
    ctx = context(run, data, softmax_regression)
    ctx.model.load_state_dict(w)
    local_sgd(ctx, ctx.model, loss_fn=proximal_loss(w_g, mu))
    g = ce_grad(softmax_regression, w, data)
    expected = {k: w[k].double() - lr * (g[k] + mu * (w[k].double() - w_g[k].double())) for k in w}
    assert_close(model_weights(ctx.model), expected)
    assert far_apart(expected, sgd_step(w, g, lr))  # μ really moves this step


def test_fedprox_two_steps_worked_by_hand_anchor_is_the_received_global():
    from baselines.fedprox import FedProx, FedProxParams

    lr, mu = 0.1, 3.0
    run, data = run_context(lr, epochs=2), client_data(3)
    algo = FedProx(FedProxParams(mu=mu), run)
    state = algo.init_server_state(initial_weights(softmax_regression))
    state = dataclasses.replace(state, weights=perturbed(state.weights, 0.5, seed=4))  # a global other than the init
    w_g = state.weights
    update, _ = algo.local_train(context(run, data, softmax_regression), algo.broadcast(state), None)
    # step 1 starts at the anchor (no pull); step 2 is pulled back toward w_g
    w1 = sgd_step(w_g, ce_grad(softmax_regression, w_g, data), lr)
    g1 = ce_grad(softmax_regression, w1, data)
    w2 = {k: w1[k] - lr * (g1[k] + mu * (w1[k] - w_g[k].double())) for k in w1}
    assert_close(update.payload, w2)
    assert far_apart(w2, sgd_step(w1, g1, lr))
    assert update.weight == data.size("train")


# ----- Ditto: v ← v − η(∇f(v) + λ(v − w_received)); w trained as FedAvg ------------------------------
def test_ditto_personal_step_is_pulled_toward_the_received_global_scaled_by_lambda():
    from baselines.ditto import Ditto, DittoParams

    lr, lam = 0.1, 0.5
    run, data = run_context(lr), client_data(5)
    algo = Ditto(DittoParams(lam=lam, personal_epochs=1), run)
    state = algo.init_server_state(initial_weights(softmax_regression))
    state = dataclasses.replace(state, weights=perturbed(state.init, 0.5, seed=6))  # received global ≠ init
    v0 = perturbed(state.init, 0.5, seed=7)  # the client's personal model from an earlier round
    w_g = state.weights
    update, new_state = algo.local_train(
        context(run, data, softmax_regression), algo.broadcast(state), PersonalState(v0)
    )
    g_v = ce_grad(softmax_regression, v0, data)
    plain = sgd_step(v0, g_v, lr)
    pull = {k: -lr * lam * (v0[k].double() - w_g[k].double()) for k in v0}
    expected = {k: plain[k] + pull[k] for k in v0}
    assert_close(new_state.personal, expected)
    # the pull is toward the received global, not the init, and scaled by λ, not 10λ
    toward_init = {k: plain[k] - lr * lam * (v0[k].double() - state.init[k].double()) for k in v0}
    ten_lambda = {k: plain[k] + 10 * pull[k] for k in v0}
    assert far_apart(expected, toward_init) and far_apart(expected, ten_lambda)
    # the uploaded global model is one plain step from the received global
    assert_close(update.payload, sgd_step(w_g, ce_grad(softmax_regression, w_g, data), lr))


# ----- FedRep: head (body frozen) first, then body (new head frozen) ----------------------------------
def test_fedrep_fits_the_head_first_then_the_body_under_the_new_head():
    from baselines.fedrep import FedRep, FedRepParams

    lr = 0.5
    run, data = run_context(lr), client_data(8)
    algo = FedRep(FedRepParams(head_epochs=1, body_epochs=1), run)
    state = algo.init_server_state(initial_weights(one_layer_mlp))
    w0 = algo.start_weights(context(run, data, one_layer_mlp), algo.broadcast(state), None)
    head = [k for k in w0 if k.startswith("head.")]
    body = [k for k in w0 if not k.startswith("head.")]
    update, new_state = algo.local_train(context(run, data, one_layer_mlp), algo.broadcast(state), None)
    w1 = sgd_step(w0, ce_grad(one_layer_mlp, w0, data), lr, keys=head)  # head step at the old body
    w2 = sgd_step(w1, ce_grad(one_layer_mlp, w1, data), lr, keys=body)  # body step under the new head
    assert_close(new_state.personal, w2, keys=head)
    assert_close(update.payload, w2, keys=body)
    assert set(update.payload) == set(body)
    body_first = sgd_step(w0, ce_grad(one_layer_mlp, w0, data), lr, keys=body)
    assert far_apart(w2, body_first, keys=body)  # the order shows in the body


# ----- client selection ---------------------------------------------------------------------------
def test_client_selection_changes_with_the_round_and_follows_the_seed():
    from baselines.fedavg import FedAvg

    def picks(seed: int) -> list[tuple[int, ...]]:
        algo = FedAvg(NoParams(), run_context(0.1, num_clients=20, seed=seed))
        return [tuple(int(c) for c in algo.select_clients(r, 20, 5)) for r in range(1, 11)]

    a, again, other = picks(0), picks(0), picks(1)
    assert a == again  # seeded: the same run selects the same clients
    assert len(set(a)) >= 8  # 10 rounds of 5 out of 20: a repeated set is rare, all-equal means the round is ignored
    assert a != other
    for chosen in a:
        assert list(chosen) == sorted(set(chosen)) and len(chosen) == 5 and all(0 <= c < 20 for c in chosen)
    full = FedAvg(NoParams(), run_context(0.1, num_clients=4))
    assert full.select_clients(3, 4, 4).tolist() == [0, 1, 2, 3]


# ----- unequal client sizes: the global model is the sample-weighted mean -------------------------
@pytest.mark.parametrize("name", ["fedavg", "fedprox", "ditto"])
def test_global_model_weighs_clients_by_their_train_size(name):
    from algorithms.registry import get_algorithm

    cls = get_algorithm(name)
    run = run_context(0.2)
    algo = cls(cls.Params(), run)
    state = algo.init_server_state(initial_weights(softmax_regression))
    sizes = (4, 36)
    datasets = [client_data(20 + c, n=n) for c, n in enumerate(sizes)]
    message = algo.broadcast(state)
    aggregator = algo.new_aggregator(state)
    updates = []
    for cid, data in enumerate(datasets):
        update, _ = algo.local_train(context(run, data, softmax_regression, cid), message, None)
        assert update.weight == sizes[cid]
        aggregator.add(update)
        updates.append(update)
    new = algo.finish_round(state, aggregator).weights
    total = float(sum(sizes))
    weighted = {
        k: sum(n * u.payload[k].double() for n, u in zip(sizes, updates, strict=True)) / total
        for k in updates[0].payload
    }
    unweighted = {k: sum(u.payload[k].double() for u in updates) / 2 for k in updates[0].payload}
    assert_close(new, weighted)
    assert far_apart(weighted, unweighted)


# ----- DP noise on the LoRA upload ------------------------------------------------------------------
def _upload(seed: int = 0) -> Any:
    from algorithms.warmfed.lora import LoraConfig, LoraUpload

    g = torch.Generator().manual_seed(seed)
    state = {f"block{i}.lora_A.weight": torch.randn(40, 50, generator=g) for i in range(3)}
    return LoraUpload(state=state, backbone_fingerprint="test-backbone", config=LoraConfig(rank=2))


def test_dp_upload_is_clipped_then_noised_with_the_stated_scale():
    from algorithms.warmfed.lora import privatize_upload

    up = _upload()
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in up.state.values()))
    clip, sigma = 1.0, 0.5
    clipped = {k: v * (clip / norm) for k, v in up.state.items()}
    quiet = privatize_upload(up, clip_norm=clip, noise_multiplier=0.0, seed=0)
    assert_close(quiet.state, clipped)
    noisy = privatize_upload(up, clip_norm=clip, noise_multiplier=sigma, seed=0)
    assert noisy.state.keys() == up.state.keys()
    noise = torch.cat([(noisy.state[k] - clipped[k]).flatten() for k in up.state])
    # 6000 draws of N(0, (σ·C)²): the sample std is within a few percent of σ·C = 0.5, the mean near 0
    assert abs(float(noise.std()) - sigma * clip) < 0.05 * sigma * clip
    assert abs(float(noise.mean())) < 0.05
    assert noisy.info["dp_noise_multiplier"] == sigma and noisy.info["dp_pre_clip_norm"] == pytest.approx(norm)
    same = privatize_upload(up, clip_norm=clip, noise_multiplier=sigma, seed=0)
    other = privatize_upload(up, clip_norm=clip, noise_multiplier=sigma, seed=1)
    assert all(torch.equal(noisy.state[k], same.state[k]) for k in up.state)  # seeded
    assert not any(torch.equal(noisy.state[k], other.state[k]) for k in up.state)
    small = privatize_upload(up, clip_norm=10 * norm, noise_multiplier=0.0, seed=0)  # under the bound: unchanged
    assert all(torch.equal(small.state[k], up.state[k]) for k in up.state)
    with pytest.raises(ValueError, match="clip_norm"):
        privatize_upload(up, clip_norm=0.0, noise_multiplier=1.0, seed=0)
