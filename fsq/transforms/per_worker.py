r"""Truly per-worker state: one vector per worker, stored per device.

Most of Flying Squirrel's state is the same on every worker (the inner optimizer's) or
shared by the workers of a device (the in-flight buffer, :mod:`fsq.transforms.delivery`).
A few pieces are each worker's own: the error-feedback residual of compression, the
worker-side momentum of robust aggregation. They are stored as one ``[W / D, P]`` block
per device, row ``j`` belonging to the device's local worker ``j``: a worker reads its
row, and the rows it and its neighbours write are gathered back over the local (vmap)
axes, which is free, so every worker of a device returns the same block, as
:mod:`fsq.parallel` expects of per-device state.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fsq import _axes


class PerWorker(NamedTuple):
    """A flattened, gradient-sized vector per worker of one device.

    Attributes:
      rows: ``[W / D, P]``; row ``j`` is local worker ``j``'s. Devices' blocks concatenate
        along axis 0 (``[W, P]`` over a whole mesh).
    """

    rows: jax.Array


def init(local: tuple[str, ...], size: int, dtype: jnp.dtype) -> PerWorker:
    """Zeros for the workers of this device (call inside the mapped context)."""
    return PerWorker(jnp.zeros((_axes.local_count(local), size), dtype))


def read(state: PerWorker, local: tuple[str, ...]) -> jax.Array:
    """This worker's row."""
    return state.rows[_axes.local_index(local)]


def write(row: jax.Array, local: tuple[str, ...]) -> PerWorker:
    """The device's block after every local worker wrote its ``row``."""
    return PerWorker(_axes.stack(row, local))
