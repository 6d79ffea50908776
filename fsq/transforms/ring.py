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

``filled`` marks the rows that received a message since they were last delivered;
delivering a row clears its mark, and the next message into it *replaces* what it held
instead of adding to it. Emptying a row would be one more write of it every step; the
mark makes it a select fused into the next write and the next read. A message with the
largest delay :math:`d = d_{\max}` lands in the row delivered at :math:`t - 1`; one with
delay 0 lands in row :math:`t`, read right after. Every row is read once before it is
reused: nothing is lost or delivered twice. The due row is read *after* the writes, so
XLA updates the buffer in place.

How the messages of a device's :math:`L` workers are written:

- :math:`L \le R`: each part of each worker's message (a leaf of a channel, the totals)
  is added into its place in the row where it is computed; the message is never built
  (unless the parts of all workers are too many small updates: then one update of a row
  per worker);
- :math:`L > R`: as a segment sum, :math:`\text{slots} \leftarrow [\text{kept}]\,
  \text{slots} + A M` with :math:`A_{r i} = [\text{row}_i = r]`: one matrix product and
  one pass over the ring, whose cost and compile time do not grow with :math:`L` beyond
  the product (cheaper than :math:`L` row updates once :math:`L` exceeds :math:`R`).

With a delay model that never gives delay 0 (``early``), the row due at :math:`t + 1` is
read after the writes of step :math:`t` and kept apart as ``due`` (the ring has
:math:`d_{\max}` rows plus ``due``, the same memory), so that step :math:`t + 1` can
deliver it without touching the ring first.

A robust aggregation needs each worker's messages apart: then a row holds the device's
:math:`L` workers side by side (each worker's segment the sum of *its* messages due that
step, with its own mark).

Example:
  >>> import jax.numpy as jnp
  >>> from fsq.transforms import ring
  >>> buffer = ring.init(max_delay=2, width=3, dtype=jnp.float32)
  >>> write = ring.add_messages([jnp.ones((1, 3))], jnp.array([1]), jnp.int32(0), False)
  >>> due, buffer = ring.advance(buffer, jnp.int32(0), write)  # sent at 0, due at 1
  >>> print(ring.read(due), buffer.pending()[1])
  [0. 0. 0.] [1. 1. 1.]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fsq.placement import PER_DEVICE

# Up to this many workers per device (and at most the ring's rows), their messages are
# written by row updates; beyond, by a segment sum.
UNROLLED_WORKERS = 32
# Up to this many row updates per step, each part of each worker's message (a leaf of a
# channel, the totals) is added where it is computed and the message is never built (a
# pass less over the messages); beyond, the many small updates cost more than building
# the messages first (docs/performance.md).
UNROLLED_PARTS = 256


class InFlight(NamedTuple):
    """Messages in flight from the workers of one device, summed per due step.

    Identical on all workers of a device; different across devices (each holds its own
    workers' share): it is declared per device (:mod:`fsq.placement`), every field with
    the device's block on axis 0.

    Attributes:
      slots: ``[rows, width]``, row ``s mod rows`` the sum of the messages due at step
        ``s`` where ``filled`` (per local worker, side by side, when messages are kept
        apart: ``width`` is then ``W/D`` message widths); ``rows = max_delay + 1``, or
        ``max_delay`` when the due row is read early.
      filled: ``[rows, segments]`` bool, whether a row (each worker's segment, when
        messages are kept apart; else ``segments = 1``) received a message since it was
        last delivered. What an unmarked row holds is stale: it reads as zeros.
      due: ``[width]``, the row due at the coming step, read one step early (delay
        models that never give delay 0); ``[0]`` otherwise.
    """

    slots: jax.Array
    filled: jax.Array
    due: jax.Array
    placement = PER_DEVICE

    def pending(self) -> jax.Array:
        """``[rows, width]``: the sums of the messages in flight, by due row (zeros where a
        row holds none); the row read early (``due``) is not included."""
        return jnp.where(_entry_marks(self.filled, self.slots.shape[1]), self.slots, 0)


def _entry_marks(filled: jax.Array, width: int) -> jax.Array:
    """The mark of each entry of rows of ``width`` entries made of equal segments, from
    the segments' marks ``filled`` (``[..., segments]``)."""
    return jnp.repeat(filled, width // max(filled.shape[-1], 1), axis=-1)


def init(
    max_delay: int, width: int, dtype: jnp.dtype, early: bool = False, segments: int = 1
) -> InFlight:
    """An empty buffer for delays up to ``max_delay`` and rows of length ``width``, made
    of ``segments`` workers' messages side by side; ``early``: read each due row one step
    ahead (see the module)."""
    if not max_delay:
        rows, due = 0, 0
    else:
        rows, due = (max_delay, width) if early else (max_delay + 1, 0)
    return InFlight(
        jnp.zeros((rows, width), dtype),
        jnp.zeros((rows, segments), jnp.bool_),
        jnp.zeros((due,), dtype),
    )


class Due(NamedTuple):
    """What is due at a step: row ``index`` of the column blocks ``blocks`` (each
    ``[rows, n]``; the row is their concatenation), where ``filled`` (``[segments]``, the
    marks of the row's equal segments; ``None``: all of it).

    Where delivery needs no collective, the blocks are the in-flight buffer itself, so
    that the row is read where it is used (:func:`read`) instead of being copied first;
    or, when the only message due is the one just sent (no delays, one worker), a
    function that computes its parts, called where they are read, so that XLA fuses
    them into their use instead of writing them out first.
    """

    blocks: tuple[jax.Array, ...] | Callable[[], tuple[jax.Array, ...]]
    index: jax.Array
    filled: jax.Array | None = None


def as_due(*parts: jax.Array) -> Due:
    """A due row made of ``parts``, held on their own."""
    return Due(tuple(p[None] for p in parts), jnp.int32(0))


def computed(due: Due) -> Due:
    """``due`` with its blocks computed, once, in the current scope: call it where the row
    is read (for a message read where it is used, inside the inner step's branch)."""
    return due._replace(blocks=due.blocks()) if callable(due.blocks) else due


def read(due: Due, start: int = 0, size: int | None = None) -> jax.Array:
    """Entries ``start .. start + size`` (default: to the end) of the due row; a negative
    ``start`` counts from the end."""
    blocks = computed(due).blocks
    width = sum(b.shape[1] for b in blocks)
    start = start % width if start < 0 else start
    size = width - start if size is None else size
    pieces, offset = [], 0
    for block in blocks:
        low, high = max(start, offset), min(start + size, offset + block.shape[1])
        if low < high:
            at = (jnp.asarray(due.index, jnp.int32), jnp.int32(low - offset))
            pieces.append(lax.dynamic_slice(block, at, (1, high - low))[0])
        offset += block.shape[1]
    if not pieces:
        return jnp.zeros((0,), blocks[0].dtype)
    entries = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)
    if due.filled is None:
        return entries
    if due.filled.shape[0] == 1:  # one mark for the row: a scalar select
        return jnp.where(due.filled[0], entries, 0)
    return jnp.where(_entry_marks(due.filled, width)[start : start + size], entries, 0)


