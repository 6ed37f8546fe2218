"""ServerActor: holds the global state, folds client updates, runs server-side phases.

The driver never holds model weights: it passes ObjectRefs from client tasks to `fold`, and
the broadcast this actor returns goes to the object store once per round, from where every
client actor reads it. One server actor serves every (algorithm, seed) run of a comparison in
turn (`configure` starts a run afresh): its process start-up (importing torch) is paid once,
and it overlaps with the client actors' start-up.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import ray
import torch

from actors.devices import claim_device, device_info
from actors.serialization import install_tensor_serializer
from algorithms.base import (
    Aggregator,
    Algorithm,
    Broadcast,
    ClientUpdate,
    RunContext,
    ServerContext,
    ServerState,
    model_weights,
)
from sim.files import write_atomic
from sim.memory import keep_freed_heap, peak_rss_mb, reset_peak


class ServerWorker:
    def __init__(self, threads: int | None = None) -> None:
        torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
        keep_freed_heap()  # each fold receives the same megabytes again: no page faults for them
        install_tensor_serializer()
        self.device = claim_device()

    def configure(self, algorithm: Algorithm, run: RunContext) -> bool:
        """Start one (algorithm, seed) run: fresh global state, nothing kept from the previous run."""
        self.algorithm = algorithm
        self.run = run
        torch.manual_seed(run.seed)
        self.state: ServerState = algorithm.init_server_state(model_weights(run.build_model()))
        self.aggregator: Aggregator | None = None
        self._uploads: list[Any] = []
        self._work_items: list[Any] = []
        return True

    def broadcast(self) -> Broadcast:
        return self.algorithm.broadcast(self.state)

    def message_nbytes(self) -> int:
        return self.algorithm.message_nbytes(self.broadcast())

    def begin_round(self) -> None:
        self.aggregator = self.algorithm.new_aggregator(self.state)

    def _open_aggregator(self) -> Aggregator:
        if self.aggregator is None:
            raise RuntimeError("server: fold/finish_round outside begin_round")
        return self.aggregator

    def fold(self, item: Aggregator | list[ClientUpdate]) -> None:
        """One training task's result: a client actor's partial aggregate, or its updates one by one.

        Folds run while the client actors train, so on one thread: a multi-threaded addition's
        workers wait for cores the clients hold (at 10,000 clients a fold took 1.4-2.6 ms on every
        core against 0.3-0.5 ms on one). Element-wise sums, so the bits do not depend on it."""
        aggregator = self._open_aggregator()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if isinstance(item, Aggregator):
                aggregator.merge(item)
            else:
                for update in item:
                    aggregator.add(update)
        finally:
            torch.set_num_threads(threads)

    def finish_round(self) -> dict[str, float]:
        self.state = self.algorithm.finish_round(self.state, self._open_aggregator())
        self.aggregator = None
        return {"aggregated": 0.0}

    # ----- warm-start phases --------------------------------------------------------------
    def collect(self, upload: Any) -> None:
        self._uploads.append(upload)

    def prepare_setup_work(self, phase_index: int) -> list[float]:
        """A work phase's items from the current state, kept here until each is fetched; returns their costs."""
        work_items = self.algorithm.setup_phases()[phase_index].work_items
        if work_items is None:
            raise RuntimeError(f"setup phase {phase_index} has no work items")
        items = work_items(self.state)
        self._work_items = [item for _, item in items]
        return [float(cost) for cost, _ in items]

    def setup_work_item(self, index: int) -> Any:
        """One work item, fetched by the client actor that runs it (an argument ref, so it never visits the driver)."""
        return self._work_items[index]

    def setup_message(self, phase_index: int, client_id: int) -> Broadcast:
        """A personal phase's message for one client (its own, when the phase has per-client
        messages; the broadcast otherwise): an argument ref, so it never visits the driver."""
        make = self.algorithm.setup_phases()[phase_index].message
        return self.broadcast() if make is None else make(self.state, client_id)

    def setup_message_nbytes(self, phase_index: int, client_ids: list[int]) -> int:
        """Bytes every listed client downloads in a personal phase (the broadcast once each by default)."""
        if self.algorithm.setup_phases()[phase_index].message is None:
            return self.message_nbytes() * len(client_ids)
        return sum(self.algorithm.message_nbytes(self.setup_message(phase_index, c)) for c in client_ids)

    def run_setup_server(self, phase_index: int) -> dict[str, float]:
        phase = self.algorithm.setup_phases()[phase_index]
        metrics: dict[str, float] = {}

        def report(name: str, value: float) -> None:
            metrics[name] = float(value)

        ctx = ServerContext(self.run, self.device, report, Path(self.run.run_dir) / "artifacts")
        ctx.artifacts_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        reset_peak()
        uploads, self._uploads = self._uploads, []
        self._work_items = []
        if phase.server is not None:
            self.state = phase.server(ctx, self.state, uploads)
        metrics.setdefault("server_s", time.perf_counter() - start)
        metrics["server_peak_rss_mb"] = peak_rss_mb()
        return metrics

    # ----- checkpoints ---------------------------------------------------------------------
    def save(self, path: str) -> str:
        """Write the state atomically (see sim/orchestration/checkpoints.py); returns its sha256 for the checkpoint's meta.

        The state is the algorithm's `ServerState` dataclass, pickled whole (tensors, arrays, uploads)."""
        buffer = io.BytesIO()
        torch.save(self.state, buffer)
        return write_atomic(Path(path), buffer.getbuffer())

    def load(self, path: str) -> None:
        self.state = torch.load(path, map_location="cpu", weights_only=False)


@ray.remote
class ServerActor(ServerWorker):
    """The Ray face of ServerWorker; its resources come from the pool plan (`server_options`)."""

    def ping(self) -> bool:
        return True

    def device_info(self) -> dict[str, Any]:
        return device_info(self.device)
