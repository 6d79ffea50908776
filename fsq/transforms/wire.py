"""The wire format of a message: its channels and totals packed into one flat row.

A worker's message (its channels, each a tree shaped like the gradient, scaled by the
message's weight) and its :class:`~fsq.transforms.message.Totals` (a delivery count and
other bookkeeping) travel as a single flat vector. Sums of messages are messages, so one
row of the in-flight buffer holds the sum of everything due at one step, and one
all-reduce of one row delivers it: a single collective per step, however many leaves the
model has.

Example:
  >>> import jax.numpy as jnp, fsq
  >>> from fsq.transforms import wire
  >>> m = fsq.transforms.new_message({"w": jnp.array([1.0, 2.0])}, 3, jnp.float32)
  >>> row = jnp.concatenate(wire.parts(m._replace(weight=jnp.float32(0.5)), jnp.float32))
  >>> print(row)  # 0.5 g; count, staleness, bounded, weight, rejected, lost, discarded
  [0.5 1.  1.  3.  0.  0.5 0.  0.  0. ]
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fsq.transforms.message import Message, Totals, totals_of

NUM_TOTALS = len(Totals._fields)


def width(like: optax.Updates, num_channels: int) -> int:
    """Length of a message's row: ``num_channels`` trees shaped like ``like`` and its totals."""
    return num_channels * sum(int(np.size(x)) for x in jax.tree.leaves(like)) + NUM_TOTALS


def parts(message: Message, dtype: jnp.dtype) -> list[jax.Array]:
    """The pieces of a message's row, in order: the leaves of its channels, flat and scaled
    by its weight, then its totals. Their concatenation is the row; kept apart, each can be
    added into a row of the in-flight buffer where it is computed, without first building
    the message (a pass over the message less).

    A message that is not sent travels as zeros: a select, not a multiply (``0 * NaN`` is
    NaN), fused into whatever consumes the piece.
    """
    weight = message.weight.astype(dtype)
    pieces = [
        jnp.where(message.sent, weight * jnp.ravel(x).astype(dtype), 0)
        for tree in message.channels
        for x in jax.tree.leaves(tree)
    ]
    pieces.append(jnp.stack(totals_of(message, dtype)))
    return pieces


def unpack(
    read: Callable[[int, int], jax.Array], like: optax.Updates, num_channels: int
) -> tuple[optax.Updates, ...]:
    """Inverse of concatenating :func:`parts`: ``num_channels`` trees shaped like ``like``,
    from ``read(start, size)``, the row's entries ``start .. start + size`` (with any
    leading axes: ``read`` may return ``[..., size]``, which every leaf then has too).

    The trees keep the row's dtype, so sums can be rescaled before any rounding.
    """
    leaves, treedef = jax.tree.flatten(like)
    channels, offset = [], 0
    for _ in range(num_channels):
        pieces = []
        for x in leaves:
            entries = read(offset, x.size)
            pieces.append(entries.reshape(entries.shape[:-1] + x.shape))
            offset += x.size
        channels.append(jax.tree.unflatten(treedef, pieces))
    return tuple(channels)


def unpack_rows(
    rows: jax.Array, like: optax.Updates, num_channels: int
) -> tuple[tuple[optax.Updates, ...], Totals]:
    """:func:`unpack` of ``[n, width]`` rows (one per worker): trees whose leaves have a
    leading axis of ``n``, and the rows' :class:`Totals` (``[n]`` each)."""
    channels = unpack(lambda start, size: rows[:, start : start + size], like, num_channels)
    return channels, Totals(*rows[:, -NUM_TOTALS:].T)
