"""FedProx (Li et al., 2020): FedAvg plus a proximal term μ/2·‖w − w_global‖² in the local loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from algorithms.base import Algorithm, Broadcast, ClientContext, ClientState, ClientUpdate, model_weights
from algorithms.registry import register
from sim.training import cross_entropy, local_sgd


@dataclass(frozen=True)
class FedProxParams:
    mu: float = 0.01

    def __post_init__(self) -> None:
        if self.mu < 0:
            raise ValueError(f"mu must be >= 0, got {self.mu}")


def proximal_loss(anchor: dict[str, torch.Tensor], mu: float):
    """CE plus μ/2·‖w − anchor‖² over trainable parameters; with μ=0 it is exactly CE."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = cross_entropy(model, x, y)
        if mu == 0:
            return loss
        prox = sum(((p - anchor[name]) ** 2).sum() for name, p in model.named_parameters() if p.requires_grad)
        return loss + 0.5 * mu * prox

    return loss_fn


@register("fedprox")
class FedProx(Algorithm):
    Params = FedProxParams
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"mu": (0.001, 0.01, 0.1)}

    def local_train(
        self, ctx: ClientContext, message: Broadcast, client_state: ClientState | None
    ) -> tuple[ClientUpdate, ClientState | None]:
        ctx.load_model(self.start_weights(ctx, message, client_state))
        anchor = {k: v.detach().clone() for k, v in ctx.model.named_parameters()}
        metrics = local_sgd(ctx, ctx.model, loss_fn=proximal_loss(anchor, self.params.mu))
        trained = model_weights(ctx.model)
        return ClientUpdate(ctx.client_id, self.shared_part(trained), ctx.data.size("train"), metrics), client_state
