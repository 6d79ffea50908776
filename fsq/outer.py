r"""Outer optimizers for pseudo-gradients that arrive one worker at a time."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fsq import _checks


class DelayedNesterovState(NamedTuple):
    """State of :func:`delayed_nesterov`.

    Attributes:
      count: calls so far (int32).
      buffer: the sum of the gradients since the last momentum step.
      momentum: the momentum :math:`m`, updated once every ``period`` calls.
    """

    count: jax.Array
    buffer: optax.Updates
    momentum: optax.Updates


def delayed_nesterov(
    learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9, *, period: int
) -> optax.GradientTransformation:
    r"""Nesterov momentum updated once every ``period`` calls, the gradients applied at once.

    Asynchronous local SGD delivers one worker's pseudo-gradient at a time; Nesterov
    momentum stepped on each of them accelerates stale directions ``W`` times per round.
    Delayed Nesterov (Liu et al. 2024, *Asynchronous Local-SGD Training for Language
    Modeling*) steps the momentum once per ``period`` arrivals, on their sum
    :math:`b = \sum_{j=1}^{N} g_j`, and applies each gradient as it arrives:

    .. math::

      u_k = -\eta\, g_k - \begin{cases} \eta \beta\, m' & k \equiv 0 \pmod N,
      \quad m' = \beta m + b \\ 0 & \text{otherwise,} \end{cases}

    so that over ``period`` calls the update is exactly one step of ``fsq.nesterov`` on
    :math:`b`: :math:`-\eta\,(b + \beta m')`. (Our reading of the paper's algorithm: its
    pseudo-gradients are averaged over the :math:`N` of a round, ours arrive already
    divided by :math:`W`.)

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule (of the call count).
      momentum: :math:`\beta \in [0, 1)`.
      period: :math:`N \ge 1`, calls per momentum step (the number of workers, typically).
        ``period=1`` is ``fsq.nesterov``.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> tx = fsq.delayed_nesterov(1.0, 0.5, period=2)
      >>> state = tx.init(jnp.zeros(1))
      >>> u, state = tx.update(jnp.ones(1), state)        # the gradient alone
      >>> print(u)
      [-1.]
      >>> u, state = tx.update(jnp.ones(1), state)        # and the momentum 0.5 * (0 + 2)
      >>> print(u)
      [-2.]
    """
    learning_rate = _checks.learning_rate(learning_rate)
    beta = _checks.probability_like("momentum", momentum)
    period = _checks.integer("period", period, low=1)

    def init_fn(params):
        return DelayedNesterovState(
            jnp.zeros([], jnp.int32), optax.tree.zeros_like(params), optax.tree.zeros_like(params)
        )

    def update_fn(updates, state, params=None):
        del params
        eta = learning_rate(state.count) if callable(learning_rate) else learning_rate
        buffer = jax.tree.map(jnp.add, state.buffer, updates)
        due = (state.count + 1) % period == 0
        new_momentum = jax.tree.map(lambda m, b: beta * m + b, state.momentum, buffer)
        momentum_ = jax.tree.map(lambda n, m: jnp.where(due, n, m), new_momentum, state.momentum)
        new_updates = jax.tree.map(
            lambda g, m: -eta * (g + jnp.where(due, beta * m, 0)).astype(g.dtype),
            updates,
            new_momentum,
        )
        buffer = jax.tree.map(lambda b: jnp.where(due, jnp.zeros_like(b), b), buffer)
        count = optax.safe_int32_increment(state.count)
        return new_updates, DelayedNesterovState(count, buffer, momentum_)

    return optax.GradientTransformation(init_fn, update_fn)
