"""FedBABU (Oh et al., ICLR 2022): train and share only the body; the head stays at its random init.

During federated training the classifier head is frozen at the shared random initialization
(so it never travels: it is derivable from the run seed) and only the body is updated and
averaged. Personalization happens at evaluation: each client fine-tunes the whole received
model (body and head) on its own data for `ft_epochs`, as in the paper's evaluation protocol.
The global model (for global accuracy) is the averaged body on top of the initial head.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, ClassVar

from algorithms.base import (
    Algorithm,
    ClientContext,
    ClientUpdate,
    Weights,
    load_weights,
    model_weights,
    weights_nbytes,
)
from algorithms.registry import register
from baselines.common import trainable_only
from sim.training import local_sgd


@dataclass(frozen=True)
class FedBABUParams:
    ft_epochs: int = 5  # fine-tuning epochs at evaluation (the paper reports several; 5 in its main tables)

    def __post_init__(self) -> None:
        if self.ft_epochs < 0:
            raise ValueError(f"ft_epochs must be >= 0, got {self.ft_epochs}")


@register("fedbabu")
class FedBABU(Algorithm):
    Params = FedBABUParams
    #: Frozen during federated training; not personal (every client has the same init head).
    frozen_patterns: ClassVar[tuple[str, ...]] = ("head.*",)

    def is_frozen(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in self.frozen_patterns)

    def trained_part(self, weights: dict) -> Weights:
        return {k: v for k, v in weights.items() if not self.is_frozen(k)}

    def broadcast(self, state: dict[str, Any]) -> dict[str, Any]:
        # The full model, so global evaluation sees body + init head; the head costs nothing (seed).
        return {"weights": state["weights"]}

    def message_nbytes(self, message: dict[str, Any]) -> int:
        return weights_nbytes(self.trained_part(message["weights"]))

    def local_train(
        self, ctx: ClientContext, message: dict[str, Any], client_state: dict[str, Any] | None
    ) -> tuple[ClientUpdate, dict[str, Any] | None]:
        load_weights(ctx.model, message["weights"])
        with trainable_only(ctx.model, lambda name: not self.is_frozen(name)):
            metrics = local_sgd(ctx, ctx.model)
        body = self.trained_part(model_weights(ctx.model))
        return ClientUpdate(ctx.client_id, body, ctx.data.size("train"), metrics), client_state

    def personal_weights(self, ctx: ClientContext, message: dict[str, Any], client_state: dict[str, Any] | None) -> Weights:
        load_weights(ctx.model, message["weights"])
        local_sgd(ctx, ctx.model, epochs=self.params.ft_epochs, purpose="finetune")
        return model_weights(ctx.model)
