"""Per-FedAvg (Fallah, Mokhtari & Ozdaglar, NeurIPS 2020): first-order (FO, default) or Hessian-free (HF).

The federated objective is the MAML one, F(w) = (1/n) Σ_i f_i(w − α ∇f_i(w)): a model that does well
on each client *after one local gradient step of size α*. Local update (paper, Algorithm 1):

    w̃ = w − α ∇f_i(w; D)                                   (inner step on batch D)
    FO:  w ← w − β ∇f_i(w̃; D')                              (the Hessian term dropped)
    HF:  w ← w − β (I − α ∇²f_i(w; D'')) ∇f_i(w̃; D')        (the Hessian-vector product on batch D'')

Each `local_sgd` batch is split into two parts D, D' (three, D, D', D'', for HF); a batch too small
to give every part ≥ 2 samples (BatchNorm) is used whole for every part. The HF product is computed
exactly by double back-propagation: the paper's HF estimates this same product by finite
differences, of which the exact one is the δ → 0 limit (no δ to tune, one extra backward pass).

The outer step is plain SGD with β (paper: no momentum; β = `beta`, default the shared train.lr),
so train.momentum does not apply to it; `outer_momentum=true` puts the shared momentum back.
Personalization at evaluation is the objective's own adaptation: one gradient step of size α from
the global model on one training minibatch (paper, Section 3: the personalized model is
w − α∇f_i(w)). That step is what the objective trains for, so it is the default even though
other methods fine-tune for `train.finetune_epochs`; `finetune=true` instead fine-tunes for that
shared budget with the shared optimizer (FedAvg-FT's fine-tuning), for a comparison at equal budgets (the tuner searches both).
α = 0.01 (our choice; the paper tunes step sizes per dataset). Server: FedAvg.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from algorithms.base import (
    Algorithm,
    Broadcast,
    ClientContext,
    ClientState,
    ClientUpdate,
    Weights,
    model_weights,
)
from algorithms.registry import register
from baselines.common import derived_context
from sim.config import TrainConfig
from sim.training import LossFn, local_sgd


@dataclass(frozen=True)
class PerFedAvgParams:
    alpha: float = 0.01  # inner step and personalization step
    beta: float | None = None  # outer (meta) step; None: train.lr
    variant: Literal["fo", "hf"] = "fo"
    outer_momentum: bool = False  # True: the outer step uses train.momentum (not the paper's update)
    finetune: bool = False  # True: personalize for train.finetune_epochs instead of one α step

    def __post_init__(self) -> None:
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.beta is not None and not self.beta > 0:
            raise ValueError(f"beta must be > 0 (or null for train.lr), got {self.beta}")
        if self.variant not in ("fo", "hf"):
            raise ValueError(f"variant must be 'fo' or 'hf', got {self.variant!r}")


def _split(x: torch.Tensor, y: torch.Tensor, parts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    size = x.shape[0] // parts
    if size < 2:
        return [(x, y)] * parts
    cuts = [i * size for i in range(parts)] + [x.shape[0]]
    return [(x[a:b], y[a:b]) for a, b in itertools.pairwise(cuts)]


def first_order_maml_loss(alpha: float) -> LossFn:
    """f(w − α∇f(w; D).detach(); D'): its gradient w.r.t. w is the FO-MAML outer gradient ∇f(w̃; D')."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        (x1, y1), (x2, y2) = _split(x, y, 2)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        grads = torch.autograd.grad(F.cross_entropy(model(x1), y1), list(params.values()))
        adapted = {n: p - alpha * g for (n, p), g in zip(params.items(), grads, strict=True)}
        return F.cross_entropy(functional_call(model, adapted, (x2,)), y2)

    return loss_fn


def hessian_free_maml_loss(alpha: float) -> LossFn:
    """A surrogate whose value is f(w̃; D') and whose gradient is (I − α∇²f(w; D'')) ∇f(w̃; D')."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        (x1, y1), (x2, y2), (x3, y3) = _split(x, y, 3)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        inner = torch.autograd.grad(F.cross_entropy(model(x1), y1), list(params.values()))
        adapted = {
            n: (p - alpha * g).detach().requires_grad_(True) for (n, p), g in zip(params.items(), inner, strict=True)
        }
        outer_loss = F.cross_entropy(functional_call(model, adapted, (x2,)), y2)
        outer = [g.detach() for g in torch.autograd.grad(outer_loss, list(adapted.values()))]
        hessian_side = torch.autograd.grad(F.cross_entropy(model(x3), y3), list(params.values()), create_graph=True)
        linear = cast(torch.Tensor, sum((g * p).sum() for g, p in zip(outer, params.values(), strict=True)))
        hvp = cast(torch.Tensor, sum((g * h).sum() for g, h in zip(outer, hessian_side, strict=True)))
        # ∇(g·w) = g and ∇(g·∇f(w)) = ∇²f(w) g; the detached copies keep the value at f(w̃; D').
        return outer_loss.detach() + (linear - linear.detach()) - alpha * (hvp - hvp.detach())

    return loss_fn


@register("per-fedavg")
class PerFedAvg(Algorithm):
    adapts_at_evaluation = True
    Params = PerFedAvgParams
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"alpha": (0.01, 0.03), "finetune": (False, True)}

    @classmethod
    def finetune_budget(cls, params: PerFedAvgParams, train: TrainConfig) -> str:
        if params.finetune:
            return f"{train.finetune_epochs} epochs (whole model)"
        return f"1 step at α={params.alpha:g} (the MAML objective's adaptation)"

    def local_train(
        self, ctx: ClientContext, message: Broadcast, client_state: ClientState | None
    ) -> tuple[ClientUpdate, ClientState | None]:
        ctx.load_model(message.weights)
        outer = ctx if self.params.outer_momentum else derived_context(ctx, momentum=0.0)
        loss = (hessian_free_maml_loss if self.params.variant == "hf" else first_order_maml_loss)(self.params.alpha)
        metrics = local_sgd(outer, ctx.model, loss_fn=loss, lr=self.params.beta)
        return ClientUpdate(ctx.client_id, model_weights(ctx.model), ctx.data.size("train"), metrics), client_state

    def personal_weights(self, ctx: ClientContext, message: Broadcast, client_state: ClientState | None) -> Weights:
        ctx.load_model(message.weights)
        if self.params.finetune:  # exactly FedAvg-FT's fine-tuning, from Per-FedAvg's model
            local_sgd(ctx, ctx.model, epochs=ctx.train_cfg.finetune_epochs, purpose="finetune")
        else:
            plain = derived_context(ctx, momentum=0.0)
            local_sgd(plain, ctx.model, epochs=1, lr=self.params.alpha, max_steps=1, purpose="personalize")
        return model_weights(ctx.model)
