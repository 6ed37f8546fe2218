"""MOON (Li, He & Song, CVPR 2021): model-contrastive federated learning.

Local loss (paper Eq. 3–4):  ℓ = CE(w; x, y) + μ · ℓ_con, with

    ℓ_con = −log( exp(sim(z, z_glob)/τ) / (exp(sim(z, z_glob)/τ) + exp(sim(z, z_prev)/τ)) )

where z, z_glob, z_prev are the representations of x under the model being trained, the received
global model and the client's previous local model, and sim is cosine similarity. Here the
representation is `model.features(x)` (our models have no separate projection head).

Defaults: τ = 0.5 (paper); μ = 1, the paper's value for CIFAR-100 / Tiny-ImageNet (it uses 5 for
CIFAR-10). We pick 1 because our representation is the classifier input itself (no projection
head to absorb the contrastive pull) and our runs are short; μ = 5 is one override away.
The previous local model is client state; a client training for the first time uses the global
model as "previous" (then ℓ_con ≡ log 2 and contributes no gradient). Server: FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.base import Algorithm, ClientContext, ClientUpdate, load_weights, model_weights
from algorithms.registry import register
from sim.training import LossFn, cross_entropy, local_sgd


@dataclass(frozen=True)
class MoonParams:
    mu: float = 1.0
    tau: float = 0.5

    def __post_init__(self) -> None:
        if self.mu < 0:
            raise ValueError(f"mu must be >= 0, got {self.mu}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")


def moon_contrastive(z: torch.Tensor, z_glob: torch.Tensor, z_prev: torch.Tensor, tau: float) -> torch.Tensor:
    """The batch mean of ℓ_con (Eq. 3): a 2-way softmax cross-entropy with the global rep as positive."""
    pos = F.cosine_similarity(z, z_glob, dim=1) / tau
    neg = F.cosine_similarity(z, z_prev, dim=1) / tau
    logits = torch.stack([pos, neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(z.shape[0], dtype=torch.long, device=z.device))


def moon_loss(global_model: nn.Module, previous_model: nn.Module, mu: float, tau: float) -> LossFn:
    """CE + μ·ℓ_con; with μ = 0 it is exactly CE (no extra forward passes)."""
    if mu == 0:
        return cross_entropy

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = model.features(x)
        with torch.no_grad():
            z_glob = global_model.features(x)
            z_prev = previous_model.features(x)
        return F.cross_entropy(model.head(z), y) + mu * moon_contrastive(z, z_glob, z_prev, tau)

    return loss_fn


@register("moon")
class Moon(Algorithm):
    Params = MoonParams
    stateful = True

    def local_train(
        self, ctx: ClientContext, message: dict[str, Any], client_state: dict[str, Any] | None
    ) -> tuple[ClientUpdate, dict[str, Any] | None]:
        glob, prev = ctx.scratch_model("moon/global"), ctx.scratch_model("moon/previous")
        load_weights(glob, message["weights"])
        load_weights(prev, client_state["previous"] if client_state else message["weights"])
        # Frozen references in train mode: their BN normalizes with the batch statistics, as the
        # trained model's does, so z_glob = z exactly at the first step (scratch buffers are reloaded).
        glob.train()
        prev.train()
        load_weights(ctx.model, message["weights"])
        metrics = local_sgd(ctx, ctx.model, loss_fn=moon_loss(glob, prev, self.params.mu, self.params.tau))
        trained = model_weights(ctx.model)
        return ClientUpdate(ctx.client_id, trained, ctx.data.size("train"), metrics), {"previous": trained}
