"""FedAvg-FT: FedAvg, then each client fine-tunes the global model on its own data (the simplest pFL)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from algorithms.base import Algorithm, ClientContext, Weights, load_weights, model_weights
from algorithms.registry import register
from sim.training import local_sgd


@dataclass(frozen=True)
class FedAvgFTParams:
    ft_epochs: int = 1

    def __post_init__(self) -> None:
        if self.ft_epochs < 1:
            raise ValueError(f"ft_epochs must be >= 1, got {self.ft_epochs}")


@register("fedavg-ft")
class FedAvgFT(Algorithm):
    Params = FedAvgFTParams

    def personal_weights(self, ctx: ClientContext, message: dict[str, Any], client_state: dict[str, Any] | None) -> Weights:
        load_weights(ctx.model, message["weights"])
        local_sgd(ctx, ctx.model, epochs=self.params.ft_epochs, purpose="finetune")
        return model_weights(ctx.model)
