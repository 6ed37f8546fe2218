"""pFedMe (Dinh, Tran & Nguyen, NeurIPS 2020): personalization through Moreau envelopes.

Client i's personalized model is the proximal point of the shared model w (paper, Eq. 2–3):

    θ̂_i(w) = argmin_θ  f_i(θ) + λ/2 ‖θ − w‖²,

approximated by K gradient steps of size `personal_lr` on the current minibatch. The inner solve is
warm-started: within a round θ continues from the previous batch's θ̂ (θ = w at the round's first
batch), as the reference implementation does (its personal model persists across the local steps
and is reset to the received model each round); `warm_start=false` restarts it at θ = w on every
batch. The local model w then takes a gradient step on the Moreau envelope, whose gradient is
λ(w − θ̂_i(w)) (paper, Algorithm 1 line 8: w ← w − η λ (w − θ̂)): plain SGD, as in the paper, so
train.momentum does not apply (`outer_momentum=true` applies it). We express the step as the loss
λ/2 ‖w − θ̂.detach()‖² for the shared `local_sgd` (its lr η = train.lr).
The server mixes: w ← (1 − β) w + β · mean(w_i), sample-weighted like FedAvg (the paper's mean
is uniform; on equal-size clients they coincide).

Defaults: λ = 15, K = 5, β = 1 (paper). personal_lr = 0.01: the inner gradient descent contracts
only while personal_lr · (λ + L_f) < 2, i.e. below 2/15 ≈ 0.13 before the loss curvature L_f is
even counted; 0.1 diverged on small_cnn (digits, 5 rounds: global acc stuck at 0.10), 0.05 and
0.01 both train (0.75 / 0.71 global, 0.78 / 0.77 personal), and 0.01 keeps a wide margin. The local
lr η is the shared train.lr like every other baseline (the paper's η = 0.005 is for hundreds of
rounds); plain SGD on the envelope contracts w toward θ̂ while η λ < 2.
Personalized model at evaluation: θ̂_i(w) for the received global w, with K steps on the client's
whole training split (one batch) — the definition, computed deterministically. Train loss
reported: the envelope's quadratic term (its CE part lives in the inner problem).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from algorithms.base import (
    Aggregator,
    Algorithm,
    Broadcast,
    ClientContext,
    ClientState,
    ClientUpdate,
    ServerState,
    Weights,
    model_weights,
)
from algorithms.registry import register
from baselines.common import derived_context
from sim.training import LossFn, local_sgd


@dataclass(frozen=True)
class PFedMeParams:
    lam: float = 15.0
    inner_steps: int = 5  # K
    personal_lr: float = 0.01
    beta: float = 1.0
    warm_start: bool = True
    outer_momentum: bool = False

    def __post_init__(self) -> None:
        if not self.lam > 0:
            raise ValueError(f"lam must be > 0, got {self.lam}")
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {self.inner_steps}")
        if not self.personal_lr > 0:
            raise ValueError(f"personal_lr must be > 0, got {self.personal_lr}")
        if not 0 < self.beta <= 2:
            raise ValueError(f"beta must be in (0, 2], got {self.beta}")


def moreau_prox(
    model: nn.Module,
    anchor: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    lam: float,
    lr: float,
    steps: int,
    start: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """K gradient steps on f(θ; x, y) + λ/2‖θ − anchor‖² from θ = start (default: the anchor);
    parameters only, detached."""
    anchor = {n: a.detach() for n, a in anchor.items()}
    begin = anchor if start is None else start
    theta = {n: begin[n].detach().clone().requires_grad_(True) for n in anchor}
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, theta, (x,)), y)
        loss = loss + 0.5 * lam * sum(((theta[n] - anchor[n]) ** 2).sum() for n in theta)
        grads = torch.autograd.grad(loss, list(theta.values()))
        theta = {n: (t - lr * g).detach().requires_grad_(True) for (n, t), g in zip(theta.items(), grads, strict=True)}
    return {n: t.detach() for n, t in theta.items()}


def moreau_envelope_loss(lam: float, lr: float, steps: int, warm_start: bool = True) -> LossFn:
    """λ/2‖w − θ̂(w)‖² with θ̂ computed on the batch: its gradient is the envelope's λ(w − θ̂).
    With `warm_start`, each batch's inner solve starts from the previous batch's θ̂ (one loss
    function per local training: the first batch starts at θ = w)."""
    previous: dict[str, torch.Tensor] = {}

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        theta = moreau_prox(model, params, x, y, lam, lr, steps, start=previous or None)
        if warm_start:
            previous.update(theta)
        return cast(torch.Tensor, 0.5 * lam * sum(((p - theta[n]) ** 2).sum() for n, p in params.items()))

    return loss_fn


@register("pfedme")
class PFedMe(Algorithm):
    Params = PFedMeParams
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"lam": (5.0, 15.0)}

    def local_train(
        self, ctx: ClientContext, message: Broadcast, client_state: ClientState | None
    ) -> tuple[ClientUpdate, ClientState | None]:
        p = self.params
        ctx.load_model(message.weights)
        outer = ctx if p.outer_momentum else derived_context(ctx, momentum=0.0)
        loss = moreau_envelope_loss(p.lam, p.personal_lr, p.inner_steps, p.warm_start)
        metrics = local_sgd(outer, ctx.model, loss_fn=loss)
        return ClientUpdate(ctx.client_id, model_weights(ctx.model), ctx.data.size("train"), metrics), client_state

    def finish_round(self, state: ServerState, aggregator: Aggregator) -> ServerState:
        if aggregator.count == 0:
            return state
        beta, old = self.params.beta, state.weights
        mean = aggregator.mean(old)
        mixed = {k: (1 - beta) * old[k] + beta * v if v.is_floating_point() else v for k, v in mean.items()}
        return dataclasses.replace(state, weights=mixed)

    def personal_weights(self, ctx: ClientContext, message: Broadcast, client_state: ClientState | None) -> Weights:
        p = self.params
        ctx.load_model(message.weights)
        x, y = ctx.data.x["train"].to(ctx.device), ctx.data.y["train"].to(ctx.device)
        if y.shape[0] < 2:
            return dict(message.weights)
        ctx.model.train()
        theta = moreau_prox(ctx.model, dict(ctx.model.named_parameters()), x, y, p.lam, p.personal_lr, p.inner_steps)
        return {**message.weights, **{n: t.cpu() for n, t in theta.items()}}
