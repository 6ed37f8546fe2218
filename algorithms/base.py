"""The algorithm interface every method (baseline or WarmFed) implements.

Server verbs (`init_server_state`, `select_clients`, `broadcast`, `new_aggregator`,
`finish_round`) run in the ServerActor; client verbs (`local_train`, `personal_weights`) run
in ClientActors. An algorithm never sees Ray, the engine or the results table: it receives a
`ClientContext` with the data and resident model of one client, and returns tensors. Personal
parameters are declared by name patterns (`personal_patterns`), not by hand-written copies.
Optional warm-start phases (`setup_phases`) let a method run one-shot work before round 1.

What the verbs pass each other is typed: the server state (`ServerState`), the round's message
(`Broadcast`) and a client's own state (`ClientState`) are small frozen dataclasses, and a method
that needs more fields subclasses them and names its types, `Algorithm[State, Message, ClientState]`
(SCAFFOLD's control variates, say); verbs build new values with `dataclasses.replace`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar, cast

import numpy as np
import torch

from algorithms.aggregation import Aggregator
from sim.config import TrainConfig
from sim.models import Classifier, ModelSpec, build_model
from sim.rng import stream_rng
from sim.rng import stream_seed as rng_seed  # the algorithm API's name for it (plug-ins import it from here)

Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class NoParams:
    """Hyper-parameters of an algorithm that has none."""


def weights_nbytes(weights: Mapping[str, torch.Tensor] | None) -> int:
    if not weights:
        return 0
    return int(sum(t.numel() * t.element_size() for t in weights.values()))


def clone_weights(weights: Mapping[str, torch.Tensor]) -> Weights:
    return {k: v.detach().clone() for k, v in weights.items()}


def model_weights(model: torch.nn.Module) -> Weights:
    """A detached CPU copy of the model's state (parameters and buffers)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def load_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Load a (possibly partial) state into the resident model in place, without reallocating."""
    state = model.state_dict()
    with torch.no_grad():
        for key, value in weights.items():
            state[key].copy_(value)


@dataclass(frozen=True)
class ServerState:
    """The server's state between rounds, checkpointed whole: the global weights. A method that
    keeps more (SCAFFOLD's control variate) subclasses it; `finish_round` returns a new one
    (`dataclasses.replace(state, weights=...)` keeps the subclass and its other fields)."""

    weights: Weights


@dataclass(frozen=True)
class Broadcast:
    """What every selected client receives in a round (one object in Ray's store): by default the
    shared weights. A method that sends more subclasses it; `message_nbytes` counts what it costs."""

    weights: Weights


@dataclass(frozen=True)
class ClientState:
    """Base of a client's own state, kept in the state store between the rounds it takes part in
    (one file per version, pickled as it is); a stateful method's `local_train` returns its subclass."""


@dataclass(frozen=True)
class PersonalState(ClientState):
    """The client's personal weights: the part matching `personal_patterns`, or a whole own model."""

    personal: Weights


StateT = TypeVar("StateT", bound=ServerState)
MessageT = TypeVar("MessageT", bound=Broadcast)
ClientStateT = TypeVar("ClientStateT", bound=ClientState)


@dataclass
class ClientUpdate:
    """What one client sends up after local training; `payload` is aggregated, `weight` weighs it."""

    client_id: int
    payload: Weights
    weight: float
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return weights_nbytes(self.payload)


