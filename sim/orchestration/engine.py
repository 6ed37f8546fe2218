"""The round loop shared by every algorithm: nothing here knows which method it runs.

Round 0 is the starting point (after any warm-start phases); rounds 1..R train. Every round:
the server broadcasts once (one object in the store), the round's clients go to the pool in
runs of consecutive clients (`train_chunks`), largest first; each run's updates are summed in
its actor over a fixed tree of client positions and the partial sums are folded into the server
in client-id order (so sums are identical whatever finishes first and however the round is
cut), clients are evaluated, rows are appended, and a checkpoint makes the run resumable.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray

from actors.pool import ActorPool, Task
from algorithms.base import Algorithm, RunContext
from sim.callbacks import Callback, Callbacks, RoundEnd, RunInfo
from sim.config import RunConfig, resolved
from sim.orchestration.checkpoints import CheckpointStore
from sim.orchestration.progress import Progress
from sim.results import RUN_LEVEL, ResultsWriter, Row
from sim.rng import stream_rng


class Simulation:
    """One (algorithm, seed) run over a partition, on a shared actor pool."""

    def __init__(
        self,
        *,
        algorithm: Algorithm,
        run: RunContext,
        cfg: RunConfig,
        partition: Any,
        partition_ref: Any,
        pool: ActorPool,
        server: Any,
        results: ResultsWriter,
        progress: Progress,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.algorithm = algorithm
        self.run = run
        self.cfg = cfg
        self.partition = partition
        self.partition_ref = partition_ref
        self.pool = pool
        self.server = server
        self.results = results
        self.progress = progress
        self.callbacks = Callbacks(callbacks)
        self.name = algorithm.name
        self.seed = run.seed
        base = Path(run.run_dir)
        self.state_dir = base / "client_state" / self.name / f"seed{self.seed}"
        self.checkpoints = CheckpointStore(
            base / "checkpoints" / self.name / f"seed{self.seed}", keep=cfg.checkpoint_keep, state_dir=self.state_dir
        )
        self.train_sizes = partition.sizes("train")
        self.holdout = self._holdout_clients()
        self.train_clients = np.setdiff1d(np.arange(run.num_clients), self.holdout)
        self.eval_clients = self._eval_clients()
        self.seconds_per_client: float | None = None  # the last round's mean client update (sets the task count)

    def _holdout_clients(self) -> np.ndarray:
        k = self.cfg.holdout_clients
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        return np.sort(stream_rng(self.seed, 0x401D).choice(self.run.num_clients, size=k, replace=False))

    def _eval_clients(self) -> np.ndarray:
        pool, cap = self.train_clients, self.cfg.eval.max_clients
        if cap is None or cap >= len(pool):
            return pool
        return np.sort(stream_rng(self.seed, 0xE7A1).choice(pool, size=cap, replace=False))

    # ------------------------------------------------------------------------------------
    def execute(self) -> None:
        loaded = self.checkpoints.load()
        if loaded is not None and loaded[1]:
            return  # finished in an earlier (interrupted) invocation of this comparison
        server = self.server
        configured = server.configure.remote(self.algorithm, self.run)
        self.pool.setup("configure", self.algorithm, self.partition_ref, self.run, str(self.state_dir))
        ray.get(configured)
        info = RunInfo(self.name, self.seed, self.run.rounds, Path(self.run.run_dir))
        start = 1 if loaded is None else loaded[0].round + 1
        self.callbacks.on_run_start(info, 0 if loaded is None else start)
        if loaded is None:
            self.results.drop_run(self.name, self.seed)
            versions = np.full(self.run.num_clients, -1, dtype=np.int64)
            self.callbacks.on_round_start(info, 0)
            began = time.perf_counter()
            rows = self._setup_phases(server, versions)
            rows += self._evaluate(server, 0, versions)
            rows.append((RUN_LEVEL, "run", "wall_s", time.perf_counter() - began))
            self.results.write(self.name, self.seed, 0, rows)
            self.checkpoints.save(0, server, versions, done=self.run.rounds == 0)
            self.callbacks.on_round_end(RoundEnd(info, 0, rows, checkpointed=True))
        else:
            checkpoint = loaded[0]
            ray.get(server.load.remote(str(checkpoint.server_path)))
            versions = checkpoint.versions.copy()
            self.results.drop_after(self.name, self.seed, checkpoint.round)
        for r in range(start, self.run.rounds + 1):
            self.callbacks.on_round_start(info, r)
            began = time.perf_counter()
            rows = self._round(server, r, versions)
            last = r == self.run.rounds
            if r % self.cfg.eval.every == 0 or last:
                rows += self._evaluate(server, r, versions)
            rows.append((RUN_LEVEL, "run", "wall_s", time.perf_counter() - began))
            self.results.write(self.name, self.seed, r, rows)
            saved = r % self.cfg.checkpoint_every == 0 or last
            if saved:
                self.checkpoints.save(r, server, versions, done=last)
            self.callbacks.on_round_end(RoundEnd(info, r, rows, checkpointed=saved))
        self.callbacks.on_run_end(info)

    # ------------------------------------------------------------------------------------
    def _setup_phases(self, server: Any, versions: np.ndarray) -> list[Row]:
        """Run the algorithm's one-shot phases; each reports wall time and bytes as round-0 rows.

        A client phase runs on every client, a personal phase on every training client from one
        broadcast (its state becomes the client's round-0 version), a work phase fans the
        server's items out over the pool; results reach the server in client (item) order."""
        rows: list[Row] = []
        for index, phase in enumerate(self.algorithm.setup_phases()):
            start = time.perf_counter()
            bytes_up = 0
            client_peak = 0.0
            tasks = self._setup_tasks(server, index, phase.kind, versions)
            if tasks:
                clients = [int(c) for c in self.train_clients]
                down = ray.get(server.setup_message_nbytes.remote(index, clients)) if phase.kind == "personal" else 0
                bar = self.progress.bar(len(tasks), f"{self.name} · {phase.name}")
                for _, _ref, info in self._in_client_order(tasks, lambda ref: server.collect.remote(ref)):
                    bytes_up += int(info["bytes_up"])
                    client_peak = max(client_peak, float(info["peak_rss_mb"]))
                    if "version" in info:
                        versions[int(info["client_id"])] = int(info["version"])
                    metric = "work_s" if phase.kind == "work" else "client_s"
                    rows.append((info["client_id"], "run", f"{phase.name}/{metric}", info["seconds"]))
                    bar.update(1)
                bar.close()
                rows.append((RUN_LEVEL, "run", f"{phase.name}/client_peak_rss_mb", client_peak))
                if phase.kind == "personal":  # each client downloads its message once: counted like a round's
                    rows.append((RUN_LEVEL, "run", f"{phase.name}/bytes_down", float(down)))
                    rows.append((RUN_LEVEL, "run", "bytes_down", float(down)))
            metrics = ray.get(server.run_setup_server.remote(index))
            rows.append((RUN_LEVEL, "run", f"{phase.name}/bytes_up", float(bytes_up)))
            rows.append((RUN_LEVEL, "run", f"{phase.name}/wall_s", time.perf_counter() - start))
            rows += [(RUN_LEVEL, "run", f"{phase.name}/{k}", v) for k, v in metrics.items()]
            self.progress.note(f"{self.name} · {phase.name}: {time.perf_counter() - start:.1f}s")
        return rows

    def _setup_tasks(self, server: Any, index: int, kind: str, versions: np.ndarray) -> list[Task]:
        """The pool tasks of one setup phase (none for a server-only phase)."""
        if kind == "client":
            return [
                Task(
                    cid, float(self.train_sizes[cid]), lambda actor, cid=cid: actor.run_setup_client.remote(index, cid)
                )
                for cid in range(self.run.num_clients)
            ]
        if kind == "personal":
            shared = None if self.algorithm.setup_phases()[index].message else server.broadcast.remote()

            def personal(actor: Any, cid: int) -> Any:
                message = shared if shared is not None else server.setup_message.remote(index, cid)
                return actor.run_setup_personal.remote(index, cid, message, int(versions[cid]))

            return [
                Task(int(cid), float(self.train_sizes[cid]), lambda actor, cid=int(cid): personal(actor, cid))
                for cid in self.train_clients
            ]
        if kind == "work":
            costs = ray.get(server.prepare_setup_work.remote(index))
            return [
                Task(
                    i,
                    float(cost),
                    lambda actor, i=i: actor.run_setup_work.remote(index, i, server.setup_work_item.remote(i)),
                )
                for i, cost in enumerate(costs)
            ]
        return []

    def _in_client_order(self, tasks: list[Task], fold) -> Any:
        """Run tasks; hand each result ref to `fold` strictly in client-id order, as soon as possible."""
        order = sorted(t.key for t in tasks)
        buffer: dict[int, Any] = {}
        position = 0
        for task, ref, info in self.pool.run(tasks):
            buffer[task.key] = ref
            while position < len(order) and order[position] in buffer:
                fold(buffer.pop(order[position]))
                position += 1
            yield task, ref, info

    def _round(self, server: Any, r: int, versions: np.ndarray) -> list[Row]:
        start = time.perf_counter()
        picked = self.algorithm.select_clients(r, len(self.train_clients), self.run.clients_per_round)
        selected = self.train_clients[picked]
        message = server.broadcast.remote()
        down_each_ref = server.message_nbytes.remote()  # read after the round: no wait before the tasks go out
        server.begin_round.remote()
        tasks = [
            Task(
                start,
                float(self.train_sizes[chunk].sum()),
                lambda actor, chunk=chunk, start=start: actor.train_many.remote(
                    [int(c) for c in chunk], start, r, message, [int(versions[c]) for c in chunk]
                ),
                label=f"round {r}, clients {', '.join(str(int(c)) for c in chunk)}",
            )
            for start, chunk in train_chunks(
                selected,
                self.train_sizes[selected],
                tasks_per_actor(self.seconds_per_client, len(selected), self.pool.size) * self.pool.size,
            )
        ]
        rows: list[Row] = []
        bytes_up = 0
        peak = 0.0
        client_seconds = 0.0
        bar = self.progress.bar(len(selected), f"{self.name} · round {r}/{self.run.rounds}")
        for _, _, infos in self._in_client_order(tasks, lambda ref: server.fold.remote(ref)):
            for info in infos:
                cid = int(info["client_id"])
                versions[cid] = int(info["version"])
                bytes_up += int(info["bytes_up"])
                peak = max(peak, float(info["peak_rss_mb"]))
                client_seconds += float(info["seconds"])
                rows += [(cid, "train", name, float(value)) for name, value in info["metrics"].items()]
            bar.update(len(infos))
        bar.close()
        down_each, _ = ray.get([down_each_ref, server.finish_round.remote()])
        if len(selected):
            self.seconds_per_client = client_seconds / len(selected)
        rows.sort(key=lambda row: row[0])
        rows += [
            (RUN_LEVEL, "run", "bytes_up", float(bytes_up)),
            (RUN_LEVEL, "run", "bytes_down", float(down_each * len(selected))),
            (RUN_LEVEL, "run", "clients", float(len(selected))),
            (RUN_LEVEL, "run", "train_tasks", float(len(tasks))),
            (RUN_LEVEL, "run", "client_peak_rss_mb", peak),
            (RUN_LEVEL, "run", "train_s", time.perf_counter() - start),
        ]
        return rows

    def _evaluate(self, server: Any, r: int, versions: np.ndarray) -> list[Row]:
        start = time.perf_counter()
        message = server.broadcast.remote()
        clients = self.eval_clients
        chunks = eval_chunks(clients)
        test_sizes = self.partition.sizes("test") + self.partition.sizes("val")
        tasks = [
            Task(
                int(chunk[0]),
                float(test_sizes[chunk].sum()),
                lambda actor, chunk=chunk: _submit_eval(actor, chunk, r, message, versions, self.cfg.eval.batch_size),
            )
            for chunk in chunks
            if len(chunk)
        ]
        batch = self.cfg.eval.batch_size
        epochs = resolved(self.cfg.eval.new_client_epochs, "eval.new_client_epochs")
        tasks += [
            Task(
                ("new", int(cid)),
                float(self.train_sizes[cid] * max(epochs, 1)),
                lambda actor, cid=int(cid): _twice(actor.evaluate_new_clients.remote([cid], r, message, epochs, batch)),
            )
            for cid in self.holdout
        ]
        rows: list[Row] = []
        refs = [ref for _, ref, _ in self.pool.run(tasks)]
        for chunk_rows in ray.get(refs):
            rows.extend(chunk_rows)
        rows.sort(key=lambda row: (row[0], row[1], row[2]))
        rows.append((RUN_LEVEL, "run", "eval_s", time.perf_counter() - start))
        self.progress.report_round(self.name, self.seed, r, rows)
        return rows


TASKS_PER_ACTOR = 4  # at most, per client actor and round: enough for size-aware dispatch to balance
MIN_TASK_SECONDS = 0.2  # client work a task should carry: its fixed cost (~8 ms) then stays under ~4 %


def tasks_per_actor(seconds_per_client: float | None, clients: int, actors: int) -> int:
    """Training tasks per actor this round: TASKS_PER_ACTOR unless that would leave a task less than
    MIN_TASK_SECONDS of client work (by the last round's mean update), down to one.

    A task costs about 8 ms besides its clients (storing its partial sums, 2-4 float64 vectors,
    and fetching its arguments; `make bench-timeline`): at 10,000 clients a task of 12.5 one-step
    updates spent about 15 % of its time on that. More tasks balance uneven clients (and uneven
    actors) better. The cut never changes the numbers (algorithms/aggregation.py), so it may
    follow measured times."""
    if seconds_per_client is None:  # nothing measured yet (the first round, or the first after a resume)
        return TASKS_PER_ACTOR
    work = seconds_per_client * clients / max(actors, 1)
    return max(1, min(TASKS_PER_ACTOR, int(work / MIN_TASK_SECONDS)))


def train_chunks(clients: np.ndarray, costs: np.ndarray, tasks: int) -> list[tuple[int, np.ndarray]]:
    """A round's training tasks: `tasks` consecutive runs of the id-sorted selected clients, of
    about equal cost, each with the position of its first client in the round.

    An actor trains a run and sums its updates itself, so a round costs one round trip and one
    server merge per task rather than per client. The cut may follow the pool size: the sums
    are taken over a fixed tree of client positions (algorithms/aggregation.py), so any cut
    gives the same bits."""
    n = len(clients)
    if n == 0:
        return []
    tasks = max(1, min(tasks, n))
    cumulative = np.cumsum(np.asarray(costs, dtype=np.float64) + 1e-9)
    bounds = np.searchsorted(cumulative, cumulative[-1] * np.arange(1, tasks) / tasks, side="right")
    edges = np.unique(np.concatenate([[0], np.clip(bounds, 1, n - 1), [n]]))
    return [(int(a), clients[a:b]) for a, b in itertools.pairwise(edges)]


def eval_chunks(clients: np.ndarray, tasks: int = 8, max_size: int = 32) -> list[np.ndarray]:
    """Evaluation tasks: a chunk's clients share one batched pass under the global model, so the
    chunks depend only on the clients (never on the pool size: the same batches, the same
    numbers), about `tasks` of them to keep actors busy, at most `max_size` clients each."""
    if len(clients) == 0:
        return []
    size = min(max_size, max(1, len(clients) // tasks))
    return [clients[i : i + size] for i in range(0, len(clients), size)]


def _twice(ref: Any) -> tuple[Any, Any]:
    """A single-return task as the pool's (result, info) pair: the rows serve as both."""
    return ref, ref


def _submit_eval(actor: Any, chunk: np.ndarray, r: int, message: Any, versions: np.ndarray, batch_size: int):
    ids = [int(c) for c in chunk]
    return _twice(actor.evaluate.remote(ids, r, message, [int(versions[c]) for c in ids], batch_size))
