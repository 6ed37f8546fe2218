"""A pool of ClientActors with size-aware dispatch, retries and replacement of dead actors.

Tasks are handed out largest-first (longest-processing-time rule) to whichever actor frees up,
so one actor never ends a round with all the big clients. A task that fails because its actor
died is resubmitted to a fresh actor; a task that raises is retried once elsewhere, then the
error is raised with the client it concerns.

A dead *node* is another matter: the results its actors had finished may be lost with its
object store before the server fetched them, so the round cannot be trusted. The pool knows
which nodes its actors live on; when one of them dies it raises NodeLostError (sim/orchestration/runner.py
then drops that node's actors and resumes from the last checkpoint).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from sim.errors import ResourceError, UserError

log = logging.getLogger(__name__)


@dataclass
class Task:
    """One unit of work: `submit(actor)` returns (result_ref, info_ref); `cost` orders dispatch;
    `label` names it in errors (e.g. the clients it trains)."""

    key: Any
    cost: float
    submit: Callable[
        ..., tuple[Any, Any]
    ]  # called with the actor; `...` admits lambdas binding loop values as defaults
    label: str = ""
    attempts: int = 0
    tried_on: set[int] = field(default_factory=set)


class ClientTaskError(UserError, RuntimeError):
    """A client task failed on two actors: the error is in the algorithm or the data, not the actor."""


class NodeLostError(RuntimeError):
    """A Ray node that held client actors died."""

    def __init__(self, nodes: set[str]) -> None:
        super().__init__(f"Ray node {', '.join(sorted(n[:12] for n in nodes))} died")
        self.nodes = nodes


REPLACEMENT_TIMEOUT_S = 120.0  # a replacement actor that cannot be placed for this long: the cluster has shrunk


def _node_of(actor: Any) -> str:
    """Runs inside the actor (via __ray_call__): the id of the node it lives on."""
    return ray.get_runtime_context().get_node_id()


def alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


class ActorPool:
    def __init__(self, make_actor: Callable[[], Any], size: int, inflight: int = 2) -> None:
        self._make_actor = make_actor
        self.actors = [make_actor() for _ in range(size)]
        self.inflight = inflight
        self._setup_calls: list[tuple[str, tuple, dict]] = []  # actors start in the background; the first call waits
        self._node_refs: dict[Any, Any] = {a: a.__ray_call__.remote(_node_of) for a in self.actors}
        self._nodes: dict[Any, str] = {}  # actor handle -> node id

    def nodes(self) -> dict[Any, str]:
        """Actor -> node id, for every actor of the pool (waits for actors still starting)."""
        for actor in self.actors:
            if actor not in self._nodes:
                try:
                    self._nodes[actor] = ray.get(self._node_refs[actor])
                except RayActorError:
                    self._nodes[actor] = ""  # died before saying where: its tasks meet the death themselves
        return {a: self._nodes[a] for a in self.actors}

    def check_nodes(self) -> None:
        """Raise NodeLostError if a node holding one of the pool's actors has died."""
        dead = set(self.nodes().values()) - alive_nodes() - {""}
        if dead:
            raise NodeLostError(dead)

    def drop_lost(self) -> int:
        """Forget the actors of dead nodes (their resources are gone with the node); returns how many."""
        alive = alive_nodes()
        nodes = self.nodes()
        lost = [a for a in self.actors if nodes[a] and nodes[a] not in alive]
        self.actors = [a for a in self.actors if a not in lost]
        for actor in lost:
            self._nodes.pop(actor, None)
            self._node_refs.pop(actor, None)
        return len(lost)

    def grow(self, n: int) -> None:
        """Add `n` actors, set up like the others (after a node loss, if the cluster has room again)."""
        for _ in range(n):
            actor = self._make_actor()
            self._node_refs[actor] = actor.__ray_call__.remote(_node_of)
            ray.get([getattr(actor, m).remote(*a, **k) for m, a, k in self._setup_calls] or [actor.ping.remote()])
            self.actors.append(actor)

    def resize(self, n: int) -> None:
        """`n` actors, for a new comparison: the newest go (killed) or fresh ones join. What the
        last comparison set up is forgotten: the new one sets every actor up again."""
        self._setup_calls = []
        for actor in self.actors[n:]:
            with contextlib.suppress(Exception):
                ray.kill(actor)
            self._nodes.pop(actor, None)
            self._node_refs.pop(actor, None)
        self.actors = self.actors[:n]
        for _ in range(n - len(self.actors)):  # they start in the background; the first call waits
            actor = self._make_actor()
            self._node_refs[actor] = actor.__ray_call__.remote(_node_of)
            self.actors.append(actor)

    @property
    def size(self) -> int:
        return len(self.actors)

    def setup(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Call `method` on every actor and remember it, so replacement actors are set up alike."""
        self._setup_calls = [c for c in self._setup_calls if c[0] != method] + [(method, args, kwargs)]
        ray.get([getattr(a, method).remote(*args, **kwargs) for a in self.actors])

    def _replace(self, slot: int) -> None:
        self.check_nodes()  # its node died: no replacement can take its place there
        log.warning("client actor %d died; starting a replacement", slot)
        with contextlib.suppress(Exception):
            ray.kill(self.actors[slot])
        actor = self._make_actor()
        ready = [getattr(actor, m).remote(*a, **k) for m, a, k in self._setup_calls] or [actor.ping.remote()]
        deadline = time.monotonic() + REPLACEMENT_TIMEOUT_S
        while len(ray.wait(ready, num_returns=len(ready), timeout=5.0)[0]) < len(ready):
            self.check_nodes()  # a node declared dead while the replacement waited for room
            if time.monotonic() > deadline:
                ray.kill(actor)
                raise ResourceError(
                    f"a replacement for a dead client actor found no room on the Ray cluster "
                    f"in {REPLACEMENT_TIMEOUT_S:.0f}s; resume the run when the cluster has room"
                )
        ray.get(ready)
        self._nodes.pop(self.actors[slot], None)
        self._node_refs.pop(self.actors[slot], None)
        self._node_refs[actor] = actor.__ray_call__.remote(_node_of)
        self.actors[slot] = actor

    def run(self, tasks: Sequence[Task]) -> Iterator[tuple[Task, Any, dict]]:
        """Yield (task, result_ref, info) as tasks complete, largest tasks dispatched first."""
        pending = sorted(tasks, key=lambda t: (-t.cost, str(t.key)))
        pending.reverse()  # pop() from the end takes the largest
        running: dict[Any, tuple[Task, int, Any, Any]] = {}  # info_ref -> (task, slot, result_ref, actor)
        load = [0] * len(self.actors)

        def dispatch() -> None:
            while pending:
                task = pending[-1]
                slot = min(range(len(self.actors)), key=lambda s: (load[s], s in task.tried_on, s))
                if load[slot] >= self.inflight:
                    return
                pending.pop()
                task.attempts += 1
                task.tried_on.add(slot)
                actor = self.actors[slot]
                result_ref, info_ref = task.submit(actor)
                running[info_ref] = (task, slot, result_ref, actor)
                load[slot] += 1

        self.check_nodes()  # a node lost since the last call may have taken results of that call with it
        dispatch()
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            task, slot, result_ref, actor = running.pop(ready[0])
            load[slot] -= 1
            try:
                info = ray.get(ready[0])
            except RayTaskError as exc:
                if task.attempts >= 2:
                    raise ClientTaskError(f"task {task.label or task.key} failed twice: {exc}") from exc
                log.warning(
                    "task %s failed (%s); retrying on another actor", task.label or task.key, type(exc).__name__
                )
                pending.append(task)
                dispatch()
                continue
            except (ActorDiedError, ActorUnavailableError, RayActorError):
                if self.actors[slot] is actor:  # the first of its tasks to notice: replace it once
                    self._replace(slot)
                task.attempts -= 1  # the actor's death is not the task's fault
                pending.append(task)
                dispatch()
                continue
            dispatch()
            yield task, result_ref, info
