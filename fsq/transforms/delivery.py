r"""The in-flight buffer: messages wait in delivery slots until their step comes.

A message sent at step :math:`t` with delay :math:`d` is due at step :math:`t + d`. Sums
commute, so the buffer stores, for each step, the *sum* of the messages due then: a ring
of :math:`R = d_{\max} + 1` rows, row :math:`s \bmod R` holding what is due at step
:math:`s`. Messages with delay 0 never enter it, so synchronous training
(:math:`d_{\max} = 0`) has no buffer at all. One buffer serves all the workers of a device
(its memory is :math:`(d_{\max} + 1) \times P` whatever the number of workers) and holds
only their partial sums; delivery adds the totals of all devices with one all-reduce. At
step :math:`t`:

.. math::

  \text{slots}[(t - 1) \bmod R] \leftarrow 0, \qquad
  \text{slots}[(t + d_i) \bmod R] \mathrel{+}= m_i \ (d_i \ge 1), \qquad
  \text{delivered}_t = \sum_{\text{devices}} \Big(\text{slots}[t \bmod R]
  + \sum_{i:\, d_i = 0} m_i\Big)

The row delivered at step :math:`t - 1` is emptied before the new messages are added, as
a message with the largest delay :math:`d = d_{\max}` lands in it; no message sent at
:math:`t` lands in row :math:`t`. Every row is read once and emptied before it is reused:
nothing is lost or delivered twice. The due row is read *after* the writes, so XLA updates
the buffer in place (a read followed by an in-place write of the same buffer makes it
copy the whole buffer on CPU).

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


def _advance(in_flight: InFlight, step: jax.Array, now: jax.Array, write) -> tuple:
    """The ring step shared by both exchanges: empty the row read last (the due row of the
    last step, or, read early, of this step), let ``write(slots, num_slots)`` add the late
    messages, then read a due row: this step's, or the next one's when read early (it is
    delivered a step later, from ``due``). Returns ``(this step's due row + now, buffer)``.
    """
    slots, due = in_flight
    num_slots = slots.shape[0]
    if not num_slots:
        return now, in_flight
    ahead = int(due.size > 0)
    slots = lax.dynamic_update_index_in_dim(
        slots, jnp.zeros_like(now), (step - 1 + ahead) % num_slots, 0
    )
    slots = write(slots, num_slots)
    row = lax.dynamic_index_in_dim(slots, (step + ahead) % num_slots, keepdims=False)
    if ahead:
        return now + due, InFlight(slots, row)
    return now + row, in_flight._replace(slots=slots)


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
