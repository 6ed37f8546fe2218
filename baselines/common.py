"""Small pieces the personalized baselines share (nothing here is a training loop).

* `PartialSharing`: the "some layers stay home" family (FedPer, LG-FedAvg, FedRep, FedBN).
* `CarriesInit`: methods whose clients start a personal model from the shared initialization
  (Ditto, APFL, the partial-sharing family); the init is derivable from the run seed, so it
  travels for free (`message_nbytes` counts only `weights`). `InitState` and `InitBroadcast`
  are the server state and message that carry it.
* `derived_context`: the same client with other data or other optimizer settings, so a method
  can run the shared `local_sgd` on e.g. a random data subset with plain SGD (FedALA's weights).
* `trainable_only`: freeze everything but some parameters for a `local_sgd` call (FedRep, FedBABU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from algorithms.base import (
    Algorithm,
    Broadcast,
    ClientContext,
    ClientData,
    ClientStateT,
    PersonalState,
    ServerState,
    Weights,
    clone_weights,
)


@dataclass(frozen=True)
class InitState(ServerState):
    """The server state plus the shared initial weights."""

    init: Weights


@dataclass(frozen=True)
class InitBroadcast(Broadcast):
    """The round's message plus the shared initial weights (derivable from the run seed: free)."""

    init: Weights


class CarriesInit(Algorithm[InitState, InitBroadcast, ClientStateT]):
    """Keeps the initial weights in the server state and ships them (free) in every broadcast."""

    def init_server_state(self, weights: Weights) -> InitState:
        return InitState(weights, clone_weights(weights))

    def broadcast(self, state: InitState) -> InitBroadcast:
        return InitBroadcast(self.shared_part(state.weights), state.init)


class PartialSharing(CarriesInit[PersonalState]):
    """Layers matching `personal_patterns` never leave the client; the rest is FedAvg.

    There is no complete server model (the server never holds the personal layers), so no
    global accuracy is reported; a client that has not trained yet uses the shared init for
    its personal layers.
    """

    stateful = True
    has_global_model = False

    def start_weights(self, ctx: ClientContext, message: InitBroadcast, client_state: PersonalState | None) -> Weights:
        weights = dict(message.weights)
        weights.update(client_state.personal if client_state is not None else self.personal_part(message.init))
        return weights

    def personal_weights(
        self, ctx: ClientContext, message: InitBroadcast, client_state: PersonalState | None
    ) -> Weights:
        return self.start_weights(ctx, message, client_state)


def derived_context(ctx: ClientContext, *, data: ClientData | None = None, **train_changes: Any) -> ClientContext:
    """The same client (id, round, RNG streams, resident models) with other data or train settings."""
    run = ctx.run
    if train_changes:
        run = dataclasses.replace(run, train=dataclasses.replace(run.train, **train_changes))
    return ClientContext(
        ctx.client_id,
        ctx.round,
        run,
        data if data is not None else ctx.data,
        ctx.model,
        ctx.scratch_model,
        ctx.device,
        ctx.public,
    )


@contextmanager
def trainable_only(model: nn.Module, keep: Callable[[str], bool]) -> Iterator[list[nn.Parameter]]:
    """Within the block only parameters whose name satisfies `keep` require grad (yielded in order)."""
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        kept = []
        for name, p in model.named_parameters():
            p.requires_grad_(keep(name))
            if keep(name):
                kept.append(p)
        yield kept
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])


def parameter_names(model: nn.Module) -> list[str]:
    """State-dict keys that are parameters (not buffers), in registration order."""
    return [name for name, _ in model.named_parameters()]


def batchnorm_modules(model: nn.Module) -> list[str]:
    """Qualified names of every BatchNorm module (FedBN keeps exactly these local)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def to_device(weights: Weights, device: torch.device) -> Weights:
    return {k: v.to(device) for k, v in weights.items()}
