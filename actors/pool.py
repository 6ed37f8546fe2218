"""A pool of ClientActors with size-aware dispatch, retries and replacement of dead actors.

Tasks are handed out largest-first (longest-processing-time rule) to whichever actor frees up,
so one actor never ends a round with all the big clients. A task that fails because its actor
died is resubmitted to a fresh actor; a task that raises is retried once elsewhere, then the
error is raised with the client it concerns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

log = logging.getLogger(__name__)


@dataclass
class Task:
    """One unit of work: `submit(actor)` returns (result_ref, info_ref); `cost` orders dispatch;
    `label` names it in errors (e.g. the clients it trains)."""

    key: Any
    cost: float
    submit: Callable[[Any], tuple[Any, Any]]
    label: str = ""
    attempts: int = 0
    tried_on: set[int] = field(default_factory=set)


class ClientTaskError(RuntimeError):
    """A client task failed on two actors: the error is in the algorithm or the data, not the actor."""


class ActorPool:
    def __init__(self, make_actor: Callable[[], Any], size: int, inflight: int = 2) -> None:
        self._make_actor = make_actor
        self.actors = [make_actor() for _ in range(size)]
        self.inflight = inflight
        self._setup_calls: list[tuple[str, tuple, dict]] = []  # actors start in the background; the first call waits

    @property
    def size(self) -> int:
        return len(self.actors)

    def setup(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Call `method` on every actor and remember it, so replacement actors are set up alike."""
        self._setup_calls = [c for c in self._setup_calls if c[0] != method] + [(method, args, kwargs)]
        ray.get([getattr(a, method).remote(*args, **kwargs) for a in self.actors])

    def _replace(self, slot: int) -> None:
        log.warning("client actor %d died; starting a replacement", slot)
        try:
            ray.kill(self.actors[slot])
        except Exception:  # noqa: BLE001 - it is already gone
            pass
        actor = self._make_actor()
        ray.get([getattr(actor, m).remote(*a, **k) for m, a, k in self._setup_calls] or [actor.ping.remote()])
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
                log.warning("task %s failed (%s); retrying on another actor", task.label or task.key,
                            type(exc).__name__)
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
