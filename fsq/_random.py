"""Keys for the random events of a run, as a pure function of (seed, stream, step, worker).

Every random choice of a simulated run (a delay, a fault, a random-k mask) is drawn from
``fold_in(fold_in(fold_in(key(seed), stream), step), worker)`` with the *logical* worker id,
never a device index, so a run is the same whatever the number of devices it is spread on.
Distinct streams keep the kinds of event independent of each other.
"""

from __future__ import annotations

import enum

import jax


class Stream(enum.IntEnum):
    """Independent random streams of one run."""

    DELAY = 0
    FAULT = 1
    COMPRESSION = 2
    NOISE = 3
    COMPUTE = 4


def event_key(seed: int, stream: Stream, step: jax.Array, worker: jax.Array) -> jax.Array:
    """The key of the event ``stream`` of ``worker`` at logical ``step``."""
    key = jax.random.fold_in(jax.random.key(seed), int(stream))
    return jax.random.fold_in(jax.random.fold_in(key, step), worker)
