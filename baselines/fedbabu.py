"""FedBABU (Oh et al., ICLR 2022): train and share only the body; the head stays at its random init.

During federated training the classifier head is frozen at the shared random initialization
(so it never travels: it is derivable from the run seed) and only the body is updated and
averaged. Personalization happens at evaluation: each client fine-tunes the whole received
model (body and head) on its own data, as in the paper's evaluation protocol, for the shared
`train.finetune_epochs` (the paper's main tables use 5; one knob for every fine-tuning method
keeps the comparison with FedAvg-FT at equal budgets). The global model (for global accuracy) is
the averaged body on top of the initial head.
"""

from __future__ import annotations

import fnmatch
from typing import Any, ClassVar

from algorithms.base import (
    Algorithm,
    Broadcast,
    ClientContext,
    ClientState,
    ClientUpdate,
    ServerState,
    Weights,
    model_weights,
    weights_nbytes,
)
from algorithms.registry import register
from baselines.common import trainable_only
from sim.config import TrainConfig
from sim.training import local_sgd


@register("fedbabu")
class FedBABU(Algorithm):
    adapts_at_evaluation = True
    #: Frozen during federated training; not personal (every client has the same init head).
    frozen_patterns: ClassVar[tuple[str, ...]] = ("head.*",)

    @classmethod
    def finetune_budget(cls, params: Any, train: TrainConfig) -> str:
        return f"{train.finetune_epochs} epochs (whole model)"

    def is_frozen(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in self.frozen_patterns)

    def trained_part(self, weights: dict) -> Weights:
        return {k: v for k, v in weights.items() if not self.is_frozen(k)}

    def broadcast(self, state: ServerState) -> Broadcast:
        # The full model, so global evaluation sees body + init head; the head costs nothing (seed).
        return Broadcast(state.weights)

    def message_nbytes(self, message: Broadcast) -> int:
        return weights_nbytes(self.trained_part(message.weights))

    def local_train(
        self, ctx: ClientContext, message: Broadcast, client_state: ClientState | None
    ) -> tuple[ClientUpdate, ClientState | None]:
        ctx.load_model(message.weights)
        with trainable_only(ctx.model, lambda name: not self.is_frozen(name)):
            metrics = local_sgd(ctx, ctx.model)
        body = self.trained_part(model_weights(ctx.model))
        return ClientUpdate(ctx.client_id, body, ctx.data.size("train"), metrics), client_state

    def personal_weights(self, ctx: ClientContext, message: Broadcast, client_state: ClientState | None) -> Weights:
        ctx.load_model(message.weights)
        local_sgd(ctx, ctx.model, epochs=ctx.train_cfg.finetune_epochs, purpose="finetune")
        return model_weights(ctx.model)