Write = Callable[[jax.Array, jax.Array, int], tuple[jax.Array, jax.Array]]


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
    num_slots = slots.shape[0]
    ahead = int(due.size > 0)
    if not lazy:
        empty = jnp.zeros(slots.shape[1:], slots.dtype)
        slots = lax.dynamic_update_index_in_dim(slots, empty, (step - 1 + ahead) % num_slots, 0)
    slots, filled = write(slots, filled, num_slots)
    index = (step + ahead) % num_slots
    kept = filled[index]
    filled = filled.at[index].set(False)
    if ahead:
        row = read(Due((slots,), index, kept))
        return as_due(due), InFlight(slots, filled, row)
    return Due((slots,), index, kept), InFlight(slots, filled, due)


def add_messages(
    pieces: Sequence[jax.Array], delays: jax.Array, step: jax.Array, apart: bool
) -> Write:
    """The write of a device's messages at ``step``: local worker ``i``'s message is the
    concatenation of ``pieces[k][i]`` (each piece ``[L, n_k]``), due ``delays[i]`` steps
    later (into its own segment of the row when ``apart``). See the module for the three
    ways."""
    num_local = delays.shape[0]
    message_width = sum(p.shape[1] for p in pieces)

    def write(slots, filled, num_slots):
        rows = (step + delays) % num_slots
        segments = np.arange(num_local) if apart else np.zeros(num_local, int)
        marks = filled.at[rows, segments].set(True)
        if num_local > min(num_slots, UNROLLED_WORKERS):
            return _segment_sum(slots, filled, rows, jnp.concatenate(pieces, axis=1), apart), marks
        # A worker adds to what its target (row, segment) held, or to what a local worker
        # before it just wrote there.
        same = (rows[:, None] == rows[None, :]) & (segments[:, None] == segments[None, :])
        held = filled[rows, segments] | jnp.any(same & np.tri(num_local, k=-1, dtype=bool), 1)
        # In-place updates, unrolled: a scatter, or a loop carrying the buffer, makes XLA
        # copy the whole buffer on CPU.
        few = num_local == 1 or num_local * len(pieces) <= UNROLLED_PARTS
        parts = pieces if few else [jnp.concatenate(pieces, axis=1)]
        offsets = np.cumsum([0, *[p.shape[1] for p in parts[:-1]]])
        for i in range(num_local):
            for part, offset in zip(parts, offsets, strict=True):
                at = (rows[i], jnp.int32(offset + segments[i] * message_width))
                kept = jnp.where(held[i], lax.dynamic_slice(slots, at, (1, part.shape[1])), 0)
                slots = lax.dynamic_update_slice(slots, kept + part[i][None], at)
        return slots, marks

    return write


def _segment_sum(slots, filled, rows, messages, apart):
    """``slots`` with ``messages[i]`` (``[L, w]``) added into row ``rows[i]`` (its segment
    ``i`` when ``apart``), as one product and one pass over the ring."""
    num_slots, num_local = slots.shape[0], rows.shape[0]
    target = rows[None, :] == jnp.arange(num_slots, dtype=rows.dtype)[:, None]  # [R, L]
    if apart:  # segment i of row r: its worker's message where it targets r
        shape = (num_slots, num_local, messages.shape[1])
        kept = filled | ~target
        added = jnp.where(target[:, :, None], messages[None], 0)
        ring = slots.reshape(shape)
        return (jnp.where(kept[:, :, None], ring, 0) + added).reshape(slots.shape)
    kept = filled[:, 0] | ~jnp.any(target, axis=1)
    added = target.astype(messages.dtype) @ messages
    return jnp.where(kept[:, None], slots, 0) + added


def scatter_messages(
    positions: jax.Array, values: jax.Array, delays: jax.Array, step: jax.Array
) -> Write:
    """The write of sparse messages at ``step``: ``values[i]`` added at ``positions[i]``
    (``[n, k]`` each) of the row due ``delays[i]`` (``[n, 1]``) steps later; a scatter-add,
    which cannot skip what a row held, so the ring is advanced with ``lazy=False``."""

    def write(slots, filled, num_slots):
        rows = (step + delays) % num_slots
        return slots.at[rows, positions].add(values), filled.at[rows].set(True)

    return write
