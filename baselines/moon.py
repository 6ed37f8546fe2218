"""MOON (Li, He & Song, CVPR 2021): model-contrastive federated learning.

Local loss (paper Eq. 3–4):  ℓ = CE(w; x, y) + μ · ℓ_con, with

    ℓ_con = −log( exp(sim(z, z_glob)/τ) / (exp(sim(z, z_glob)/τ) + exp(sim(z, z_prev)/τ)) )

where z, z_glob, z_prev are the representations of x under the model being trained, the received
global model and the client's previous local model, and sim is cosine similarity.

Projection head (paper, Section 3.2: a 2-layer MLP with 256 outputs after the base encoder): with
`projection_dim` > 0 (default 256) the representation is g(features(x)), g = Linear(d, d) → ReLU →
Linear(d, projection_dim), federated with the model (trained locally, averaged by the server,
sent down and up). The classifier stays on features(x) so that every method shares one
architecture (in the paper's network the output layer sits on top of the projection); g is used
only by ℓ_con. `projection_dim=0` contrasts features(x) itself (no projection head).

Defaults: τ = 0.5 (paper); μ = 1, the paper's value for CIFAR-100 / Tiny-ImageNet (it uses 5 for
CIFAR-10); our runs are short, and μ is in the tuner's search space.
The previous local model is client state; a client training for the first time uses the global
model as "previous" (then ℓ_con ≡ log 2 and contributes no gradient). Server: FedAvg.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.base import (
    Aggregator,
    Algorithm,
    Broadcast,
    ClientContext,
    ClientState,
    ClientUpdate,
    ServerState,
    Weights,
    load_weights,
    model_weights,
    rng_seed,
    weights_nbytes,
)
from algorithms.registry import register
from sim.models import Classifier
from sim.training import LossFn, cross_entropy, local_sgd


@dataclass(frozen=True)
class MoonParams:
    mu: float = 1.0
    tau: float = 0.5
    projection_dim: int = 256  # 0: no projection head

    def __post_init__(self) -> None:
        if self.mu < 0:
            raise ValueError(f"mu must be >= 0, got {self.mu}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.projection_dim < 0:
            raise ValueError(f"projection_dim must be >= 0, got {self.projection_dim}")


def moon_contrastive(z: torch.Tensor, z_glob: torch.Tensor, z_prev: torch.Tensor, tau: float) -> torch.Tensor:
    """The batch mean of ℓ_con (Eq. 3): a 2-way softmax cross-entropy with the global rep as positive."""
    pos = F.cosine_similarity(z, z_glob, dim=1) / tau
    neg = F.cosine_similarity(z, z_prev, dim=1) / tau
    logits = torch.stack([pos, neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(z.shape[0], dtype=torch.long, device=z.device))


PROJ = "proj/"


@dataclass(frozen=True)
class MoonState(ServerState):
    projection: Weights | None = None  # the federated projection head (None with projection_dim=0)


@dataclass(frozen=True)
class MoonBroadcast(Broadcast):
    projection: Weights | None = None


@dataclass(frozen=True)
class MoonClientState(ClientState):
    """The client's previous local model (and its projection head), the contrastive negative."""

    previous: Weights
    projection: Weights | None = None


def projection_head(feature_dim: int, out_dim: int) -> nn.Module:
    """The paper's 2-layer MLP projection head."""
    return nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(), nn.Linear(feature_dim, out_dim))


Project = Callable[[torch.Tensor], torch.Tensor]


def _identity(z: torch.Tensor) -> torch.Tensor:
    return z


def moon_loss(
    global_model: Classifier,
    previous_model: Classifier,
    mu: float,
    tau: float,
    project: Project = _identity,
    project_glob: Project = _identity,
    project_prev: Project = _identity,
) -> LossFn:
    """CE + μ·ℓ_con on the projected representations; with μ = 0 it is exactly CE (no extra passes)."""
    if mu == 0:
        return cross_entropy

    def loss_fn(model: Classifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = model.features(x)
        with torch.no_grad():
            z_glob = project_glob(global_model.features(x))
            z_prev = project_prev(previous_model.features(x))
        return F.cross_entropy(model.head(h), y) + mu * moon_contrastive(project(h), z_glob, z_prev, tau)

    return loss_fn


@register("moon")
class Moon(Algorithm[MoonState, MoonBroadcast, MoonClientState]):
    Params = MoonParams
    stateful = True
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"mu": (0.1, 1.0, 5.0)}

    def _projection(self) -> nn.Module:
        return projection_head(self.run.build_model().feature_dim, self.params.projection_dim)

    # ----- server: the projection head travels with the model ------------------------------
    def init_server_state(self, weights: Weights) -> MoonState:
        if not self.params.projection_dim:
            return MoonState(weights)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng_seed(self.run.seed, "moon/projection"))
            projection = {k: v.detach().clone() for k, v in self._projection().state_dict().items()}
        return MoonState(weights, projection)

    def broadcast(self, state: MoonState) -> MoonBroadcast:
        return MoonBroadcast(self.shared_part(state.weights), state.projection)

    def message_nbytes(self, message: MoonBroadcast) -> int:
        return weights_nbytes(message.weights) + weights_nbytes(message.projection)

    def finish_round(self, state: MoonState, aggregator: Aggregator) -> MoonState:
        if state.projection is None or aggregator.count == 0:
            return super().finish_round(state, aggregator)
        like = {**state.weights, **{PROJ + k: v for k, v in state.projection.items()}}
        mean = aggregator.mean(like)
        weights = {k: mean[k] for k in state.weights}
        projection = {k: mean[PROJ + k] for k in state.projection}
        return dataclasses.replace(state, weights=weights, projection=projection)

    # ----- client --------------------------------------------------------------------------
    def local_train(
        self, ctx: ClientContext, message: MoonBroadcast, client_state: MoonClientState | None
    ) -> tuple[ClientUpdate, MoonClientState]:
        glob, prev = ctx.scratch_model("moon/global"), ctx.scratch_model("moon/previous")
        load_weights(glob, message.weights)
        load_weights(prev, client_state.previous if client_state else message.weights)
        # Frozen references in train mode: their BN normalizes with the batch statistics, as the
        # trained model's does, so z_glob = z exactly at the first step (scratch buffers are reloaded).
        glob.train()
        prev.train()
        ctx.load_model(message.weights)
        params = list(ctx.model.parameters())
        heads: dict[str, nn.Module] = {}
        if message.projection is not None:
            own = client_state.projection if client_state else None
            for key, weights in (
                ("train", message.projection),
                ("glob", message.projection),
                ("prev", own or message.projection),
            ):
                heads[key] = self._projection().to(ctx.device)
                load_weights(heads[key], weights)
            for key in ("glob", "prev"):
                heads[key].requires_grad_(False)
            params += list(heads["train"].parameters())
        loss = moon_loss(
            glob, prev, self.params.mu, self.params.tau, *(heads[k] for k in ("train", "glob", "prev")) if heads else ()
        )
        metrics = local_sgd(ctx, ctx.model, loss_fn=loss, params=params)
        trained = model_weights(ctx.model)
        payload, projection = dict(trained), None
        if heads:
            projection = model_weights(heads["train"])
            payload.update({PROJ + k: v for k, v in projection.items()})
        update = ClientUpdate(ctx.client_id, payload, ctx.data.size("train"), metrics)
        return update, MoonClientState(trained, projection)
