r"""The in-flight buffer: messages wait in delivery slots until their step comes.

A message sent at step :math:`t` with delay :math:`d` is due at step :math:`t + d`. Sums
commute, so the buffer stores, for each future step, the *sum* of the messages due then:
a ring of :math:`L = d_{\max}` rows, row :math:`s \bmod L` holding what is due at step
:math:`s`, plus ``due``, what is due at the coming step. Messages with delay 0 never enter
it, so synchronous training (:math:`L = 0`) has no buffer at all. One buffer serves all
the workers of a device (its memory is :math:`(L + 1) \times P` whatever the number of
workers) and holds only their partial sums; delivery adds the totals of all devices with
one all-reduce. At step :math:`t`:

.. math::

  \text{delivered}_t = \sum_{\text{devices}} \Big(\text{due} + \sum_{i:\, d_i = 0} m_i\Big),
  \qquad \text{slots}[(t + d_i) \bmod L] \mathrel{+}= m_i \ (d_i \ge 1),
  \qquad \text{due} \leftarrow \text{slots}[(t + 1) \bmod L]

The slot of step :math:`t` was moved to ``due`` one step earlier, so it is emptied before
the new messages are added, and a message with the largest delay :math:`d = L` lands in
it. Every slot is read once and emptied before it is reused: nothing is lost or delivered
twice. Reading ``due`` *after* the writes, never a row that is about to be overwritten,
lets XLA update the buffer in place (reading then overwriting a row makes it copy the
whole buffer on CPU).

A robust aggregation (:mod:`fsq.aggregation`) needs each worker's messages apart: then a
row holds the device's :math:`W/D` local workers side by side (each worker's segment the
sum of *its* messages due that step), and delivery all-gathers the devices' rows instead
of adding them, returning the :math:`W` workers' sums.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fsq import _axes


class InFlight(NamedTuple):
    """Messages in flight from the workers of one device, summed per due step.

    Identical on all workers of a device; different across devices (each holds its own
    workers' share). Every field has the device's block on axis 0, so devices' buffers
    concatenate along it.

    Attributes:
      slots: ``[max_delay, width]``; row ``s mod max_delay`` is the sum of the messages
        due at step ``s``, for the steps after the coming one (per local worker, side by
        side, when messages are kept apart: ``width`` is then ``W/D`` message widths).
      due: ``[width]``, the sum of the messages due at the coming step (``[0]`` when
        ``max_delay`` is 0).
    """

    slots: jax.Array
    due: jax.Array


def init(max_delay: int, width: int, dtype: jnp.dtype) -> InFlight:
    """An empty buffer for delays up to ``max_delay`` and messages of length ``width``."""
    return InFlight(
        jnp.zeros((max_delay, width), dtype), jnp.zeros((width if max_delay else 0,), dtype)
    )


def _advance(in_flight: InFlight, step: jax.Array, now: jax.Array, write) -> tuple:
    """The ring step shared by both exchanges: empty the slot of ``step`` (its content was
    moved to ``due`` a step earlier), let ``write(slots, num_slots)`` add the late
    messages, and read the next ``due`` after the writes. Returns ``(due + now, buffer)``.
    """
    slots, due = in_flight
    num_slots = slots.shape[0]
    if not num_slots:
        return now, in_flight
    slots = lax.dynamic_update_index_in_dim(slots, jnp.zeros_like(due), step % num_slots, 0)
    slots = write(slots, num_slots)
    next_due = lax.dynamic_index_in_dim(slots, (step + 1) % num_slots, keepdims=False)
    return now + due, InFlight(slots, next_due)


def exchange(
    in_flight: InFlight,
    message: jax.Array,
    delay: jax.Array,
    step: jax.Array,
    local_axes: tuple[str, ...],
    device_axes: tuple[str, ...],
    per_worker: bool = False,
    immediate: bool = True,
) -> tuple[jax.Array, InFlight]:
    """Sends this worker's ``message`` with ``delay``; returns the sum of all messages due
    at ``step`` (over every worker) and the buffer without them.

    The messages of the workers sharing this device (``local_axes``, vmap axes) are
    gathered first, which costs nothing under vmap. The only collective is one
    all-reduce of one row over the device-spanning axes. With ``per_worker``, each
    worker's messages are kept apart and the result is ``[W, width]``: every worker's sum
    of messages due at ``step``, gathered (the one collective) in global worker order.
    With ``immediate=False`` (the delay model never gives delay 0) the collective reads
    only the buffer, not this step's messages, so it can overlap this step's backward pass.
    """
    messages = _axes.stack(message, local_axes)
    delays = _axes.stack(jnp.asarray(delay, jnp.int32), local_axes)
    num_local, width = messages.shape
    if immediate:
        now = jnp.where((delays == 0)[:, None], messages, 0)
        now = jnp.ravel(now) if per_worker else jnp.sum(now, axis=0)
    else:
        now = jnp.zeros(num_local * width if per_worker else width, messages.dtype)

    def write(slots, num_slots):
        # One in-place row update per local worker, unrolled: a scatter, or a loop carrying
        # the buffer, makes XLA copy the whole buffer on CPU.
        for i in range(num_local):
            at = ((step + delays[i]) % num_slots, i * width if per_worker else 0)
            late = jnp.where(delays[i] > 0, messages[i], jnp.zeros_like(messages[i]))
            slots = lax.dynamic_update_slice(
                slots, lax.dynamic_slice(slots, at, (1, width)) + late, at
            )
        return slots

    total, in_flight = _advance(in_flight, step, now, write)
    if per_worker:
        if device_axes:
            total = lax.all_gather(total, device_axes, tiled=True)
        return total.reshape(-1, width), in_flight
    if device_axes:
        total = lax.psum(total, device_axes)
    return total, in_flight


def exchange_sparse(
    in_flight: InFlight,
    positions: jax.Array,
    values: jax.Array,
    delay: jax.Array,
    step: jax.Array,
    axes: tuple[str, ...],
    width: int,
    shared_positions: bool = False,
) -> tuple[jax.Array, InFlight]:
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
    return _advance(
        in_flight,
        step,
        jnp.zeros(width, values.dtype).at[positions].add(jnp.where(delays == 0, values, 0)),
        lambda slots, num_slots: slots.at[(step + delays) % num_slots, positions].add(
            jnp.where(delays > 0, values, 0)
        ),
    )
