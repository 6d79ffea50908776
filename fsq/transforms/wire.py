"""The wire format of a message: its channels, shaped like the gradient, and its totals.

A worker's message (its channels, each a tree shaped like the gradient, scaled by the
message's weight) and its :class:`~fsq.transforms.message.Totals` (a delivery count and
other bookkeeping) travel together as a :class:`Row`. Sums of messages are messages, so
one row of the in-flight buffer holds the sum of everything due at one step, and one
all-reduce of one row delivers it: a single collective per step (XLA merges the
all-reduces of a row's leaves into one), however many leaves the model has.

Every leaf keeps its parameter's shape, so a row is laid out, and sharded, like the
parameters: nothing is ever flattened into one vector, which would gather a sharded model
onto every device (:mod:`fsq.parallel`).

Example:
  >>> import jax.numpy as jnp, fsq
  >>> from fsq.transforms import wire
  >>> m = fsq.transforms.new_message({"w": jnp.array([1.0, 2.0])}, 3, jnp.float32)
  >>> row = wire.parts(m._replace(weight=jnp.float32(0.5)), jnp.float32)
  >>> print(row.channels[0]["w"])  # 0.5 g
  [0.5 1. ]
  >>> print(row.totals)  # count, staleness, bounded, weight, rejected, lost, discarded
  [1.  3.  0.  0.5 0.  0.  0. ]
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fsq import _sharding
from fsq.transforms.message import Message, Totals, totals_of

NUM_TOTALS = len(Totals._fields)


class _Text(str):
    def __repr__(self) -> str:
        return str(self)


def summary(buffer: NamedTuple) -> str:
    """``buffer``'s repr with each array as its dtype and shape (``float32[17, 1, 3]``),
    not its values: messages in flight are large, and an error that prints the state
    (``optax.tree.get``'s, for one) should stay readable."""

    def one(x):
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return _Text(f"{jnp.dtype(x.dtype).name}{list(x.shape)}")
        return x

    fields = (f"{name}={jax.tree.map(one, value)!r}" for name, value in buffer._asdict().items())
    return f"{type(buffer).__name__}({', '.join(fields)})"


class Row(NamedTuple):
    """A message, or a sum of messages, as it travels and as the in-flight buffer holds it.

    Attributes:
      channels: trees shaped like the gradient, one per channel; every leaf may have
        leading axes (the buffer's rows, the workers kept apart), the same for all.
      totals: the :class:`~fsq.transforms.message.Totals`, stacked on a last axis of 7.
    """

    channels: tuple[optax.Updates, ...]
    totals: jax.Array

    def __repr__(self) -> str:
        return summary(self)


def parts(message: Message, dtype: jnp.dtype) -> Row:
    """The message as it travels, in ``dtype``: its channels scaled by its weight, and its
    totals. Each leaf can be added into a row of the in-flight buffer where it is
    computed, without first building the whole message (a pass over the message less).

    A message that is not sent travels as zeros: a select, not a multiply (``0 * NaN`` is
    NaN), fused into whatever consumes the leaf.
    """
    weight = message.weight.astype(dtype)
    channels = tuple(
        jax.tree.map(lambda x: jnp.where(message.sent, weight * x.astype(dtype), 0), tree)
        for tree in message.channels
    )
    return Row(channels, jnp.stack(totals_of(message, dtype)))


def like(updates: optax.Updates, num_channels: int, dtype: jnp.dtype, totals_dtype: jnp.dtype):
    """The shapes of a row of ``num_channels`` channels shaped like ``updates``, held in
    ``dtype`` (``jax.ShapeDtypeStruct`` leaves; the totals in ``totals_dtype``)."""
    channel = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), dtype, sharding=_sharding.typed(x)), updates
    )
    return Row((channel,) * num_channels, jax.ShapeDtypeStruct((NUM_TOTALS,), totals_dtype))


def totals(row: Row) -> Totals:
    """The :class:`Totals` of a row (each ``row.totals[..., k]``)."""
    return Totals(*jnp.moveaxis(row.totals, -1, 0))


def matches(updates: optax.Updates, row: Row, leading: int) -> bool:
    """Whether ``row``'s channels (leaves with ``leading`` leading axes) are shaped like
    ``updates``."""
    want = [jnp.shape(x) for x in jax.tree.leaves(updates)]
    if jax.tree.structure(row.channels[0]) != jax.tree.structure(updates):
        return False
    return all(
        [x.shape[leading:] for x in jax.tree.leaves(channel)] == want for channel in row.channels
    )
