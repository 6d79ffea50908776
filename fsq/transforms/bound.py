r"""Bounded staleness: what becomes of a gradient that would arrive too late.

A gradient whose delay :math:`d` exceeds the bound :math:`b` is

- ``"drop"`` — dropped: marked *dropped*, never applied (nor absorbed by the worker's
  error-feedback residual), and counted in ``bounded`` when it would have been due;
- ``"wait"`` — held: the system waits for it, as stale-synchronous parallel does
  (Ho et al., *More Effective Distributed ML via a Stale Synchronous Parallel Parameter
  Server*, NeurIPS 2013), which in the logical clock delivers it exactly :math:`b` steps
  late: :math:`d \leftarrow \min(d, b)`. It is marked *held* and counted in ``bounded``
  (and in ``delivered``).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from fsq import _checks
from fsq.transforms.message import DelayRange, SendTransformation, Status

ON_STALE = ("drop", "wait")


def bound_staleness(max_staleness: int, on_stale: str = "drop") -> SendTransformation:
    """Drops or holds back gradients with a delay above ``max_staleness`` (see the module).

    Args:
      max_staleness: the bound :math:`b`, an int in ``[0, max_delay]`` (checked when the
        pipeline is assembled).
      on_stale: ``"drop"`` or ``"wait"``.

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> bound = fsq.transforms.bound_staleness(2, on_stale="wait")
      >>> m = fsq.transforms.new_message(jnp.ones(1), 5, jnp.float32)
      >>> m, _ = bound.update(m, bound.init(None), None, None)
      >>> int(m.delay), fsq.transforms.Status(int(m.status)).name
      (2, 'HELD')
    """
    bound = _checks.integer("max_staleness", max_staleness, 0)
    if on_stale not in ON_STALE:
        raise ValueError(f"on_stale must be one of {ON_STALE}, got {on_stale!r}")
    wait = on_stale == "wait"

    def update(message, state, params, context):
        del params, context
        late = message.delay > bound
        if wait:
            message = message.mark(Status.HELD, late)
            return message._replace(delay=jnp.minimum(message.delay, bound)), state
        return message.mark(Status.DROPPED, late), state

    def delays(span: DelayRange) -> DelayRange:
        low, high = span
        _checks.integer("max_staleness", bound, 0, high)
        return (min(low, bound), min(high, bound)) if wait else span

    return SendTransformation(
        lambda params: optax.EmptyState(), update, delays=delays, summable=True
    )
