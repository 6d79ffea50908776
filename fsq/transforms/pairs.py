r"""Sparse messages in flight as the wire carries them: (position, value) pairs, by send step.

With a sparse compressor (:func:`fsq.compression.top_k`, :func:`~fsq.compression.random_k`)
a message is :math:`k \ll P` kept entries. Holding the sums due at each step densely
(:mod:`fsq.transforms.ring`) costs :math:`R \times C \times P` numbers per device;
holding each message as its pairs costs :math:`R \times L \times (k(C + 1) + 8)`, for
:math:`L` workers on the device: far less when :math:`L k (C + 1) < C P`. Row
:math:`s \bmod R` holds the messages sent at step :math:`s` (each worker's positions, its
channels' values there, its totals and the step it is due), overwritten :math:`R = d_{\max}
+ 1` steps later, when every one of them has been delivered. The row due at step
:math:`t` is formed when it is delivered:

.. math:: \text{due}_t = \sum_{(s, i):\, s + d_i(s) = t} \operatorname{scatter}(p_i(s), v_i(s)),

added in send order, then worker order: the order in which the dense buffer adds them,
so that both deliver the same sums, bit for bit. Positions are flat over the gradient's
leaves in order; with a compressor that keeps a fixed count per leaf (``per_leaf``) each
leaf's pairs are a fixed stretch of them, scattered into the leaf where its shards are.

Example:
  >>> import jax.numpy as jnp
  >>> from fsq.transforms import pairs, wire
  >>> buffer = pairs.init(max_delay=1, num_local=1, count=2, num_channels=1,
  ...                     dtype=jnp.float32, totals_dtype=jnp.float32)
  >>> buffer = pairs.write(buffer, jnp.int32(0), jnp.array([[3, 0]]),
  ...                      (jnp.array([[5.0, 7.0]]),), jnp.ones((1, 7)), jnp.array([1]))
  >>> like = wire.like(jnp.zeros(4), 1, jnp.float32, jnp.float32)
  >>> print(pairs.due(buffer, jnp.int32(1), like, None).channels[0])  # sent at 0, due at 1
  [7. 0. 0. 5.]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fsq.placement import PER_DEVICE
from fsq.transforms import ring
from fsq.transforms.wire import NUM_TOTALS, Row, summary

NOT_DUE = -1  # the due step of an empty slot


class Pairs(NamedTuple):
    """Sparse messages in flight from the workers of one device, by send step.

    Declared per device (:mod:`fsq.placement`), every field with the device's block on
    axis 0.

    Attributes:
      positions: ``[rows, L, k]`` int32, each message's kept positions (flat over the
        gradient's leaves in order); row ``s mod rows`` the messages sent at step ``s``.
      values: per channel, ``[rows, L, k]``: the channel's entries at those positions.
      totals: ``[rows, L, 7]``: each message's totals.
      due_at: ``[rows, L]`` int32: the step each message is due (``-1``: none).
    """

    positions: jax.Array
    values: tuple[jax.Array, ...]
    totals: jax.Array
    due_at: jax.Array
    placement = PER_DEVICE
    # On a sharded model each of a group's shards holds a part of every message's pairs.
    over_model_shards = ("positions", "values")

    def __repr__(self) -> str:
        return summary(self)


def padded(count: int, shards: int) -> int:
    """``count`` pairs a message, rounded up to a multiple of ``shards`` (the model shards
    that divide them); a padding pair adds zero at position 0."""
    return -(-count // shards) * shards


def init(
    max_delay: int,
    num_local: int,
    count: int,
    num_channels: int,
    dtype: jnp.dtype,
    totals_dtype: jnp.dtype,
    shards: int = 1,
) -> Pairs:
    """An empty buffer for ``num_local`` workers' messages of ``count`` pairs each, delays
    up to ``max_delay``; values stored in ``dtype``, totals in ``totals_dtype``; room for
    :func:`padded` pairs, so that ``shards`` model shards hold equal parts of them."""
    shape = (max_delay + 1, num_local, padded(count, shards))
    return Pairs(
        jnp.zeros(shape, jnp.int32),
        tuple(jnp.zeros(shape, dtype) for _ in range(num_channels)),
        jnp.zeros(shape[:2] + (NUM_TOTALS,), totals_dtype),
        jnp.full(shape[:2], NOT_DUE, jnp.int32),
    )


def nbytes(
    max_delay: int, num_local: int, count: int, num_channels: int, dtype, shards: int = 1
) -> int:
    """The bytes of :func:`init`'s buffer that one of ``shards`` model shards holds, totals
    in float32."""
    pair = 4 + num_channels * jnp.dtype(dtype).itemsize
    per_message = padded(count, shards) // shards * pair + 4 * NUM_TOTALS + 4
    return (max_delay + 1) * num_local * per_message


def write(
    buffer: Pairs,
    step: jax.Array,
    positions: jax.Array,
    values: Sequence[jax.Array],
    totals: jax.Array,
    delays: jax.Array,
    slots: jax.Array | None = None,
) -> Pairs:
    """The messages of the device's workers ``slots`` (``[n]`` local indices, ``None``:
    all of them, in order) sent at ``step`` (``[n, k]`` positions and values per channel,
    ``[n, 7]`` totals, ``[n]`` delays), in row ``step mod rows``; a worker not among them
    sends nothing at ``step``."""
    row = step % buffer.due_at.shape[0]
    num_local = buffer.due_at.shape[1]
    if slots is None:
        slots = jnp.arange(num_local)

    def put(x, new):
        whole = jnp.zeros(x.shape[1:], x.dtype)
        whole = whole.at[slots, ..., : new.shape[-1]].set(new.astype(x.dtype))
        at = (row,) + (jnp.int32(0),) * (x.ndim - 1)
        return ring.update_slice(x, whole[None], at)

    due_at = jnp.full((num_local,), NOT_DUE, jnp.int32).at[slots].set(step + delays)
    return Pairs(
        put(buffer.positions, positions),
        tuple(put(x, v) for x, v in zip(buffer.values, values, strict=True)),
        put(buffer.totals, totals),
        lax.dynamic_update_index_in_dim(buffer.due_at, due_at, row, 0),
    )


def _stretches(sizes: Sequence[int] | None, like: Sequence[jax.ShapeDtypeStruct]):
    """``(start, count, offset)`` of each leaf's stretch of the pairs (``None`` without
    fixed counts per leaf)."""
    if sizes is None:
        return None
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    offsets = np.concatenate([[0], np.cumsum([int(np.prod(x.shape)) for x in like])]).astype(int)
    return [(starts[j], sizes[j], offsets[j]) for j in range(len(sizes))]


def scatter(
    like: Row, positions: jax.Array, values: Sequence[jax.Array], sizes: Sequence[int] | None
) -> tuple:
    """The channels (trees shaped like ``like``'s, in ``values``' dtype) of the pairs
    ``positions`` (``[n, k]``) and ``values`` (per channel ``[n, k]``) added into zeros, in
    the pairs' order."""
    channels = []
    for channel, value in zip(like.channels, values, strict=True):
        leaves, treedef = jax.tree.flatten(channel)
        stretches = _stretches(sizes, leaves)
        if stretches is None:  # positions anywhere: one scatter into the whole gradient
            flat = jnp.zeros(sum(int(np.prod(x.shape)) for x in leaves), value.dtype)
            flat = flat.at[positions].add(value)
            offsets = np.cumsum([0] + [int(np.prod(x.shape)) for x in leaves])
            ends = zip(offsets[:-1], offsets[1:], strict=True)
            dense = [flat[a:b].reshape(x.shape) for x, (a, b) in zip(leaves, ends, strict=True)]
        else:  # each leaf's own stretch, scattered where the leaf's shards are
            dense = []
            for x, (start, count, offset) in zip(leaves, stretches, strict=True):
                local = positions[:, start : start + count] - offset
                shape = x.shape or (1,)  # a scalar leaf as one entry
                zeros = jnp.zeros(shape, value.dtype)
                added = zeros.at[jnp.unravel_index(local, shape)].add(
                    value[:, start : start + count]
                )
                dense.append(added.reshape(x.shape))
        channels.append(treedef.unflatten(dense))
    return tuple(channels)


def due(buffer: Pairs, step: jax.Array, like: Row, sizes: Sequence[int] | None) -> Row:
    """The sum of the messages due at ``step``: a :class:`~fsq.transforms.wire.Row` shaped
    like ``like``, in the totals' dtype (the dtype sums are formed in), added in send
    order, then worker order."""
    rows, num_local, count = buffer.positions.shape
    order = (step + 1 + jnp.arange(rows)) % rows  # the oldest send step first
    mask = (buffer.due_at[order] == step).reshape(rows * num_local)
    positions = buffer.positions[order].reshape(rows * num_local, count)
    dtype = buffer.totals.dtype
    values = [
        jnp.where(mask[:, None], v[order].reshape(rows * num_local, count).astype(dtype), 0)
        for v in buffer.values
    ]
    totals = jnp.where(mask[:, None], buffer.totals[order].reshape(rows * num_local, -1), 0)
    summed, _ = lax.scan(lambda acc, x: (acc + x, None), jnp.zeros_like(totals[0]), totals)
    return Row(scatter(like, positions, values, sizes), summed)
