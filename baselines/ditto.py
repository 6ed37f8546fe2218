"""Ditto (Li et al., ICML 2021): a FedAvg global model plus a proximally regularized personal model.

Per round, a selected client (paper, Algorithm 1)
* trains the global model w as FedAvg does and uploads it;
* trains its personal model v on  F_k(v) + λ/2 ‖v − w^t‖²  (w^t: the global model it received),
  v starting from the shared init w⁰ the first time (v_k⁰ = w⁰ in the paper).

λ = 0.1 (a value from the paper's grid {0.05, 0.1, 0.2, 0.5, 1, 2}); λ = 0 makes v plain local
training (the personal model then matches Local-only's: same start, same RNG stream). The
proximal term is FedProx's `proximal_loss`. The personal model is the one evaluated as personal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from algorithms.base import ClientContext, ClientUpdate, PersonalState, Weights, load_weights, model_weights
from algorithms.registry import register
from baselines.common import CarriesInit, InitBroadcast
from baselines.fedprox import proximal_loss
from sim.training import local_sgd


@dataclass(frozen=True)
class DittoParams:
    lam: float = 0.1
    personal_epochs: int | None = None  # None: train.local_epochs

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.personal_epochs is not None and self.personal_epochs < 1:
            raise ValueError(
                f"personal_epochs must be >= 1 (or null for train.local_epochs), got {self.personal_epochs}"
            )


@register("ditto")
class Ditto(CarriesInit[PersonalState]):
    Params = DittoParams
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"lam": (0.01, 0.1, 1.0)}
    stateful = True

    @staticmethod
    def _personal_start(message: InitBroadcast, client_state: PersonalState | None) -> Weights:
        return client_state.personal if client_state else message.init

    def local_train(
        self, ctx: ClientContext, message: InitBroadcast, client_state: PersonalState | None
    ) -> tuple[ClientUpdate, PersonalState]:
        global_w = message.weights
        personal = ctx.scratch_model("ditto/personal")
        load_weights(personal, self._personal_start(message, client_state))
        anchor = {k: v.to(ctx.device) for k, v in global_w.items()}
        local_sgd(
            ctx,
            personal,
            loss_fn=proximal_loss(anchor, self.params.lam),
            epochs=self.params.personal_epochs,
            purpose="train",
        )
        ctx.load_model(global_w)
        metrics = local_sgd(ctx, ctx.model, purpose="ditto/global")
        update = ClientUpdate(ctx.client_id, model_weights(ctx.model), ctx.data.size("train"), metrics)
        return update, PersonalState(model_weights(personal))

    def personal_weights(
        self, ctx: ClientContext, message: InitBroadcast, client_state: PersonalState | None
    ) -> Weights:
        return self._personal_start(message, client_state)
