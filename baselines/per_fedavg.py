"""Per-FedAvg (Fallah, Mokhtari & Ozdaglar, NeurIPS 2020), first-order (FO) variant.

The federated objective is the MAML one, F(w) = (1/n) Σ_i f_i(w − α ∇f_i(w)): a model that does well
on each client *after one local gradient step of size α*. Local update (paper, Algorithm 1, FO):

    w̃ = w − α ∇f_i(w; D)        (inner step on batch D)
    w ← w − β ∇f_i(w̃; D')       (outer step: the gradient at w̃ applied to w; FO drops the Hessian term)

Each `local_sgd` batch is split in two halves, D then D' (the whole batch for both when it has fewer
than 4 samples, so BatchNorm still sees ≥ 2). The outer step is the shared optimizer's step
(β = `beta`, default the shared train.lr; its momentum applies). Personalization, at evaluation, is
the objective's own adaptation: one gradient step of size α from the global model on one training
minibatch of the client (paper, Section 3: the personalized model is w − α∇f_i(w)).
Naming: the paper calls the inner/personalization step α and the outer one β, and so do we.
α = 0.01 (our choice; the paper tunes step sizes per dataset). Server: FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from algorithms.base import Algorithm, ClientContext, ClientUpdate, Weights, load_weights, model_weights
from algorithms.registry import register
from sim.training import LossFn, local_sgd


@dataclass(frozen=True)
class PerFedAvgParams:
    alpha: float = 0.01  # inner step and personalization step
    beta: float | None = None  # outer (meta) step; None: train.lr

    def __post_init__(self) -> None:
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.beta is not None and not self.beta > 0:
            raise ValueError(f"beta must be > 0 (or null for train.lr), got {self.beta}")


def first_order_maml_loss(alpha: float) -> LossFn:
    """f(w − α∇f(w; D).detach(); D'): its gradient w.r.t. w is the FO-MAML outer gradient ∇f(w̃; D')."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        half = x.shape[0] // 2
        (x1, y1), (x2, y2) = ((x[:half], y[:half]), (x[half:], y[half:])) if half >= 2 else ((x, y), (x, y))
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        grads = torch.autograd.grad(F.cross_entropy(model(x1), y1), list(params.values()))
        adapted = {n: p - alpha * g for (n, p), g in zip(params.items(), grads)}
        return F.cross_entropy(functional_call(model, adapted, (x2,)), y2)

    return loss_fn


@register("per-fedavg")
class PerFedAvg(Algorithm):
    Params = PerFedAvgParams

    def local_train(
        self, ctx: ClientContext, message: dict[str, Any], client_state: dict[str, Any] | None
    ) -> tuple[ClientUpdate, dict[str, Any] | None]:
        load_weights(ctx.model, message["weights"])
        metrics = local_sgd(ctx, ctx.model, loss_fn=first_order_maml_loss(self.params.alpha), lr=self.params.beta)
        return ClientUpdate(ctx.client_id, model_weights(ctx.model), ctx.data.size("train"), metrics), client_state

    def personal_weights(self, ctx: ClientContext, message: dict[str, Any], client_state: dict[str, Any] | None) -> Weights:
        load_weights(ctx.model, message["weights"])
        # One step: the first step of (momentum) SGD is exactly w − α∇f(w; batch).
        local_sgd(ctx, ctx.model, epochs=1, lr=self.params.alpha, max_steps=1, purpose="personalize")
        return model_weights(ctx.model)
