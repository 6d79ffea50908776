r"""The in-flight buffer: messages wait in delivery slots until their step comes.

A message sent at step :math:`t` with delay :math:`d` is due at step :math:`t + d`. Sums
commute, so the buffer stores, for each step, the *sum* of the messages due then: a ring
of :math:`R = d_{\max} + 1` rows, row :math:`s \bmod R` holding what is due at step
:math:`s`. Synchronous training (:math:`d_{\max} = 0`) has no buffer at all. One buffer
serves all the workers of a device (its memory is :math:`(d_{\max} + 1) \times P`
whatever the number of workers) and holds only their partial sums; delivery adds the
totals of all devices with one all-reduce. At step :math:`t`:

.. math::

  \text{slots}[(t - 1) \bmod R] \leftarrow 0, \qquad
  \text{slots}[(t + d_i) \bmod R] \mathrel{+}= m_i, \qquad
  \text{delivered}_t = \sum_{\text{devices}} \text{slots}[t \bmod R]

The row delivered at step :math:`t - 1` is emptied before the new messages are added, as
a message with the largest delay :math:`d = d_{\max}` lands in it; a message with delay 0
lands in row :math:`t`, read right after. Every row is read once and emptied before it is
reused: nothing is lost or delivered twice. The due row is read *after* the writes, so XLA
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
sum of *its* messages due that step), and delivery all-gathers the devices' rows instead
of adding them, returning the :math:`W` workers' sums.
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
        ``s`` (per local worker, side by side, when messages are kept apart: ``width`` is
        then ``W/D`` message widths); ``rows = max_delay + 1``, or ``max_delay`` when
        the due row is read early.
      due: ``[width]``, the row due at the coming step, read one step early (delay
        models that never give delay 0); ``[0]`` otherwise.
    """

    slots: jax.Array
    due: jax.Array


def init(max_delay: int, width: int, dtype: jnp.dtype, early: bool = False) -> InFlight:
    """An empty buffer for delays up to ``max_delay`` and messages of length ``width``;
    ``early``: read each due row one step ahead (see the module)."""
    if not max_delay:
        rows, due = 0, 0
    else:
        rows, due = (max_delay, width) if early else (max_delay + 1, 0)
    return InFlight(jnp.zeros((rows, width), dtype), jnp.zeros((due,), dtype))


class Due(NamedTuple):
    """What is due at a step: row ``index`` of the column blocks ``blocks`` (each
    ``[rows, n]``; the row is their concatenation).

    Where delivery needs no collective, the blocks are the in-flight buffer itself, so
    that the row is read where it is used (:func:`read`) instead of being copied first;
    or, when the only message due is the one just sent (no delays, one worker), a
    function that computes its parts, called where they are read, so that XLA fuses
    them into their use instead of writing them out first.
    """

    blocks: tuple[jax.Array, ...] | Callable[[], tuple[jax.Array, ...]]
    index: jax.Array


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
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)


def _advance(in_flight: InFlight, step: jax.Array, write) -> tuple[Due, InFlight]:
    """The ring step shared by both exchanges: empty the row read last (the due row of the
    last step, or, read early, of this step), let ``write(slots, num_slots)`` add this
    step's messages (a message with delay 0 lands in this step's row, read next), then
    find the due row: this step's, or, read early, the one kept from the last step (and
    the next one's is read now). Returns ``(this step's due row, buffer)``.
    """
    slots, due = in_flight
    num_slots = slots.shape[0]
    ahead = int(due.size > 0)
    empty = jnp.zeros(slots.shape[1:], slots.dtype)
    slots = lax.dynamic_update_index_in_dim(slots, empty, (step - 1 + ahead) % num_slots, 0)
    slots = write(slots, num_slots)
    if ahead:
        row = lax.dynamic_index_in_dim(slots, (step + 1) % num_slots, keepdims=False)
        return as_due(due), InFlight(slots, row)
    return Due((slots,), step % num_slots), in_flight._replace(slots=slots)


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

        def write(slots, num_slots):
            # One in-place update per local worker and piece, unrolled: a scatter, or a
            # loop carrying the buffer, makes XLA copy the whole buffer on CPU.
            for i in range(num_local):
                row = (step + delays[i]) % num_slots
                for piece, size, offset in zip(pieces, sizes, offsets, strict=True):
                    at = (row, offset + (i * message_width if per_worker else 0))
                    added = lax.dynamic_slice(slots, at, (1, size)) + piece[i][None]
                    slots = lax.dynamic_update_slice(slots, added, at)
            return slots

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
    return _advance(
        in_flight,
        step,
        lambda slots, num_slots: slots.at[(step + delays) % num_slots, positions].add(values),
    )
