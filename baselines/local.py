"""Local-only: every client trains its own model and never communicates (the pFL floor)."""

from __future__ import annotations

from algorithms.base import (
    Algorithm,
    ClientContext,
    ClientUpdate,
    PersonalState,
    ServerState,
    Weights,
    model_weights,
)
from algorithms.registry import register
from baselines.common import InitBroadcast
from sim.training import local_sgd


@register("local")
class LocalOnly(Algorithm[ServerState, InitBroadcast, PersonalState]):
    """All parameters are personal; the initial weights come from the (unchanging) server init."""

    personal_patterns = ("*",)
    has_global_model = False
    stateful = True

    def broadcast(self, state: ServerState) -> InitBroadcast:
        # Nothing travels after the shared initialization, which clients take only once.
        return InitBroadcast({}, state.weights)

    def start_weights(self, ctx: ClientContext, message: InitBroadcast, client_state: PersonalState | None) -> Weights:
        return client_state.personal if client_state is not None else message.init

    def local_train(
        self, ctx: ClientContext, message: InitBroadcast, client_state: PersonalState | None
    ) -> tuple[ClientUpdate, PersonalState]:
        ctx.load_model(self.start_weights(ctx, message, client_state))
        metrics = local_sgd(ctx, ctx.model)
        return ClientUpdate(ctx.client_id, {}, 0.0, metrics), PersonalState(model_weights(ctx.model))
