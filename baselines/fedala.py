"""FedALA (Zhang et al., AAAI 2023): adaptive local aggregation of the global model into the local one.

Before local training, a client builds its starting model from the received global θ and its own
previous local model θ_i (paper, Eq. 4–6):

* lower layers:   θ̂ = θ                               (overwritten by the global model)
* top `p` layers: θ̂ = θ ⊙ W + θ_i ⊙ (1 − W)           (= θ_i + (θ − θ_i) ⊙ W, element-wise W ∈ [0,1])

W is learned by minimizing the loss of θ̂ on a random fraction `s` of the local training data,
W ← clip(W − η ∇_W L(θ̂), 0, 1), starting from W = 1; the first time a client has a local model
to aggregate, W is trained until the loss settles, afterwards one pass per round; W is client state.
"Settles" follows the reference implementation (`convergence="epoch"`, default): after each pass
the pass's last batch loss is recorded, and training stops once more than `window` are recorded
and the std of the last `window` is below `threshold` (we also stop after `max_init_epochs`
passes, so the cost is bounded). `convergence="step"` applies the same test to every step's loss
(it stops much earlier: step losses of one pass are many, and settle within a pass).
Then the client trains θ̂ as FedAvg does, uploads it, and keeps it as its local (personal) model.

Paper defaults: s = 80 %, p = 1 (our head), η = 1.0. The W-fitting reuses `local_sgd` on the
data subset with plain SGD (η, no momentum, no weight decay: the paper's update). Writing θ̂ as
θ⊙W + θ_i⊙(1−W) makes W = 1 give exactly θ, so with s = 0 or η = 0 the start is the global model.
Layers are counted over modules that own parameters, in registration order (BN layers count).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from algorithms.base import (
    Algorithm,
    Broadcast,
    ClientContext,
    ClientData,
    ClientState,
    ClientUpdate,
    RunContext,
    ServerState,
    Weights,
    model_weights,
)
from algorithms.registry import register
from baselines.common import derived_context, parameter_names
from sim.training import LossFn, local_sgd


@dataclass(frozen=True)
class FedALAParams:
    data_fraction: float = 0.8  # s
    top_layers: int = 1  # p
    eta: float = 1.0  # η, learning rate of W
    threshold: float = 0.1  # convergence of the first W fit: std of recent losses
    window: int = 10
    max_init_epochs: int = 20
    convergence: Literal["epoch", "step"] = "epoch"

    def __post_init__(self) -> None:
        if not 0.0 <= self.data_fraction <= 1.0:
            raise ValueError(f"data_fraction must be in [0, 1], got {self.data_fraction}")
        if self.top_layers < 0:
            raise ValueError(f"top_layers must be >= 0, got {self.top_layers}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")
        if self.window < 2:
            raise ValueError(f"window must be >= 2, got {self.window}")
        if self.max_init_epochs < 1:
            raise ValueError(f"max_init_epochs must be >= 1, got {self.max_init_epochs}")
        if self.convergence not in ("epoch", "step"):
            raise ValueError(f"convergence must be 'epoch' or 'step', got {self.convergence!r}")


@dataclass(frozen=True)
class FedALAClientState(ClientState):
    """The client's local model θ_i and its learned ALA weights W (None until its first ALA)."""

    local: Weights
    mask: dict[str, torch.Tensor] | None = None


def top_layer_params(names: list[str], layers: int) -> list[str]:
    """Parameter names of the last `layers` parameter-owning modules."""
    modules: list[str] = []
    for name in names:
        module = name.rsplit(".", 1)[0]
        if module not in modules:
            modules.append(module)
    chosen = set(modules[len(modules) - layers :]) if layers > 0 else set()
    return [n for n in names if n.rsplit(".", 1)[0] in chosen]


def ala_combine(glob: Weights, local: Weights, mask: dict[str, torch.Tensor]) -> Weights:
    """θ̂: the global weights, with θ⊙W + θ_i⊙(1−W) on the masked (top-layer) entries."""
    out = dict(glob)
    for name, w in mask.items():
        out[name] = glob[name] * w + local[name] * (1 - w)
    return out


