"""Client and server actors kept warm between the comparisons of one driver process.

A sweep, a tune or a test session runs many comparisons on one Ray. Starting the actors costs
each comparison seconds (a process per actor, torch and the algorithms' libraries imported,
the dataset mapped), often more than a small comparison's rounds. Inside `keeping_actors()`, a
comparison that ends cleanly parks its actors here, and the next one takes them when it would
have started actors like them (same per-actor resources, dataset and server threads, same Ray
session; a pool of another size is grown or cut to the new plan); otherwise they are killed
before it plans. Numbers do not change: every task is seeded by
(seed, round, client), never by what its actor ran before (the engine's pool-size tests).

Parked actors hold their Ray resources, so anything else that needs the cluster (a subprocess
attached to the same Ray) calls `release()` first; leaving the outermost `keeping_actors()`
releases them too.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray

from actors.pool import ActorPool

PING_TIMEOUT_S = 30.0


@dataclass
class WarmActors:
    session: tuple[str, str]  # (GCS address, job id): actor handles are valid only there
    plan: Any  # the PoolPlan the actors were started for
    dataset_key: str
    server_threads: int | None
    dataset_ref: Any  # the dataset the client actors were built with (kept alive with them)
    pool: ActorPool
    server: Any

    def claims(self) -> dict[str, float]:
        plan = self.plan
        return {
            "CPU": self.pool.size * plan.num_cpus + plan.server_num_cpus,
            "GPU": self.pool.size * plan.num_gpus + plan.server_num_gpus,
        }


_parked: WarmActors | None = None
_depth = 0


def session() -> tuple[str, str]:
    ctx = ray.get_runtime_context()
    return str(ctx.gcs_address), str(ctx.get_job_id())


def keeping() -> bool:
    return _depth > 0


@contextlib.contextmanager
def keeping_actors() -> Iterator[None]:
    """Comparisons run inside keep their actors warm for the next; nested uses share one scope."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            release()


def _ours() -> WarmActors | None:
    """The parked actors if they belong to the Ray this process is connected to now."""
    global _parked
    if _parked is not None and (not ray.is_initialized() or _parked.session != session()):
        _parked = None  # that Ray is gone, and its actors with it
    return _parked


def with_parked(available: dict[str, float]) -> dict[str, float]:
    """`available` plus what the parked actors hold: what a new comparison can plan with."""
    warm = _ours()
    if warm is None:
        return dict(available)
    out = dict(available)
    for name, amount in warm.claims().items():
        out[name] = out.get(name, 0.0) + amount
    return out


def park(warm: WarmActors) -> None:
    global _parked
    release()
    _parked = warm


def take(plan: Any, dataset_key: str, server_threads: int | None) -> WarmActors | None:
    """The parked actors, resized to `plan`, if they are like the ones this comparison would
    start (and all answer); otherwise they are killed and None is returned."""
    global _parked
    warm = _ours()
    if warm is None:
        return None
    like = dataclasses.replace(warm.plan, size=plan.size) == plan
    if like and (warm.dataset_key, warm.server_threads) == (dataset_key, server_threads):
        refs = [actor.ping.remote() for actor in [warm.server, *warm.pool.actors]]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=PING_TIMEOUT_S)
        if len(ready) == len(refs):
            with contextlib.suppress(Exception):
                ray.get(ready)
                _parked = None
                warm.pool.resize(plan.size)
                warm.plan = plan
                return warm
    release()
    return None


def release() -> None:
    """Kill the parked actors (their resources go back to the cluster)."""
    global _parked
    warm, _parked = _ours(), None
    if warm is None:
        return
    for actor in [*warm.pool.actors, warm.server]:
        with contextlib.suppress(Exception):
            ray.kill(actor)
