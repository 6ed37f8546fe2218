"""Named random streams: one seed sequence per (seed, purpose, ...) tuple, for numpy and torch alike.

Every random draw in a run comes from a stream keyed by what it is for (the run seed, a
round, a client, a purpose string), never from a shared global RNG, so results do not depend
on which actor ran what or in which order tasks finished. One keying rule serves both
libraries: :func:`stream_rng` gives a numpy ``Generator`` and :func:`stream_seed` an integer
seed for ``torch.Generator.manual_seed``; both go through the same ``SeedSequence`` over the
same words. For non-negative integer parts ``stream_rng(a, b)`` is exactly
``np.random.default_rng([a, b])``.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["stream_rng", "stream_seed"]

Part = int | str


def _words(parts: tuple[Part, ...]) -> list[int]:
    """Integers as they are (sign dropped: SeedSequence takes non-negative words); strings by hash."""
    if not parts:
        raise ValueError("a random stream needs at least one part (the run seed)")
    words = []
    for p in parts:
        if isinstance(p, bool) or not isinstance(p, int | str):
            raise TypeError(f"random stream parts are ints or strings, got {p!r}")
        words.append(
            abs(p) if isinstance(p, int) else int.from_bytes(hashlib.sha256(p.encode()).digest()[:4], "little")
        )
    return words


def _sequence(parts: tuple[Part, ...]) -> np.random.SeedSequence:
    return np.random.SeedSequence(_words(parts))


def stream_rng(*parts: Part) -> np.random.Generator:
    """A numpy Generator for the stream named by ``parts`` (e.g. ``seed, round, "selection"``)."""
    return np.random.default_rng(_sequence(parts))


def stream_seed(*parts: Part) -> int:
    """A 63-bit integer seed for the stream named by ``parts`` (for ``torch.Generator.manual_seed``)."""
    return int(_sequence(parts).generate_state(1, np.uint64)[0]) >> 1
