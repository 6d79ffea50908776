r"""The in-flight buffer: messages wait in delivery slots until their step comes.

A message sent at step :math:`t` with delay :math:`d` is due at step :math:`t + d`. Sums
commute, so the buffer stores, for each step, the *sum* of the messages due then: a ring
of :math:`R = d_{\max} + 1` rows, row :math:`s \bmod R` holding what is due at step
:math:`s`. Synchronous training (:math:`d_{\max} = 0`) has no buffer at all. One buffer
serves all the workers of a device (its memory is :math:`(d_{\max} + 1) \times P`
whatever the number of workers) and holds only their partial sums; delivery adds the
totals of all devices with one all-reduce. At step :math:`t`:

.. math::

  \text{slots}[(t + d_i) \bmod R] \leftarrow
  [\text{filled}_{(t + d_i) \bmod R}]\, \text{slots}[(t + d_i) \bmod R] + m_i, \qquad
  \text{delivered}_t = \sum_{\text{devices}}
  [\text{filled}_{t \bmod R}]\, \text{slots}[t \bmod R]

``filled`` marks the rows that received a message since they were last delivered;
delivering a row clears its mark, and the next message into it *replaces* what it held
instead of adding to it. Emptying a row would be one more write of it every step (with
delay compensation, 1 ms of the 8 ms step of a 1.9M-parameter MLP on CPU); the mark
makes it a select fused into the next write and the next read. A message with the largest
delay :math:`d = d_{\max}` lands in the row delivered at :math:`t - 1`; one with delay 0
lands in row :math:`t`, read right after. Every row is read once before it is reused:
nothing is lost or delivered twice. The due row is read *after* the writes, so XLA
updates the buffer in place (a read followed by an in-place write of the same buffer
makes it copy the whole buffer on CPU). With one worker per device a message is never
built as a row: each of its parts (a leaf of a channel, the scalars) is added into its
place where it is computed, so sending costs one read and one write of the message's
entries in its row.

With a delay model that never gives delay 0 (``early``), the all-reduce should need
nothing of this step, so that it can overlap this step's backward pass: then the row due
at :math:`t + 1` is read after the writes of step :math:`t` and kept apart as ``due``
(the ring has :math:`d_{\max}` rows plus ``due``, the same memory), and step
:math:`t + 1` delivers it without touching the ring first.

A robust aggregation (:mod:`fsq.aggregation`) needs each worker's messages apart: then a
row holds the device's :math:`W/D` local workers side by side (each worker's segment the
sum of *its* messages due that step, with its own mark), and delivery all-gathers the
devices' rows instead of adding them, returning the :math:`W` workers' sums.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fsq import _axes


class InFlight(NamedTuple):
    """Messages in flight from the workers of one device, summed per due step.

    Identical on all workers of a device; different across devices (each holds its own
    workers' share). Every field has the device's block on axis 0, so devices' buffers
    concatenate along it.

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

    def pending(self) -> jax.Array:
        """``[rows, width]``: the sums of the messages in flight, by due row (zeros where a
        row holds none); the row read early (``due``) is not included."""
        return jnp.where(_entry_marks(self.filled, self.slots.shape[1]), self.slots, 0)


def _entry_marks(filled: jax.Array, width: int) -> jax.Array:
    """The mark of each entry of rows of ``width`` entries made of equal segments, from
    the segments' marks ``filled`` (``[..., segments]``)."""
    return jnp.repeat(filled, width // filled.shape[-1], axis=-1)


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
            pieces.append(lax.dynamic_slice(block, (due.index, low - offset), (1, high - low))[0])
        offset += block.shape[1]
    entries = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)
    if due.filled is None:
        return entries
    if due.filled.shape[0] == 1:  # one mark for the row: a scalar select
        return jnp.where(due.filled[0], entries, 0)
    return jnp.where(_entry_marks(due.filled, width)[start : start + size], entries, 0)


def _advance(
    in_flight: InFlight, step: jax.Array, write, lazy: bool = True
) -> tuple[Due, InFlight]:
    """The ring step shared by both exchanges.

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


def exchange(
    in_flight: InFlight,
    message: Callable[[], Sequence[jax.Array]],
    delay: jax.Array,
    step: jax.Array,
    local_axes: tuple[str, ...],
    device_axes: tuple[str, ...],
    per_worker: bool = False,
) -> tuple[Due, InFlight]:
    """Sends this worker's message, the concatenation of the parts ``message()`` returns,
    with ``delay``; returns the sum of all messages due at ``step`` (over every worker)
    and the buffer without them.

    The messages of the workers sharing this device (``local_axes``, vmap axes) are
    gathered first, which costs nothing under vmap. With one worker per device, each part
    is added into its place in the due row where it is computed: the message itself is
    never built. The only collective is one all-reduce of one row over the device-spanning
    axes (none over one device: the row is then read in place). With ``per_worker``, each
    worker's messages are kept apart and the due row holds ``W`` message widths: every
    worker's sum of messages due at ``step``, gathered (the one collective) in global
    worker order. With a buffer read early (delay models that never give delay 0) the
    collective reads only the buffer, not this step's messages, so it can overlap this
    step's backward pass.
    """
    num_local = _axes.local_count(local_axes)
    # Over one device the collective would only copy the row: skip it.
    spanned = tuple(a for a in device_axes if lax.axis_size(a) > 1)

    def gathered():
        """The parts of the device's workers' messages, ``[num_local, n]`` each."""
        pieces = [_axes.stack(p, local_axes) for p in message()]
        if num_local > 1:
            # Several workers per device: one update per worker, of its whole message.
            # Per part, the hundreds of small updates cost more than building the messages.
            pieces = [jnp.concatenate(pieces, axis=1)]
        return pieces

    if in_flight.slots.shape[0]:
        pieces = gathered()
        delays = _axes.stack(jnp.asarray(delay, jnp.int32), local_axes)
        sizes = [p.shape[1] for p in pieces]
        message_width = sum(sizes)
        offsets = np.cumsum([0, *sizes[:-1]])

        def write(slots, filled, num_slots):
            rows = (step + delays) % num_slots
            segments = np.arange(num_local) if per_worker else np.zeros(num_local, int)
            # A worker adds to what its target (row, segment) held, or to what a local
            # worker before it just wrote there.
            same = (rows[:, None] == rows[None, :]) & (segments[:, None] == segments[None, :])
            held = filled[rows, segments] | jnp.any(same & np.tri(num_local, k=-1, dtype=bool), 1)
            # One in-place update per local worker and piece, unrolled: a scatter, or a
            # loop carrying the buffer, makes XLA copy the whole buffer on CPU.
            for i in range(num_local):
                for piece, size, offset in zip(pieces, sizes, offsets, strict=True):
                    at = (rows[i], offset + segments[i] * message_width)
                    kept = jnp.where(held[i], lax.dynamic_slice(slots, at, (1, size)), 0)
                    slots = lax.dynamic_update_slice(slots, kept + piece[i][None], at)
            return slots, filled.at[rows, segments].set(True)

        due, in_flight = _advance(in_flight, step, write)
    elif num_local == 1 and not spanned:  # no delays: the message just sent, as it is
        due = Due(lambda: tuple(gathered()), jnp.int32(0))
    else:  # no delays: every message is due now
        messages = jnp.concatenate(gathered(), axis=1)
        due = as_due(jnp.ravel(messages) if per_worker else jnp.sum(messages, axis=0))
    if spanned:
        row = read(due)
        row = lax.all_gather(row, spanned, tiled=True) if per_worker else lax.psum(row, spanned)
        due = as_due(row)
    return due, in_flight


def exchange_sparse(
    in_flight: InFlight,
    positions: jax.Array,
    values: jax.Array,
    delay: jax.Array,
    step: jax.Array,
    axes: tuple[str, ...],
    width: int,
    shared_positions: bool = False,
) -> tuple[Due, InFlight]:
    """:func:`exchange` for a sparse message: ``values`` at ``positions`` of a row of
    ``width`` entries.

    Every worker's (positions, values, delay), in one row, is all-gathered over all
    ``axes`` *when it is sent* (the one collective, of :math:`W \times k` pairs instead of
    an all-reduce of the dense row); each device then adds all of them into its buffer,
    which therefore holds the sums over every worker, and delivery needs no collective. With
    ``shared_positions`` every worker sends at the same positions (random-k with a
    shared seed) and only the values travel.
    """
    # One all-gather: the delay and the positions travel bit-cast in the values' row.
    integer = jnp.dtype(f"int{8 * values.dtype.itemsize}")
    parts = [values, jnp.asarray(delay, integer)[None]]
    if not shared_positions:
        parts.append(positions.astype(integer))
    row = _axes.stack(
        jnp.concatenate([lax.bitcast_convert_type(p, values.dtype) for p in parts]), axes
    )
    k = values.shape[0]
    values, integers = row[:, :k], lax.bitcast_convert_type(row[:, k:], integer)
    delays = integers[:, :1]
    if not shared_positions:
        positions = integers[:, 1:]
    positions = jnp.broadcast_to(positions, values.shape)
    if not in_flight.slots.shape[0]:
        return as_due(jnp.zeros(width, values.dtype).at[positions].add(values)), in_flight

    def write(slots, filled, num_slots):
        rows = (step + delays) % num_slots
        return slots.at[rows, positions].add(values), filled.at[rows].set(True)

    # A scatter-add cannot skip what a row held: empty the row read last instead.
    return _advance(in_flight, step, write, lazy=False)
