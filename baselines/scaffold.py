"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates correct client drift.

Algorithm 1 of the paper, with option II for the client control variate:

* local step:  y ← y − η_l (g_i(y) − c_i + c)         (the correction enters the gradient, so it
  goes through the shared optimizer exactly like the gradient does)
* option II:   c_i⁺ = c_i − c + (x − y_i) / (K η_l)
* upload:      Δy_i = y_i − x,  Δc_i = c_i⁺ − c_i
* server:      x ← x + η_g · mean(Δy_i),   c ← c + |S|/N · mean(Δc_i)

With the paper's plain-SGD local solver, option II equals the mean of the raw minibatch gradients
g_i(y_k) (+ weight decay) seen along the K local steps, and that is what we compute (a gradient hook
sums them). The two coincide for momentum 0, the default train.momentum (tested); with momentum β
the literal formula would overestimate the gradient by ≈1/(1−β) and the corrections would blow
up, while the mean-gradient form stays the quantity option II estimates.

Control variates exist for parameters only; BatchNorm running statistics are averaged as in
FedAvg. Means are unweighted over the clients of the round, as in the paper (the server's c is
then the mean of all N clients' c_i). Up: Δy, buffers, Δc; down: x and c.
N counts the clients that train (`run.num_trainable`: held-out clients never contribute a c_i).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from algorithms.base import (
    Aggregator,
    Algorithm,
    Broadcast,
    ClientContext,
    ClientState,
    ClientUpdate,
    RunContext,
    ServerState,
    Weights,
    model_weights,
    weights_nbytes,
)
from algorithms.registry import register
from baselines.common import parameter_names
from sim.training import local_sgd

DELTA, CONTROL, BUFFER = "dy/", "dc/", "buf/"


@dataclass(frozen=True)
class ScaffoldParams:
    server_lr: float = 1.0  # η_g

    def __post_init__(self) -> None:
        if not self.server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")


@dataclass(frozen=True)
class ScaffoldState(ServerState):
    control: Weights  # the server control variate c


@dataclass(frozen=True)
class ScaffoldBroadcast(Broadcast):
    control: Weights  # c, sent down with x


@dataclass(frozen=True)
class ScaffoldClientState(ClientState):
    control: Weights  # the client control variate c_i


@register("scaffold")
class Scaffold(Algorithm[ScaffoldState, ScaffoldBroadcast, ScaffoldClientState]):
    Params = ScaffoldParams
    stateful = True

    def __init__(self, params: ScaffoldParams, run: RunContext) -> None:
        super().__init__(params, run)
        self.param_names = parameter_names(run.build_model())

    # ----- server --------------------------------------------------------------------------
    def init_server_state(self, weights: Weights) -> ScaffoldState:
        return ScaffoldState(weights, control={n: torch.zeros_like(weights[n]) for n in self.param_names})

    def broadcast(self, state: ScaffoldState) -> ScaffoldBroadcast:
        return ScaffoldBroadcast(state.weights, state.control)

    def message_nbytes(self, message: ScaffoldBroadcast) -> int:
        return weights_nbytes(message.weights) + weights_nbytes(message.control)

    def finish_round(self, state: ScaffoldState, aggregator: Aggregator) -> ScaffoldState:
        if aggregator.count == 0:
            return state
        x, c = state.weights, state.control
        like = {f"{DELTA}{n}": torch.zeros_like(c[n]) for n in self.param_names}
        like.update({f"{CONTROL}{n}": torch.zeros_like(c[n]) for n in self.param_names})
        like.update({f"{BUFFER}{k}": v for k, v in x.items() if k not in c})
        mean = aggregator.mean(like)
        share = aggregator.count / self.run.num_trainable  # |S| / N (clients that train)
        weights = {k: mean[f"{BUFFER}{k}"] for k in x if k not in c}
        weights.update({n: x[n] + self.params.server_lr * mean[f"{DELTA}{n}"] for n in self.param_names})
        control = {n: c[n] + share * mean[f"{CONTROL}{n}"] for n in self.param_names}
        return dataclasses.replace(state, weights={k: weights[k] for k in x}, control=control)

    # ----- client --------------------------------------------------------------------------
    def local_train(
        self, ctx: ClientContext, message: ScaffoldBroadcast, client_state: ScaffoldClientState | None
    ) -> tuple[ClientUpdate, ScaffoldClientState]:
        x, c = message.weights, message.control
        c_i = client_state.control if client_state else {n: torch.zeros_like(c[n]) for n in self.param_names}
        ctx.load_model(x)
        params = dict(ctx.model.named_parameters())
        correction = {n: (c[n] - c_i[n]).to(ctx.device) for n in self.param_names}
        grad_sum = {n: torch.zeros_like(params[n]) for n in self.param_names}
        wd = ctx.train_cfg.weight_decay

        def hook(name: str):
            p = params[name]

            def correct(grad: torch.Tensor) -> torch.Tensor:
                grad_sum[name] += grad.detach()
                if wd:  # the optimizer adds wd·p: part of the step option II measures
                    grad_sum[name] += wd * p.detach()
                return grad + correction[name]

            return correct

        handles = [params[n].register_hook(hook(n)) for n in self.param_names]
        try:
            metrics = local_sgd(ctx, ctx.model)
        finally:
            for handle in handles:
                handle.remove()
        steps = int(metrics["train_steps"])
        y = model_weights(ctx.model)
        c_new = {n: (grad_sum[n] / steps).cpu() if steps else c_i[n].clone() for n in self.param_names}
        payload = {f"{DELTA}{n}": y[n] - x[n] for n in self.param_names}
        payload.update({f"{CONTROL}{n}": c_new[n] - c_i[n] for n in self.param_names})
        payload.update({f"{BUFFER}{k}": v for k, v in y.items() if k not in correction})
        return ClientUpdate(ctx.client_id, payload, 1.0, metrics), ScaffoldClientState(c_new)