def ala_loss(
    glob: dict[str, torch.Tensor], local: dict[str, torch.Tensor], mask: dict[str, torch.Tensor], record: list[float]
) -> LossFn:
    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(functional_call(model, ala_combine(glob, local, mask), (x,)), y)
        record.append(float(loss.detach()))
        return loss

    return loss_fn


@register("fedala")
class FedALA(Algorithm[ServerState, Broadcast, FedALAClientState]):
    Params = FedALAParams
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"eta": (0.1, 1.0)}
    stateful = True

    def __init__(self, params: FedALAParams, run: RunContext) -> None:
        super().__init__(params, run)
        self.adapted = top_layer_params(parameter_names(run.build_model()), params.top_layers)

    def _sample(self, ctx: ClientContext) -> ClientData:
        n = ctx.data.size("train")
        k = int(round(self.params.data_fraction * n))
        idx = torch.randperm(n, generator=ctx.generator("fedala/sample"))[:k]
        return ClientData({"train": ctx.data.x["train"][idx]}, {"train": ctx.data.y["train"][idx]})

    def adapt(
        self, ctx: ClientContext, glob: Weights, local: Weights, mask: dict[str, torch.Tensor] | None
    ) -> tuple[Weights, dict[str, torch.Tensor]]:
        """ALA: learn W on the data sample, return (θ̂, W)."""
        first = mask is None
        mask = (
            {n: torch.ones_like(glob[n]) for n in self.adapted}
            if mask is None
            else {n: w.clone() for n, w in mask.items()}
        )
        sample = self._sample(ctx)
        if sample.size("train") == 0 or self.params.eta == 0 or not mask:
            return ala_combine(glob, local, mask), mask
        device = ctx.device
        g = {n: glob[n].to(device) for n in parameter_names(ctx.model)}
        loc = {n: local[n].to(device) for n in self.adapted}
        w = {n: m.to(device).requires_grad_(True) for n, m in mask.items()}
        ctx.load_model(glob)  # lower layers and buffers: the global model's
        sub = derived_context(ctx, data=sample, lr=self.params.eta, momentum=0.0, weight_decay=0.0)

        def clip() -> None:
            with torch.no_grad():
                for t in w.values():
                    t.clamp_(0.0, 1.0)

        steps: list[float] = []
        epochs: list[float] = []  # the last batch loss of each pass (the reference's record)
        for epoch in range(self.params.max_init_epochs if first else 1):
            local_sgd(
                sub,
                ctx.model,
                loss_fn=ala_loss(g, loc, w, steps),
                params=list(w.values()),
                after_step=clip,
                purpose=f"fedala/w{epoch}",
            )
            if steps:
                epochs.append(steps[-1])
            if self._settled(steps if self.params.convergence == "step" else epochs):
                break
        mask = {n: t.detach().cpu() for n, t in w.items()}
        return ala_combine(glob, local, mask), mask

    def _settled(self, losses: list[float]) -> bool:
        window = self.params.window
        # The reference requires more than `window` records; per step, `window` of them suffice.
        enough = len(losses) > window if self.params.convergence == "epoch" else len(losses) >= window
        return enough and statistics.pstdev(losses[-window:]) < self.params.threshold

    def local_train(
        self, ctx: ClientContext, message: Broadcast, client_state: FedALAClientState | None
    ) -> tuple[ClientUpdate, FedALAClientState]:
        glob = message.weights
        if client_state:
            start, mask = self.adapt(ctx, glob, client_state.local, client_state.mask)
        else:
            start, mask = glob, None  # no local model yet: θ_i⁰ = θ
        ctx.load_model(start)
        metrics = local_sgd(ctx, ctx.model)
        trained = model_weights(ctx.model)
        return ClientUpdate(ctx.client_id, trained, ctx.data.size("train"), metrics), FedALAClientState(trained, mask)

    def personal_weights(
        self, ctx: ClientContext, message: Broadcast, client_state: FedALAClientState | None
    ) -> Weights | None:
        return client_state.local if client_state else None