@dataclass(frozen=True)
class RunContext:
    """What an algorithm may know about the run it is part of (picklable, sent to every actor)."""

    num_clients: int
    clients_per_round: int
    rounds: int
    seed: int
    train: TrainConfig
    model_name: str
    model_spec: ModelSpec
    cache_dir: str
    run_dir: str
    dataset_fingerprint: str = ""
    dataset_name: str = ""
    dataset_params: dict[str, Any] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()
    holdout_clients: int = 0  # clients that never train (new-client evaluation only)
    mixed_precision: str = "fp32"  # the run's `mixed_precision`: read through `autocast`

    @property
    def num_trainable(self) -> int:
        return self.num_clients - self.holdout_clients

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Mixed precision for diffusion sampling and LoRA training when the run asks for it and
        `device` is a GPU; a no-op otherwise, so CPU runs keep their exact numbers."""
        if self.mixed_precision == "fp32" or torch.device(device).type != "cuda":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.mixed_precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type="cuda", dtype=dtype)

    def sampling_autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """`autocast` for inference-only work (diffusion sampling), which on a CPU also takes bf16:
        there it is 1.6x faster per UNet call, while bf16 *training* on a CPU without AMX is slower
        (README, "Mixed precision on a CPU")."""
        if torch.device(device).type == "cpu" and self.mixed_precision == "bf16":
            return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
        return self.autocast(device)

    def build_model(self) -> Classifier:
        return build_model(self.model_name, self.model_spec)


class _LazySplits(Mapping[str, torch.Tensor]):
    """One side (images or labels) of a client's splits, each gathered from the dataset the first
    time any verb reads it: evaluation never pays for the train split, training for val and test."""

    def __init__(self, cache: dict[str, tuple[torch.Tensor, torch.Tensor]], gather: Callable, names: tuple, side: int):
        self._cache, self._gather, self._names, self._side = cache, gather, names, side

    def __getitem__(self, split: str) -> torch.Tensor:
        if split not in self._cache:
            if split not in self._names:
                raise KeyError(split)
            self._cache[split] = self._gather(split)
        return self._cache[split][self._side]

    def __contains__(self, split: object) -> bool:
        return split in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@dataclass
class ClientData:
    """One client's splits as CPU tensors (images float32 NCHW, labels int64)."""

    x: Mapping[str, torch.Tensor]
    y: Mapping[str, torch.Tensor]

    @classmethod
    def lazy(cls, splits: Iterable[str], gather: Callable[[str], tuple[torch.Tensor, torch.Tensor]]) -> ClientData:
        """Splits named `splits`, each gathered by `gather(split) -> (x, y)` on its first read (x and y together)."""
        cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        names = tuple(splits)
        return cls(_LazySplits(cache, gather, names, 0), _LazySplits(cache, gather, names, 1))

    def size(self, split: str) -> int:
        return int(self.y[split].shape[0]) if split in self.y else 0


