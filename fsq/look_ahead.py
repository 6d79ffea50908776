r"""Gradients computed where the parameters will be when those gradients are applied.

A gradient of staleness :math:`\tau` was computed :math:`\tau` steps before it is
applied. Instead of correcting it on arrival (delay compensation) or shrinking it
(staleness rules), :func:`look_ahead` moves the point it is computed at: the workers hold
a prediction of the parameters a few steps ahead, extrapolating the last update, so the
gradient they send is closer to the one they would compute when it arrives. The idea is
DANA's (Hakimi, Barkai, Gabel and Schuster, *Taming Momentum in a Distributed
Asynchronous Environment*, 2019: workers compute gradients at the master's parameters
extrapolated along the momentum over the expected delay).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fsq import _checks
from fsq.metrics import step_metrics


class LookAheadState(NamedTuple):
    """State of :func:`look_ahead`.

    Attributes:
      inner_state: the state of the wrapped transformation.
      offset: :math:`h_t u_t`, how far the held parameters are ahead of the parameters the
        updates apply to.
    """

    inner_state: optax.OptState
    offset: optax.Updates


def look_ahead(
    inner: optax.GradientTransformation, horizon: float = 8.0
) -> optax.GradientTransformationExtraArgs:
    r"""Holds the parameters :math:`h_t` steps ahead along the last update of ``inner``.

    With :math:`w_t` the parameters ``inner``'s updates :math:`u_t` apply to, the
    parameters held (where gradients are computed, and what a user evaluates) are

    .. math::

      y_{t+1} = w_{t+1} + h_t\, u_t, \qquad w_{t+1} = w_t + u_t, \qquad
      h_t = \min(H, \bar\tau_t),

    so the update returned is :math:`u_t + h_t u_t - h_{t-1} u_{t-1}`. :math:`H` is
    ``horizon`` and :math:`\bar\tau_t` the mean staleness of the gradients delivered at
    step :math:`t` (:func:`fsq.step_metrics`): with no delay the look-ahead is zero and
    ``inner`` runs unchanged, and a step that delivers nothing keeps the offset.

    Args:
      inner: a transformation holding a :class:`fsq.FlyingSquirrelState` (a
        :func:`fsq.flying_squirrel`, or a chain around one), used per worker.
      horizon: :math:`H \ge 0`, the most steps to look ahead.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra arguments reach ``inner``.

    Example:
      >>> import jax, jax.numpy as jnp, fsq
      >>> tx = fsq.look_ahead(fsq.flying_squirrel(fsq.sgd(0.1), num_workers=1, delay=2,
      ...     compensation=None, staleness=None, axis_name="w"), horizon=8.0)
      >>> workers = fsq.parallel.vmap_workers(tx, num_workers=1, axis_name="w")
      >>> params = jnp.zeros(1)
      >>> state = workers.init(params)
      >>> for _ in range(3):  # the first gradient arrives at step 2, two steps stale
      ...     u, state = workers.update(jnp.ones((1, 1)), state, params)
      ...     params = params + u
      >>> print(params)  # w = -0.1, held 2 steps ahead: -0.1 - 2 * 0.1
      [-0.3]
    """
    inner = _checks.transformation("inner", inner)
    _checks.real_in_range("horizon", horizon, 0.0)

    def init_fn(params: optax.Params) -> LookAheadState:
        inner_state = inner.init(params)
        step_metrics(inner_state)  # raises when there is no staleness to read
        return LookAheadState(inner_state, optax.tree.zeros_like(params))

    def update_fn(
        updates: optax.Updates,
        state: LookAheadState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, LookAheadState]:
        step, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        metrics = step_metrics(inner_state)
        ahead = jnp.minimum(horizon, metrics["staleness"])
        delivered = metrics["delivered"] > 0

        def move(u: jax.Array, old: jax.Array) -> tuple[jax.Array, jax.Array]:
            offset = jnp.where(delivered, ahead.astype(u.dtype) * u, old)
            return u + (offset - old), offset

        moved = jax.tree.map(move, step, state.offset)
        outer = jax.tree.structure(step)
        update, offset = jax.tree.transpose(outer, jax.tree.structure((0, 0)), moved)
        return update, LookAheadState(inner_state, offset)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
