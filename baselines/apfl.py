"""APFL (Deng, Kamani & Mahdavi, 2020): adaptive personalized FL by mixing a local and the global model.

Each client keeps a local model v and trains, on the same minibatches (paper, Algorithm 1):

    w ← w − η ∇f(w)                           (the global model's local copy: plain FedAvg)
    v ← v − η ∇_v f(v̄),  v̄ = α v + (1 − α) w   (so ∇_v = α ∇f(v̄))
    α ← α − η ⟨v − w, ∇f(v̄)⟩                   (only when `adaptive`; clipped to [0, 1])

and the personalized model is v̄ = α v + (1 − α) w with the latest global w. One `local_sgd`
call drives both: the loss is f(w) + f(v̄) with w detached inside v̄, so w gets exactly its own
gradient (w's trajectory is FedAvg's) and v exactly α∇f(v̄). α = 0 makes the personal model the
global one, α = 1 makes v plain local training (Local-only's model). Mixing covers every float
entry of the state, BN running statistics included (v's statistics are updated by the v̄ passes).

Defaults: α = 0.25 fixed, one of the paper's reported settings (it also reports adaptive α,
available with `adaptive=true`, learned with the local learning rate). v starts at the shared init.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from algorithms.base import ClientContext, ClientState, ClientUpdate, Weights, load_weights, model_weights
from algorithms.registry import register
from baselines.common import CarriesInit, InitBroadcast
from sim.metrics import declare_metric
from sim.training import LossFn, local_sgd

declare_metric("alpha", description="APFL: the client's mixing weight of its local model")


@dataclass(frozen=True)
class APFLParams:
    alpha: float = 0.25
    adaptive: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


@dataclass(frozen=True)
class APFLClientState(ClientState):
    """The client's local model v and its mixing weight α."""

    local: Weights
    alpha: float


def mix_weights(alpha: float, local: Weights, glob: Weights) -> Weights:
    """α·local + (1−α)·global over float entries (integer buffers from `local`)."""
    return {k: alpha * v + (1.0 - alpha) * glob[k] if v.is_floating_point() else v.clone() for k, v in local.items()}


def apfl_loss(local: nn.Module, alpha: torch.Tensor | float) -> LossFn:
    """f(w) + f(α v + (1−α) w.detach()) on the same batch; `model` is w, `local` is v."""
    local.train()

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = dict(model.named_parameters())
        mixed = {n: alpha * v + (1 - alpha) * w[n].detach() for n, v in local.named_parameters()}
        return F.cross_entropy(model(x), y) + F.cross_entropy(functional_call(local, mixed, (x,)), y)

    return loss_fn


@register("apfl")
class APFL(CarriesInit[APFLClientState]):
    Params = APFLParams
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"alpha": (0.25, 0.5, 0.75)}
    stateful = True

    def _local_state(self, message: InitBroadcast, client_state: APFLClientState | None) -> tuple[Weights, float]:
        if client_state:
            return client_state.local, float(client_state.alpha)
        return message.init, self.params.alpha

    def local_train(
        self, ctx: ClientContext, message: InitBroadcast, client_state: APFLClientState | None
    ) -> tuple[ClientUpdate, APFLClientState]:
        v_weights, alpha_value = self._local_state(message, client_state)
        local = ctx.scratch_model("apfl/local")
        load_weights(local, v_weights)
        ctx.load_model(message.weights)
        trainable: list[torch.Tensor] = [*ctx.model.parameters(), *local.parameters()]
        alpha: torch.Tensor | float = alpha_value
        after_step = None
        if self.params.adaptive:
            alpha = torch.tensor(alpha_value, device=ctx.device, requires_grad=True)
            trainable.append(alpha)

            def after_step() -> None:
                with torch.no_grad():
                    alpha.clamp_(0.0, 1.0)

        metrics = local_sgd(ctx, ctx.model, loss_fn=apfl_loss(local, alpha), params=trainable, after_step=after_step)
        new_alpha = float(alpha.detach()) if isinstance(alpha, torch.Tensor) else float(alpha)
        update = ClientUpdate(
            ctx.client_id, model_weights(ctx.model), ctx.data.size("train"), {**metrics, "alpha": new_alpha}
        )
        return update, APFLClientState(model_weights(local), new_alpha)

    def personal_weights(
        self, ctx: ClientContext, message: InitBroadcast, client_state: APFLClientState | None
    ) -> Weights:
        v_weights, alpha = self._local_state(message, client_state)
        return mix_weights(alpha, v_weights, message.weights)
