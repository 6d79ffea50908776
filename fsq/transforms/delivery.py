r"""The in-flight buffer: messages wait in delivery slots until their step comes.

A message sent at step :math:`t` with delay :math:`d` is due at step :math:`t + d`. Sums
commute, so the buffer stores, for each future step, the *sum* of the messages due then:
a ring of :math:`L = d_{\max} + 1` rows, row :math:`t \bmod L` holding what is due at
:math:`t`. One ring serves all the workers of a device (its memory is :math:`L \times P`
whatever the number of workers), and holds only their partial sums; delivery adds the
rows of all devices with one all-reduce.

.. math::

  \text{slots}[(t + d_i) \bmod L] \mathrel{+}= m_i \quad \text{(send, every local worker } i)
  \\
  \text{delivered}_t = \textstyle\sum_{\text{devices}} \text{slots}[t \bmod L], \quad
  \text{slots}[t \bmod L] \leftarrow 0 \quad \text{(deliver)}

Since every delay is at most :math:`d_{\max} < L`, a slot is always emptied before it is
reused: nothing is lost or delivered twice.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class InFlight(NamedTuple):
    """Messages in flight from the workers of one device, summed per due step.

    Attributes:
      slots: ``[max_delay + 1, width]``; row ``t mod (max_delay + 1)`` is the sum of the
        messages due at step ``t``. Identical on all workers of a device; different
        across devices (each holds its own workers' share).
    """

    slots: jax.Array


def init(max_delay: int, width: int, dtype: jnp.dtype) -> InFlight:
    """An empty buffer for delays up to ``max_delay`` and messages of length ``width``."""
    return InFlight(jnp.zeros((max_delay + 1, width), dtype))


def send(
    in_flight: InFlight, message: jax.Array, due_step: jax.Array, local_axes: tuple[str, ...]
) -> InFlight:
    """Adds each local worker's ``message`` to the slot of its ``due_step``.

    The messages of the workers sharing this device (the ``local_axes``, vmap axes) are
    gathered first, which costs nothing under vmap, and scatter-added in one operation.
    """
    messages, due = message[None], jnp.asarray(due_step, jnp.int32)[None]
    for axis in reversed(local_axes):
        messages = lax.all_gather(messages, axis, tiled=True)
        due = lax.all_gather(due, axis, tiled=True)
    num_slots = in_flight.slots.shape[0]
    return InFlight(in_flight.slots.at[due % num_slots].add(messages))


def deliver(
    in_flight: InFlight, step: jax.Array, device_axes: tuple[str, ...]
) -> tuple[jax.Array, InFlight]:
    """Returns the sum over all workers of the messages due at ``step``, and empties it.

    This is the only collective of a step: one all-reduce of one row over the
    device-spanning axes.
    """
    slot = step % in_flight.slots.shape[0]
    total = in_flight.slots[slot]
    if device_axes:
        total = lax.psum(total, device_axes)
    return total, InFlight(in_flight.slots.at[slot].set(0))
