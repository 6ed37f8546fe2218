"""ClientActor: a Ray actor with a resident model that trains whichever clients it is handed.

One actor serves many virtual clients in turn (pfl-research style): the model, the dataset
view and scratch models stay resident, a client's own state comes from the state store, and
only tensors that must travel (the update, an upload) leave the actor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from actors.devices import claim_device, device_info
from actors.serialization import install_tensor_serializer
from actors.state_store import ClientStateStore
from algorithms.base import (
    Algorithm,
    Broadcast,
    ClientContext,
    ClientData,
    RunContext,
    SetupPhase,
    load_weights,
    model_weights,
)
from sim.memory import keep_freed_heap, peak_rss_mb, reset_peak
from sim.models import Classifier
from sim.training import evaluate, evaluate_segments, local_sgd

SPLITS = ("train", "val", "test")


class ClientWorker:
    """The actor's logic, usable without Ray (tests, the plain single-process reference)."""

    def __init__(self, dataset: Any, threads: int = 1) -> None:
        torch.set_num_threads(threads)  # fixed thread count: identical numbers whatever the pool size
        keep_freed_heap()  # each client trained allocates the same megabytes again: no page faults for them
        install_tensor_serializer()
        self.dataset = dataset
        self.device = claim_device()
        self._algorithm: Algorithm | None = None

    @property
    def algorithm(self) -> Algorithm:
        if self._algorithm is None:
            raise RuntimeError("ClientWorker used before configure() bound it to a run")
        return self._algorithm

    def configure(self, algorithm: Algorithm, partition: Any, run: RunContext, state_dir: str) -> bool:
        """Bind to one (algorithm, seed) run: resident models are rebuilt, caches dropped."""
        self._algorithm = algorithm
        self.partition = partition
        self.run = run
        torch.manual_seed(run.seed)  # the same initialization as the server's global model
        self.model = run.build_model().to(self.device)
        self.init_weights = model_weights(self.model)
        self.state_keys = frozenset(self.init_weights)
        self._scratch: dict[str, Classifier] = {}
        self.store = ClientStateStore(Path(state_dir))
        return True

    def _scratch_model(self, key: str) -> Classifier:
        if key not in self._scratch:
            self._scratch[key] = self.run.build_model().to(self.device)
        return self._scratch[key]

    def client_data(self, client_id: int) -> ClientData:
        """The client's splits, each gathered on its first read (see ClientData.lazy)."""
        return ClientData.lazy(SPLITS, lambda split: self._gather(client_id, split))

    def _gather(self, client_id: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.sort(self.partition.client_indices(client_id, split))
        return torch.from_numpy(self.dataset.images[idx]), torch.from_numpy(self.dataset.labels[idx])

    def _reset(self, model: torch.nn.Module) -> None:
        load_weights(model, self.init_weights)

    def context(self, client_id: int, round: int, data: ClientData | None = None) -> ClientContext:
        """A fresh context; each resident model is reset to the shared init when the context first
        hands it out, so that nothing a previous client left in it can leak into this one (results
        must not depend on who ran before), and a verb that never reads a model does not pay.
        `data`: the client's splits when the caller has already gathered them."""
        return ClientContext(
            client_id,
            round,
            self.run,
            data if data is not None else self.client_data(client_id),
            self.model,
            self._scratch_model,
            self.device,
            public=self.dataset.public,
            reset=self._reset,
            state_keys=self.state_keys,
        )

    def train(self, client_id: int, round: int, message: Broadcast, version: int) -> tuple[Any, dict[str, Any]]:
        start = time.perf_counter()
        algo = self.algorithm
        ctx = self.context(client_id, round)
        state = self.store.load(client_id, version) if algo.stateful else None
        update, new_state = algo.local_train(ctx, message, state)
        new_version = version
        if algo.stateful and new_state is not None:
            self.store.save(client_id, round, new_state, previous=version)
            new_version = round
        info = {
            "client_id": client_id,
            "version": new_version,
            "bytes_up": update.nbytes,
            "seconds": time.perf_counter() - start,
            "metrics": dict(update.metrics),
        }
        return update, info

    def train_many(
        self, client_ids: list[int], start: int, round: int, message: Broadcast, versions: list[int]
    ) -> tuple[Any, list[dict[str, Any]]]:
        """Train a run of the round's clients (positions start, start+1, ...) in one task, and sum
        their updates here.

        Returns (partial aggregate, one info per client): the server merges one partial per task
        instead of deserializing and adding every client's update (the sum is the same whatever
        the cut, see algorithms/aggregation.py). An algorithm whose server needs each update alone
        (`partial_aggregator` returns None) gets the list of updates instead."""
        partial = self.algorithm.partial_aggregator(start)
        updates = []
        infos = []
        reset_peak()  # once per task: each client reports the task's peak, and the round the largest
        for client_id, version in zip(client_ids, versions, strict=True):
            update, info = self.train(client_id, round, message, version)
            if partial is not None:
                partial.add(update)
            else:
                updates.append(update)
            infos.append(info)
        peak = peak_rss_mb()  # reading /proc per client cost 2 % of a 10,000-client round
        for info in infos:
            info["peak_rss_mb"] = peak
        return (partial if partial is not None else updates), infos

    def run_setup_client(self, phase_index: int, client_id: int) -> tuple[Any, dict[str, Any]]:
        start = time.perf_counter()
        reset_peak()
        phase = self.algorithm.setup_phases()[phase_index]
        upload = _step(phase, "client")(self.context(client_id, -1))
        info = {
            "client_id": client_id,
            "bytes_up": phase.upload_nbytes(upload),
            "seconds": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb(),
        }
        return upload, info

    def run_setup_personal(
        self, phase_index: int, client_id: int, message: Broadcast, version: int
    ) -> tuple[Any, dict[str, Any]]:
        """A one-shot client step from the server's broadcast; its state is the client's round-0 version."""
        start = time.perf_counter()
        reset_peak()
        algo = self.algorithm
        phase = algo.setup_phases()[phase_index]
        ctx = self.context(client_id, 0)
        state = self.store.load(client_id, version) if algo.stateful else None
        upload, new_state = _step(phase, "personal")(ctx, message, state)
        new_version = version
        if algo.stateful and new_state is not None:
            self.store.save(client_id, 0, new_state, previous=version)
            new_version = 0
        info = {
            "client_id": client_id,
            "version": new_version,
            "bytes_up": phase.upload_nbytes(upload),
            "seconds": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb(),
        }
        return upload, info

    def run_setup_work(self, phase_index: int, item_index: int, item: Any) -> tuple[Any, dict[str, Any]]:
        """One item of a server-owned phase fanned out over the pool (e.g. one client's synthesis)."""
        from algorithms.base import ServerContext

        start = time.perf_counter()
        reset_peak()
        phase = self.algorithm.setup_phases()[phase_index]
        metrics: dict[str, float] = {}
        ctx = ServerContext(
            self.run,
            self.device,
            lambda name, value: metrics.__setitem__(name, float(value)),
            Path(self.run.run_dir) / "artifacts",
            public=self.dataset.public,
        )
        result = _step(phase, "work")(ctx, item)
        info = {
            "client_id": item_index,
            "bytes_up": 0,
            "seconds": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb(),
            **metrics,
        }
        return result, info

    def evaluate_new_clients(
        self, client_ids: list[int], round: int, message: Broadcast, epochs: int, batch_size: int
    ) -> list[tuple[int, str, str, float]]:
        """New-client accuracy: a never-trained client takes what the method gives a newcomer (its
        personalized model without state) and adapts it for a fixed budget of local epochs, unless
        the method's personalization is that adaptation already (one budget, not two)."""
        rows: list[tuple[int, str, str, float]] = []
        for client_id in client_ids:
            ctx = self.context(client_id, round)
            start = self.algorithm.personal_weights(ctx, message, None)
            load_weights(ctx.model, start if start is not None else message.weights)
            if epochs > 0 and not self.algorithm.adapts_at_evaluation:
                local_sgd(ctx, ctx.model, epochs=epochs, purpose="new-client")
            for split in ("val", "test"):
                acc, loss, n = evaluate(ctx.model, ctx.data.x[split], ctx.data.y[split], batch_size)
                rows += [(client_id, split, "new_client_acc", acc), (client_id, split, "n", float(n))]
        return rows

    def evaluate(
        self, client_ids: list[int], round: int, message: Broadcast, versions: list[int], batch_size: int
    ) -> list[tuple[int, str, str, float]]:
        """(client_id, split, metric, value) rows for global and personalized accuracy.

        The global model is scored on all these clients' val and test splits in one batched pass;
        each personalized model on its own client's val and test splits together."""
        algo = self.algorithm
        data = {cid: self.client_data(cid) for cid in client_ids}
        global_scores = self._score(message.weights, data, batch_size) if algo.has_global_model else {}
        rows: list[tuple[int, str, str, float]] = []
        for client_id, version in zip(client_ids, versions, strict=True):
            ctx = self.context(client_id, round, data[client_id])
            state = self.store.load(client_id, version) if algo.stateful else None
            personal = algo.personal_weights(ctx, message, state)
            if personal is not None and not self.init_weights.keys() <= personal.keys():
                ctx.model  # noqa: B018 - the keys `personal` leaves out must be the reset model's, not a stale one's
            personal_scores = (
                global_scores if personal is None else self._score(personal, {client_id: data[client_id]}, batch_size)
            )
            for split in ("val", "test"):
                if algo.has_global_model:
                    acc, loss, _ = global_scores[client_id, split]
                    rows += [(client_id, split, "global_acc", acc), (client_id, split, "global_loss", loss)]
                acc, loss, n = personal_scores[client_id, split]
                rows += [
                    (client_id, split, "personal_acc", acc),
                    (client_id, split, "personal_loss", loss),
                    (client_id, split, "n", float(n)),
                ]
        return rows

    def _score(self, weights: Any, data: dict[int, ClientData], batch_size: int) -> dict[tuple[int, str], Any]:
        """{(client, split): (acc, loss, n)} of one set of weights on the val and test splits of `data`."""
        load_weights(self.model, weights)
        keys = [(cid, split) for cid in data for split in ("val", "test")]
        x = torch.cat([data[cid].x[split] for cid, split in keys])
        y = torch.cat([data[cid].y[split] for cid, split in keys])
        lengths = [int(data[cid].y[split].shape[0]) for cid, split in keys]
        return dict(zip(keys, evaluate_segments(self.model, x, y, lengths, batch_size), strict=True))


def _step(phase: SetupPhase, kind: str) -> Callable[..., Any]:
    """The phase's callable for `kind`; the engine schedules by `phase.kind`, so a miss is a bug."""
    fn = getattr(phase, kind)
    if fn is None:
        raise RuntimeError(f"setup phase {phase.name!r} has no {kind} step")
    return fn


@ray.remote
class ClientActor(ClientWorker):
    """The Ray face of ClientWorker; resources are set by the pool with `.options(...)`."""

    def ping(self) -> bool:
        return True

    def device_info(self) -> dict[str, Any]:
        return device_info(self.device)

    @ray.method(num_returns=2)
    def train_many(  # type: ignore[override]
        self,
        client_ids: list[int],
        start: int,
        round: int,
        message: Broadcast,
        versions: list[int],
    ):
        return ClientWorker.train_many(self, client_ids, start, round, message, versions)

    @ray.method(num_returns=2)
    def run_setup_client(self, phase_index: int, client_id: int):  # type: ignore[override]
        return ClientWorker.run_setup_client(self, phase_index, client_id)

    @ray.method(num_returns=2)
    def run_setup_personal(  # type: ignore[override]
        self,
        phase_index: int,
        client_id: int,
        message: Broadcast,
        version: int,
    ):
        return ClientWorker.run_setup_personal(self, phase_index, client_id, message, version)

    @ray.method(num_returns=2)
    def run_setup_work(self, phase_index: int, item_index: int, item: Any):  # type: ignore[override]
        return ClientWorker.run_setup_work(self, phase_index, item_index, item)
