"""Local-only: every client trains its own model and never communicates (the pFL floor)."""

from __future__ import annotations

from typing import Any

from algorithms.base import Algorithm, ClientContext, ClientUpdate, Weights, load_weights, model_weights
from algorithms.registry import register
from sim.training import local_sgd


@register("local")
class LocalOnly(Algorithm):
    """All parameters are personal; the initial weights come from the (unchanging) server init."""

    personal_patterns = ("*",)
    has_global_model = False
    stateful = True

    def broadcast(self, state: dict[str, Any]) -> dict[str, Any]:
        # Nothing travels after the shared initialization, which clients take only once.
        return {"weights": {}, "init": state["weights"]}

    def start_weights(
        self, ctx: ClientContext, message: dict[str, Any], client_state: dict[str, Any] | None
    ) -> Weights:
        if client_state and "personal" in client_state:
            return client_state["personal"]
        return message["init"]

    def local_train(
        self, ctx: ClientContext, message: dict[str, Any], client_state: dict[str, Any] | None
    ) -> tuple[ClientUpdate, dict[str, Any] | None]:
        load_weights(ctx.model, self.start_weights(ctx, message, client_state))
        metrics = local_sgd(ctx, ctx.model)
        return ClientUpdate(ctx.client_id, {}, 0.0, metrics), {"personal": model_weights(ctx.model)}
