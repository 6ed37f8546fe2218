"""FedRoD (Chen & Chao, ICLR 2022): a generic head trained with a balanced loss, a personal head on top.

The body and the model's `head` (the *generic* head, G-head) are shared and trained with the
balanced-softmax loss (Ren et al., 2020; the paper's class-balanced "BR" choice):

    ℓ_BSM(η, y) = −log( n_y e^{η_y} / Σ_c n_c e^{η_c} ) = CE(η + log n, y),  n_c = client class counts,

which makes every client optimize an estimate of the *class-balanced* risk, a consistent target
across label-skewed clients. The personal head (P-head, a Linear kept in client state as tensors)
minimizes the client's empirical risk on top of the generic predictor: the
personal logits are  η_G + W_P z + b_P  with z and η_G detached, trained with plain CE. Body and
G-head get gradients only from ℓ_BSM, the P-head only from its CE (paper, Algorithm 1).

Because both heads are linear, the personalized predictor is itself a `Classifier` with head
(W_G + W_P, b_G + b_P), which is what `personal_weights` returns. The global model is body + G-head.
Only body and G-head travel. Classes a client does not hold get log n = −∞ (excluded from its
softmax, as the formula says).

P-head initialization (`p_head_init`): "copy" (default, as the reference implementation does: the
P-head starts as a copy of the generic head, here the one the client receives the first time it
takes part) or "zero" (the personalized model starts as exactly the generic one). Both start
with the generic head's predictions (logits 2η_G or η_G, the same argmax); the copy gives the
P-head the generic head's class directions to refine instead of learning them from nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from algorithms.base import (
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
from sim.models import Classifier
from sim.training import LossFn, local_sgd


@dataclass(frozen=True)
class FedRoDParams:
    generic_loss: Literal["bsm", "ce"] = "bsm"  # "ce": the paper's ablation without the balanced loss
    p_head_init: Literal["copy", "zero"] = "copy"

    def __post_init__(self) -> None:
        if self.generic_loss not in ("bsm", "ce"):
            raise ValueError(f"generic_loss must be 'bsm' or 'ce', got {self.generic_loss!r}")
        if self.p_head_init not in ("copy", "zero"):
            raise ValueError(f"p_head_init must be 'copy' or 'zero', got {self.p_head_init!r}")


@dataclass(frozen=True)
class FedRoDClientState(ClientState):
    """The client's personal head (P-head), a Linear's weight and bias."""

    p_weight: torch.Tensor
    p_bias: torch.Tensor


def balanced_softmax_loss(logits: torch.Tensor, y: torch.Tensor, class_counts: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of −log(n_y e^{η_y} / Σ_c n_c e^{η_c})."""
    log_prior = torch.where(
        class_counts > 0,
        class_counts.to(logits.dtype).log(),
        torch.full_like(class_counts, float("-inf"), dtype=logits.dtype),
    )
    return F.cross_entropy(logits + log_prior, y)


def fedrod_loss(p_weight: torch.Tensor, p_bias: torch.Tensor, class_counts: torch.Tensor | None) -> LossFn:
    """ℓ_BSM on the G-head (or CE when `class_counts` is None) + CE of the personal logits."""

    def loss_fn(model: Classifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = model.features(x)
        generic = model.head(z)
        g_loss = (
            F.cross_entropy(generic, y) if class_counts is None else balanced_softmax_loss(generic, y, class_counts)
        )
        personal = generic.detach() + F.linear(z.detach(), p_weight, p_bias)
        return g_loss + F.cross_entropy(personal, y)

    return loss_fn


@register("fedrod")
class FedRoD(Algorithm[ServerState, Broadcast, FedRoDClientState]):
    Params = FedRoDParams
    stateful = True

    def _personal_head(
        self, message: Broadcast, client_state: FedRoDClientState | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if client_state:
            return client_state.p_weight.clone(), client_state.p_bias.clone()
        weight, bias = message.weights["head.weight"], message.weights["head.bias"]
        if self.params.p_head_init == "copy":
            return weight.detach().clone(), bias.detach().clone()
        return torch.zeros_like(weight), torch.zeros_like(bias)

    def local_train(
        self, ctx: ClientContext, message: Broadcast, client_state: FedRoDClientState | None
    ) -> tuple[ClientUpdate, FedRoDClientState]:
        ctx.load_model(message.weights)
        p_weight, p_bias = (t.to(ctx.device).requires_grad_(True) for t in self._personal_head(message, client_state))
        counts = None
        if self.params.generic_loss == "bsm":
            num_classes = ctx.model.head.out_features
            counts = torch.bincount(ctx.data.y["train"], minlength=num_classes).to(ctx.device)
        metrics = local_sgd(
            ctx,
            ctx.model,
            loss_fn=fedrod_loss(p_weight, p_bias, counts),
            params=[*ctx.model.parameters(), p_weight, p_bias],
        )
        update = ClientUpdate(ctx.client_id, model_weights(ctx.model), ctx.data.size("train"), metrics)
        return update, FedRoDClientState(p_weight.detach().cpu(), p_bias.detach().cpu())

    def personal_weights(
        self, ctx: ClientContext, message: Broadcast, client_state: FedRoDClientState | None
    ) -> Weights:
        p_weight, p_bias = self._personal_head(message, client_state)
        weights = dict(message.weights)
        weights["head.weight"] = weights["head.weight"] + p_weight
        weights["head.bias"] = weights["head.bias"] + p_bias
        return weights
