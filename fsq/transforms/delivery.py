r"""The in-flight buffer: messages wait in delivery slots until their step comes.

A message sent at step :math:`t` with delay :math:`d` is due at step :math:`t + d`. Sums
commute, so the buffer stores, for each future step, the *sum* of the messages due then:
a ring of :math:`L = d_{\max}` rows, row :math:`t \bmod L` holding what is due at
:math:`t`. Messages with delay 0 never enter it, so synchronous training (:math:`L = 0`)
has no buffer at all. One ring serves all the workers of a device (its memory is
:math:`L \times P` whatever the number of workers), and holds only their partial sums;
delivery adds the rows of all devices with one all-reduce.

.. math::

  \text{delivered}_t = \sum_{\text{devices}} \Big(\text{slots}[t \bmod L]
  + \sum_{i:\, d_i = 0} m_i\Big), \qquad
  \text{slots}[t \bmod L] \leftarrow 0, \qquad
  \text{slots}[(t + d_i) \bmod L] \mathrel{+}= m_i \ (d_i \ge 1)

The due row is read and cleared *before* the new messages are added, so a message with
the largest delay :math:`d = L` lands in the row just emptied, due :math:`L` steps later:
every slot is emptied before it is reused, nothing is lost or delivered twice.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class InFlight(NamedTuple):
    """Messages in flight from the workers of one device, summed per due step.

    Attributes:
      slots: ``[max_delay, width]``; row ``t mod max_delay`` is the sum of the messages
        due at step ``t``. Identical on all workers of a device; different across devices
        (each holds its own workers' share).
    """

    slots: jax.Array


def init(max_delay: int, width: int, dtype: jnp.dtype) -> InFlight:
    """An empty buffer for delays up to ``max_delay`` and messages of length ``width``."""
    return InFlight(jnp.zeros((max_delay, width), dtype))


def exchange(
    in_flight: InFlight,
    message: jax.Array,
    delay: jax.Array,
    step: jax.Array,
    local_axes: tuple[str, ...],
    device_axes: tuple[str, ...],
) -> tuple[jax.Array, InFlight]:
    """Sends this worker's ``message`` with ``delay``; returns the sum of all messages due
    at ``step`` (over every worker) and the buffer without them.

    The messages of the workers sharing this device (``local_axes``, vmap axes) are
    gathered first, which costs nothing under vmap. The only collective is one
    all-reduce of one row over the device-spanning axes.
    """
    messages, delays = message[None], jnp.asarray(delay, jnp.int32)[None]
    for axis in reversed(local_axes):
        messages = lax.all_gather(messages, axis, tiled=True)
        delays = lax.all_gather(delays, axis, tiled=True)
    due = jnp.sum(jnp.where((delays == 0)[:, None], messages, 0), axis=0)
    slots = in_flight.slots
    num_slots = slots.shape[0]
    if num_slots:
        slot = step % num_slots
        due = due + slots[slot]
        slots = slots.at[slot].set(0)
        # Delay-0 messages are already in `due`: index them out of bounds and drop them.
        target = jnp.where(delays > 0, (step + delays) % num_slots, num_slots)
        slots = slots.at[target].add(messages, mode="drop")
    if device_axes:
        due = lax.psum(due, device_axes)
    return due, InFlight(slots)
