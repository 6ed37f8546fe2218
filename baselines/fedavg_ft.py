"""FedAvg-FT: FedAvg, then each client fine-tunes the global model on its own data (the simplest pFL).

The fine-tuning budget is the shared `train.finetune_epochs` (the same for every method that
fine-tunes, so personalized accuracies compare at equal budgets); 0 makes it FedAvg.
"""

from __future__ import annotations

from typing import Any

from algorithms.base import Algorithm, Broadcast, ClientContext, ClientState, Weights, model_weights
from algorithms.registry import register
from sim.config import TrainConfig
from sim.training import local_sgd


@register("fedavg-ft")
class FedAvgFT(Algorithm):
    adapts_at_evaluation = True

    @classmethod
    def finetune_budget(cls, params: Any, train: TrainConfig) -> str:
        return f"{train.finetune_epochs} epochs (whole model)"

    def personal_weights(self, ctx: ClientContext, message: Broadcast, client_state: ClientState | None) -> Weights:
        ctx.load_model(message.weights)
        local_sgd(ctx, ctx.model, epochs=ctx.train_cfg.finetune_epochs, purpose="finetune")
        return model_weights(ctx.model)
