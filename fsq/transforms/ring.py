r"""The in-flight buffer: messages wait in delivery rows until their step comes.

A message sent at step :math:`t` with delay :math:`d` is due at step :math:`t + d`. Sums
commute, so the buffer stores, for each step, the *sum* of the messages due then: a ring
of :math:`R = d_{\max} + 1` rows, row :math:`s \bmod R` holding what is due at step
:math:`s`. Synchronous training (:math:`d_{\max} = 0`) has no buffer at all. One buffer
serves all the workers of a device (its memory is :math:`(d_{\max} + 1) \times P`
whatever the number of workers) and holds only their partial sums. At step :math:`t`:

.. math::

  \text{slots}[(t + d_i) \bmod R] \leftarrow
  [\text{filled}_{(t + d_i) \bmod R}]\, \text{slots}[(t + d_i) \bmod R] + m_i, \qquad
  \text{due}_t = [\text{filled}_{t \bmod R}]\, \text{slots}[t \bmod R]

A row is a :class:`~fsq.transforms.wire.Row`: every leaf of the buffer is a leaf of the
message with the rows in front (``[R, segments, *shape]``), so the buffer is laid out and
sharded like the parameters. ``filled`` marks the rows that received a message since they
were last delivered; delivering a row clears its mark, and the next message into it
*replaces* what it held instead of adding to it. Emptying a row would be one more write
of it every step; the mark makes it a select fused into the next write and the next read.
A message with the largest delay :math:`d = d_{\max}` lands in the row delivered at
:math:`t - 1`; one with delay 0 lands in row :math:`t`, read right after. Every row is
read once before it is reused: nothing is lost or delivered twice. The due row is read
*after* the writes, so XLA updates the buffer in place.

The buffer may hold its messages in a narrower dtype than the one their sums are formed
in (``dtype`` of :func:`init`, e.g. bfloat16): each write adds in the sums' dtype and
rounds once when it stores; the totals (exact counts) keep the sums' dtype.

How the messages of a device's :math:`L` workers are written:

- :math:`L \le R`, or every message with the same delay (``alike``) and :math:`L \le 32`:
  each leaf of each worker's message is added into its place in the row where it is
  computed; the message is never built (with the same delay, the product below would
  build the device's :math:`L` messages and then rewrite every row for one that
  changes);
- :math:`L > R` otherwise: as a segment sum, :math:`\text{slots} \leftarrow [\text{kept}]\,
  \text{slots} + A M` with :math:`A_{r i} = [\text{row}_i = r]`: one matrix product and
  one pass over the ring per leaf, whose cost and compile time do not grow with :math:`L`
  beyond the product (cheaper than :math:`L` row updates once :math:`L` exceeds
  :math:`R`).

With a delay model that never gives delay 0 (``early``), the row due at :math:`t + 1` is
read after the writes of step :math:`t` and kept apart as ``due`` (the ring has
:math:`d_{\max}` rows plus ``due``, the same memory), so that step :math:`t + 1` can
deliver it without touching the ring first.

A robust aggregation needs each worker's messages apart: then a row holds the device's
:math:`L` workers side by side (``segments = L``: each worker's segment the sum of *its*
messages due that step, with its own mark).

Example:
  >>> import jax.numpy as jnp
  >>> from fsq.transforms import ring, wire
  >>> like = wire.like(jnp.zeros(3), 1, jnp.float32, jnp.float32)
  >>> buffer = ring.init(2, like)
  >>> message = wire.Row((jnp.ones((1, 3)),), jnp.ones((1, 7)))  # one worker's
  >>> due, buffer = ring.advance(buffer, jnp.int32(0), ring.add_messages(
  ...     message, jnp.array([1]), jnp.int32(0), False))  # sent at 0, due at 1
  >>> print(ring.read(due).channels[0][0], buffer.pending().channels[0][1, 0])
  [0. 0. 0.] [1. 1. 1.]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fsq import _sharding
from fsq._sharding import constrain
from fsq.placement import PER_DEVICE
from fsq.transforms.wire import Row, summary

# Up to this many workers per device (and at most the ring's rows, unless they all share
# a row), their messages are written by row updates; beyond, by a segment sum.
UNROLLED_WORKERS = 32


class InFlight(NamedTuple):
    """Messages in flight from the workers of one device, summed per due step.

    Identical on all workers of a device; different across devices (each holds its own
    workers' share): it is declared per device (:mod:`fsq.placement`), every field with
    the device's block on axis 0.

    Attributes:
      slots: a :class:`~fsq.transforms.wire.Row` whose leaves are ``[rows, segments,
        *shape]``: row ``s mod rows`` the sum of the messages due at step ``s`` where
        ``filled`` (per local worker, side by side, when messages are kept apart:
        ``segments`` is then ``W/D``, else 1); ``rows = max_delay + 1``, or
        ``max_delay`` when the due row is read early (0 without delays).
      filled: ``[rows, segments]`` bool, whether a row (each worker's segment) received a
        message since it was last delivered. What an unmarked row holds is stale: it
        reads as zeros.
      due: the row due at the coming step, read one step early (leaves ``[1, segments,
        *shape]``; delay models that never give delay 0), else ``None``.
    """

    slots: Row
    filled: jax.Array
    due: Row | None
    placement = PER_DEVICE

    def __repr__(self) -> str:
        return summary(self)

    def pending(self) -> Row:
        """The sums of the messages in flight, by due row (leaves ``[rows, segments,
        *shape]``, zeros where a row holds none); the row read early (``due``) is not
        included."""
        return _marked(self.slots, self.filled)


def _marked(row: Any, filled: jax.Array) -> Any:
    """``row``'s leaves (``[..., segments, *shape]``) where ``filled`` (``[...,
    segments]``) holds, zeros elsewhere."""

    def select(x):
        marks = filled.reshape(filled.shape + (1,) * (x.ndim - filled.ndim))
        return jnp.where(marks, x, 0)

    return jax.tree.map(select, row)


def init(max_delay: int, like: Row, early: bool = False, segments: int = 1) -> InFlight:
    """An empty buffer for delays up to ``max_delay`` and rows shaped like ``like`` (a
    :func:`~fsq.transforms.wire.like` row of shapes and dtypes), made of ``segments``
    workers' messages side by side; ``early``: read each due row one step ahead (see the
    module)."""
    rows = 0 if not max_delay else max_delay if early else max_delay + 1

    def zeros(count):
        return jax.tree.map(lambda x: _sharding.zeros((count, segments), x, x.dtype), like)

    due = zeros(1) if max_delay and early else None
    return InFlight(zeros(rows), jnp.zeros((rows, segments), jnp.bool_), due)


class Due(NamedTuple):
    """What is due at a step: row ``index`` of ``row`` (a :class:`~fsq.transforms.wire.Row`
    with leaves ``[rows, segments, *shape]``), where ``filled`` (``[segments]``, the
    marks of its segments; ``None``: all of it).

    Where delivery needs no collective, ``row`` is the in-flight buffer itself, so that
    the due row is read where it is used (:func:`read`) instead of being copied first; or,
    when the only message due is the one just sent (no delays, one worker), a function
    that computes it, called where it is read, so that XLA fuses its leaves into their
    use instead of writing them out first.
    """

    row: Row | Callable[[], Row]
    index: jax.Array
    filled: jax.Array | None = None


def as_due(row: Row) -> Due:
    """A due row made of ``row`` (leaves ``[segments, *shape]``), held on its own."""
    return Due(jax.tree.map(lambda x: x[None], row), jnp.int32(0))


def computed(due: Due) -> Due:
    """``due`` with its row computed, once, in the current scope: call it where the row is
    read (for a message read where it is used, inside the inner step's branch)."""
    return due._replace(row=due.row()) if callable(due.row) else due


def read(due: Due, select: Callable[[Row], Any] = lambda row: row) -> Any:
    """The due row, leaves ``[segments, *shape]`` (zeros in the segments not filled), or
    the part of it that ``select`` picks (e.g. ``lambda row: row.totals``), read alone."""
    due = computed(due)
    index = jnp.asarray(due.index, jnp.int32)
    part = select(due.row)

    def row(x):
        at = (index,) + (jnp.int32(0),) * (x.ndim - 1)
        return read_slice(x, at, (1, *x.shape[1:]))[0]

    part = jax.tree.map(row, part)
    return part if due.filled is None else _marked(part, due.filled)


Write = Callable[[Row, jax.Array, int], tuple[Row, jax.Array]]


def advance(
    in_flight: InFlight, step: jax.Array, write: Write, lazy: bool = True
) -> tuple[Due, InFlight]:
    """One step of the ring: writes this step's messages, then hands over the due row.

    ``write(slots, filled, num_slots)`` adds this step's messages (one with delay 0 into
    this step's row, read next) and marks their rows; into a row not marked it must
    *replace* what the row holds, unless ``lazy`` is false: then the row read last is
    emptied first (for writes that cannot select, a scatter-add). Then the due row is
    this step's, or, read early, the one kept from the last step (and the next one's is
    read now); reading a row clears its marks. Returns ``(this step's due row, buffer)``.
    """
    slots, filled, due = in_flight
    num_slots = filled.shape[0]
    ahead = int(due is not None)
    if not lazy:
        emptied = (step - 1 + ahead) % num_slots
        slots = jax.tree.map(
            lambda x: lax.dynamic_update_index_in_dim(x, jnp.zeros_like(x[0]), emptied, 0), slots
        )
    slots, filled = write(slots, filled, num_slots)
    index = (step + ahead) % num_slots
    kept = filled[index]
    filled = filled.at[index].set(False)
    if ahead:
        row = read(Due(slots, index, kept))
        return Due(due, jnp.int32(0)), InFlight(slots, filled, jax.tree.map(lambda x: x[None], row))
    return Due(slots, index, kept), InFlight(slots, filled, due)


def _store(total: jax.Array, like: jax.Array) -> jax.Array:
    """A sum stored in the buffer's dtype (rounded once, when narrower)."""
    return total.astype(like.dtype)


def _bits(x: jax.Array) -> jax.Array | None:
    """An integer view of a 16-bit float array (``None`` for other dtypes): XLA moves its
    bits where a CPU, which computes 16-bit floats in float32, would convert the whole
    array to float32 and back to read or write a slice of it."""
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 2:
        return lax.bitcast_convert_type(x, jnp.uint16)
    return None


def update_slice(buffer: jax.Array, value: jax.Array, at: tuple) -> jax.Array:
    """``buffer`` with ``value`` written at ``at`` (a dynamic update slice), in place."""
    bits = _bits(buffer)
    if bits is None:
        return lax.dynamic_update_slice(buffer, value, at)
    updated = lax.dynamic_update_slice(bits, _bits(value.astype(buffer.dtype)), at)
    return lax.bitcast_convert_type(updated, buffer.dtype)


def read_slice(buffer: jax.Array, at: tuple, sizes: tuple) -> jax.Array:
    """``buffer``'s slice of ``sizes`` at ``at`` (a dynamic slice), read in place."""
    bits = _bits(buffer)
    if bits is None:
        return lax.dynamic_slice(buffer, at, sizes)
    return lax.bitcast_convert_type(lax.dynamic_slice(bits, at, sizes), buffer.dtype)


def add_messages(
    pieces: Row, delays: jax.Array, step: jax.Array, apart: bool, alike: bool = False
) -> Write:
    """The write of a device's messages at ``step``: local worker ``i``'s message is
    ``pieces`` at ``i`` (leaves ``[L, *shape]``, in the dtype sums are formed in), due
    ``delays[i]`` steps later (into its own segment of the row when ``apart``);
    ``alike``: every delay is the same. See the module for the two ways."""
    num_local = delays.shape[0]

    def write(slots, filled, num_slots):
        rows = (step + delays) % num_slots
        segments = np.arange(num_local) if apart else np.zeros(num_local, int)
        marks = filled.at[rows, segments].set(True)
        if num_local > (UNROLLED_WORKERS if alike else min(num_slots, UNROLLED_WORKERS)):
            return _segment_sum(slots, filled, rows, pieces, apart), marks
        # A worker adds to what its target (row, segment) held, or to what a local worker
        # before it just wrote there.
        same = (rows[:, None] == rows[None, :]) & (segments[:, None] == segments[None, :])
        held = filled[rows, segments] | jnp.any(same & np.tri(num_local, k=-1, dtype=bool), 1)
        # In-place updates, unrolled: a scatter, or a loop carrying the buffer, makes XLA
        # copy the whole buffer on CPU.
        leaves, treedef = jax.tree.flatten(slots)
        parts = jax.tree.leaves(pieces)
        for i in range(num_local):
            for k, part in enumerate(parts):
                slot = leaves[k]
                at = (rows[i], jnp.int32(segments[i])) + (jnp.int32(0),) * (slot.ndim - 2)
                old = read_slice(slot, at, (1, 1, *slot.shape[2:]))
                kept = jnp.where(held[i], old, 0).astype(part.dtype)
                total = _store(kept + part[i][None, None], slot)
                leaves[k] = update_slice(slot, total, at)
        return treedef.unflatten(leaves), marks

    return write


def _segment_sum(slots: Row, filled: jax.Array, rows: jax.Array, messages: Row, apart: bool) -> Row:
    """``slots`` with ``messages``' worker ``i`` (leaves ``[L, *shape]``) added into row
    ``rows[i]`` (its segment ``i`` when ``apart``), as one product and one pass over the
    ring per leaf."""
    num_slots = filled.shape[0]
    target = rows[None, :] == jnp.arange(num_slots, dtype=rows.dtype)[:, None]  # [R, L]

    def leaf(slot, message):
        if apart:  # segment i of row r: its worker's message where it targets r
            trailing = (1,) * (message.ndim - 1)
            kept = (filled | ~target).reshape(target.shape + trailing)
            added = jnp.where(target.reshape(target.shape + trailing), message[None], 0)
            return _store(jnp.where(kept, slot, 0).astype(message.dtype) + added, slot)
        kept = (filled[:, 0] | ~jnp.any(target, axis=1)).reshape((num_slots,) + (1,) * message.ndim)
        added = jnp.tensordot(target.astype(message.dtype), message, axes=1)[:, None]
        return _store(jnp.where(kept, slot, 0).astype(message.dtype) + added, slot)

    summed = jax.tree.map(leaf, slots, messages)
    return summed._replace(channels=tuple(constrain(c, leading=2) for c in summed.channels))


def scatter_messages(
    positions: jax.Array,
    values: tuple[jax.Array, ...],
    totals: jax.Array,
    delays: jax.Array,
    step: jax.Array,
) -> Write:
    """The write of sparse messages at ``step``: message ``i`` adds ``values[c][i]`` at the
    flat positions ``positions[i]`` of channel ``c`` (``[n, k]`` each; positions over the
    channel's leaves in order) and ``totals[i]`` (``[n, 7]``) into the row due
    ``delays[i]`` (``[n]``) steps later; a scatter-add, which cannot skip what a row held,
    so the ring is advanced with ``lazy=False``."""

    def write(slots, filled, num_slots):
        rows = (step + delays) % num_slots
        channels = []
        for channel, value in zip(slots.channels, values, strict=True):
            leaves, treedef = jax.tree.flatten(channel)
            offset, written = 0, []
            for slot in leaves:
                size = int(np.prod(slot.shape[2:]))
                # Positions outside this leaf are dropped (an index past its end).
                local = positions - offset
                local = jnp.where((local >= 0) & (local < size), local, size)
                flat = slot.reshape(num_slots, size)
                flat = flat.at[rows[:, None], local].add(value.astype(flat.dtype), mode="drop")
                written.append(flat.reshape(slot.shape))
                offset += size
            channels.append(treedef.unflatten(written))
        summed = slots.totals.at[rows, 0].add(totals.astype(slots.totals.dtype))
        return Row(tuple(channels), summed), filled.at[rows].set(True)

    return write