class ClientContext:
    """Everything a client verb needs for one client: its data, a resident model, seeded RNG streams."""

    def __init__(
        self,
        client_id: int,
        round: int,
        run: RunContext,
        data: ClientData,
        model: Classifier,
        scratch: Callable[[str], Classifier],
        device: torch.device,
        public: Any = None,
        *,
        reset: Callable[[Classifier], None] | None = None,
        state_keys: frozenset[str] | None = None,
    ) -> None:
        """`reset`: applied to the resident model and to each scratch model the first time this
        context hands it out (so a verb that never reads a model does not pay for its reset).
        `state_keys`: the models' state keys; `load_model` skips the reset when weights cover them."""
        self.client_id = client_id
        self.round = round
        self.run = run
        self.data = data
        self._model = model
        self._scratch = scratch
        self._reset = reset
        self._handed_out: set[str | None] = set()  # None: the resident model; else scratch keys
        self._state_keys = state_keys
        self.device = device
        self.public = public
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _hand_out(self, key: str | None, model: Classifier) -> Classifier:
        if self._reset is not None and key not in self._handed_out:
            self._reset(model)
        self._handed_out.add(key)
        return model

    @property
    def model(self) -> Classifier:
        """The resident model, reset (when the context was given a `reset`) on first use in this context."""
        return self._hand_out(None, self._model)

    def load_model(self, weights: Mapping[str, torch.Tensor]) -> Classifier:
        """The resident model holding `weights`. When they cover its whole state, nothing a previous
        client left can survive the load, so the reset is skipped (one copy of the weights, not two)."""
        if self._state_keys is not None and weights.keys() >= self._state_keys:
            self._handed_out.add(None)
        model = self.model
        load_weights(model, weights)
        return model

    @property
    def train_cfg(self) -> TrainConfig:
        return self.run.train

    def generator(self, purpose: str) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(rng_seed(self.run.seed, self.round, self.client_id, purpose))
        return g

    def scratch_model(self, key: str) -> Classifier:
        """An extra resident model of the same architecture (teacher, personal copy, previous model)."""
        return self._hand_out(key, self._scratch(key))

    def batches(
        self,
        split: str = "train",
        *,
        shuffle: bool = True,
        batch_size: int | None = None,
        purpose: str = "train",
        epoch: int = 0,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.on_device(split)
        n = int(y.shape[0])
        bs = batch_size or self.run.train.batch_size
        order = torch.randperm(n, generator=self.generator(f"{purpose}/{epoch}")) if shuffle else torch.arange(n)
        order = order.to(self.device)  # the permutation comes from the CPU generator: the same on any device
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            yield x[idx], y[idx]

    def on_device(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's tensors on the context's device, copied once per client task, not once per
        batch (`data` itself stays on the CPU; on a CPU device this is `data` itself)."""
        if split not in self._on_device:
            self._on_device[split] = (self.data.x[split].to(self.device), self.data.y[split].to(self.device))
        return self._on_device[split]


@dataclass(frozen=True)
class SetupPhase(Generic[StateT, MessageT, ClientStateT]):
    """A one-shot step before round 1, e.g. WarmFed's LoRA upload, synthesis and one-shot personalization.

    A phase does its per-party work in one of three ways (at most one is set), then `server`
    (optional) receives the results in client-id (or item) order with the server state and
    returns the new server state (the next phase's input: phases hand results on through the
    method's typed state):

    * `client(ctx) -> upload`: every client computes an upload from its own data;
    * `personal(ctx, message, client_state) -> (upload, new_state)`: every training client starts
      from the server's broadcast (downloaded once per client, counted) and keeps `new_state` in
      the state store as its round-0 state, e.g. a one-shot personalized model. With `message`
      set, each client gets `message(state, client_id)` instead: what only that client may see
      (WarmFed sends a client its own synthetic samples to check);
    * `work(ctx, item) -> result` over `work_items(state) -> [(cost, item), ...]`: server-owned work
      whose items are independent (one per client, say) fans out over the client actor pool;
      the server still owns the phase, its inputs and its result. Each item must carry its own
      seed, so results do not depend on which actor ran it.
    """

    name: str
    client: Callable[[ClientContext], Any] | None = None
    server: Callable[[ServerContext, StateT, list[Any]], StateT] | None = None
    upload_nbytes: Callable[[Any], int] = lambda upload: 0
    personal: Callable[[ClientContext, MessageT, ClientStateT | None], tuple[Any, ClientStateT | None]] | None = None
    work: Callable[[ServerContext, Any], Any] | None = None
    work_items: Callable[[StateT], list[tuple[float, Any]]] | None = None
    message: Callable[[StateT, int], MessageT] | None = None

    def __post_init__(self) -> None:
        if sum(f is not None for f in (self.client, self.personal, self.work)) > 1:
            raise ValueError(f"setup phase {self.name!r}: set at most one of client, personal, work")
        if self.message is not None and self.personal is None:
            raise ValueError(f"setup phase {self.name!r}: a per-client message needs a personal step")
        if (self.work is None) != (self.work_items is None):
            raise ValueError(f"setup phase {self.name!r}: work and work_items go together")

    @property
    def kind(self) -> str:
        """client | personal | work | server (server-only)."""
        if self.client is not None:
            return "client"
        if self.personal is not None:
            return "personal"
        return "work" if self.work is not None else "server"


@dataclass
class ServerContext:
    """What a server phase (or its fanned-out work) may use: the run, a fresh model, a device, a
    metric callback; `public` is the dataset's public split where the process holds it."""

    run: RunContext
    device: torch.device
    report: Callable[[str, float], None]
    artifacts_dir: Path
    public: Any = None

    def build_model(self) -> Classifier:
        return self.run.build_model().to(self.device)


class Algorithm(Generic[StateT, MessageT, ClientStateT]):
    """Base class: FedAvg's behaviour unless overridden, so a new method states only what differs.

    Typed over its server state, broadcast and client state: `ServerState`, `Broadcast` and
    `PersonalState` unless a method names its own subclasses, e.g.
    `class Scaffold(Algorithm[ScaffoldState, ScaffoldBroadcast, ScaffoldClientState])`; a method
    with its own state or message type overrides `init_server_state` or `broadcast` to build it.
    """

    name: str = ""  # not a ClassVar: a variant runs under its own name
    Params: ClassVar[type] = NoParams
    #: fnmatch patterns over state-dict keys that stay on the client and are never averaged.
    personal_patterns: tuple[str, ...] = ()  # not a ClassVar: FedBN derives its patterns from the model
    #: False for methods without a server model (Local-only): no global accuracy is reported.
    has_global_model: ClassVar[bool] = True
    #: True when client verbs read or write per-client state (kept in the actors' state store).
    stateful: ClassVar[bool] = False
    #: True when `personal_weights` already adapts the received model to the client (fine-tuning
    #: methods): a new client then takes that model as it is, not another budget on top of it.
    adapts_at_evaluation: ClassVar[bool] = False
    #: True when the server phases train or sample models (not only average): with `server_resources.num_gpus`
    #: "auto" the server actor then gets a GPU share where the cluster has GPUs.
    server_heavy: ClassVar[bool] = False
    #: `run_sim.py tune`'s grid over the method's own hyper-parameters (Params field -> candidate
    #: values), searched beside the shared ones (train.lr); empty: only the shared ones are tuned.
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {}

    def __init__(self, params: Any, run: RunContext) -> None:
        self.params = params
        self.run = run

    # ----- naming helpers ----------------------------------------------------------------
    def is_personal(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in self.personal_patterns)

    def shared_part(self, weights: Mapping[str, torch.Tensor]) -> Weights:
        return {k: v for k, v in weights.items() if not self.is_personal(k)}

    def personal_part(self, weights: Mapping[str, torch.Tensor]) -> Weights:
        return {k: v for k, v in weights.items() if self.is_personal(k)}

    # ----- warm start ----------------------------------------------------------------------
    def setup_phases(self) -> list[SetupPhase[StateT, MessageT, ClientStateT]]:
        return []

    # ----- server verbs ------------------------------------------------------------------
    def init_server_state(self, weights: Weights) -> StateT:
        return cast(StateT, ServerState(weights))

    def select_clients(self, round: int, num_clients: int, per_round: int) -> np.ndarray:
        """Uniform sampling without replacement from a (seed, round) stream, sorted by id."""
        if per_round >= num_clients:
            return np.arange(num_clients)
        rng = stream_rng(self.run.seed, round, 0x5E1EC7)
        return np.sort(rng.choice(num_clients, size=per_round, replace=False))

    def broadcast(self, state: StateT) -> MessageT:
        """What every selected client receives this round (by default the shared weights)."""
        return cast(MessageT, Broadcast(self.shared_part(state.weights)))

    def message_nbytes(self, message: MessageT) -> int:
        """Bytes one client downloads; entries derivable from the shared seed (an init) cost nothing."""
        return weights_nbytes(message.weights)

    def new_aggregator(self, state: StateT) -> Aggregator:
        return Aggregator()

    def partial_aggregator(self, start: int) -> Aggregator | None:
        """What a client actor folds one task's updates into before they travel (the task's clients
        begin at position `start` of the round); the server merges it into `new_aggregator`'s
        result. Return None when `finish_round` needs every update on its own (a coordinate-wise
        median, say): the updates then travel one by one."""
        return Aggregator(start)

    def finish_round(self, state: StateT, aggregator: Aggregator) -> StateT:
        if aggregator.count == 0:
            return state
        return dataclasses.replace(state, weights={**state.weights, **aggregator.mean(self.shared_part(state.weights))})

    # ----- client verbs ------------------------------------------------------------------
    def start_weights(self, ctx: ClientContext, message: MessageT, client_state: ClientStateT | None) -> Weights:
        """The weights a client trains from: the broadcast, with its own personal part if it has one."""
        weights = dict(message.weights)
        if isinstance(client_state, PersonalState):
            weights.update(client_state.personal)
        return weights

    def local_train(
        self, ctx: ClientContext, message: MessageT, client_state: ClientStateT | None
    ) -> tuple[ClientUpdate, ClientStateT | None]:
        from sim.training import cross_entropy, local_sgd

        model = ctx.load_model(self.start_weights(ctx, message, client_state))
        metrics = local_sgd(ctx, model, loss_fn=cross_entropy)
        trained = model_weights(ctx.model)
        new_state = (
            cast(ClientStateT, PersonalState(self.personal_part(trained))) if self.personal_patterns else client_state
        )
        update = ClientUpdate(ctx.client_id, self.shared_part(trained), ctx.data.size("train"), metrics)
        return update, new_state

    def personal_weights(
        self, ctx: ClientContext, message: MessageT, client_state: ClientStateT | None
    ) -> Weights | None:
        """The client's own model for personalized evaluation; None means "the global model"."""
        if not self.personal_patterns:
            return None
        return self.start_weights(ctx, message, client_state)

    # ----- descriptive -------------------------------------------------------------------
    @classmethod
    def describe(cls) -> str:
        from sim.typed import describe_fields

        return describe_fields(cls.Params) if dataclasses.is_dataclass(cls.Params) else ""
