"""Gradient accumulation that steps its inner optimizer only when a batch is complete."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fsq import _checks


class AccumulationState(NamedTuple):
    """State of :func:`accumulate`.

    Attributes:
      microbatch: index ``0 .. num_microbatches - 1`` of the next call within its batch.
      gradient_sum: sum of the gradients received so far in this batch (at least float32).
      inner_state: state of the inner optimizer; it changes only on the last microbatch.
    """

    microbatch: jax.Array
    gradient_sum: optax.Updates
    inner_state: optax.OptState


def accumulate(
    inner: optax.GradientTransformation, num_microbatches: int
) -> optax.GradientTransformationExtraArgs:
    r"""Averages the gradients of ``num_microbatches`` calls, then steps ``inner`` once.

    .. math::

      \bar g = \frac{1}{k} \sum_{j=1}^{k} g_j, \qquad
      u = \begin{cases} \mathrm{inner}(\bar g) & \text{on call } k, 2k, \dots \\
                        0 & \text{otherwise.} \end{cases}

    Unlike :class:`optax.MultiSteps`, the inner update runs under ``lax.cond`` and is
    executed only on the last microbatch of each batch, so a heavy inner optimizer costs
    nothing on the other calls, and its schedules count batches, not microbatches.
    Low-precision gradients are summed in (at least) float32.

    Args:
      inner: the optimizer stepped once per batch.
      num_microbatches: ``k >= 1``, the number of calls that make one batch.

    Returns:
      An ``optax.GradientTransformationExtraArgs``: extra arguments of ``update`` (a
      loss ``value=``, say) are passed on to ``inner``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from fsq import accumulate
      >>> tx = accumulate(optax.sgd(1.0), num_microbatches=2)
      >>> params = jnp.zeros(1)
      >>> state = tx.init(params)
      >>> u, state = tx.update(jnp.ones(1), state)      # first half: no step
      >>> u, state = tx.update(3 * jnp.ones(1), state)  # mean gradient 2
      >>> print(u)
      [-2.]
    """
    inner = optax.with_extra_args_support(_checks.transformation("inner", inner))
    k = _checks.integer("num_microbatches", num_microbatches, low=1)

    def sum_dtype(x: jax.Array) -> jnp.dtype:
        return jnp.promote_types(x.dtype, jnp.float32)

    def init_fn(params: optax.Params) -> AccumulationState:
        # zeros_like keeps the parameters' sharding (explicit meshes type it).
        gradient_sum = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=sum_dtype(p)), params)
        return AccumulationState(jnp.zeros([], jnp.int32), gradient_sum, inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        gradient_sum = jax.tree.map(lambda s, g: s + g.astype(s.dtype), state.gradient_sum, updates)

        # The updates are an operand, not a constant the branches close over, so that
        # their zeros keep the updates' sharding.
        def step(gradient_sum, updates):
            mean = jax.tree.map(lambda s, g: (s / k).astype(g.dtype), gradient_sum, updates)
            new_updates, inner_state = inner.update(mean, state.inner_state, params, **extra_args)
            return new_updates, inner_state, optax.tree.zeros_like(gradient_sum)

        def wait(gradient_sum, updates):
            return optax.tree.zeros_like(updates), state.inner_state, gradient_sum

        last = state.microbatch == k - 1
        new_updates, inner_state, gradient_sum = jax.lax.cond(
            last, step, wait, gradient_sum, updates
        )
        microbatch = jnp.where(last, 0, state.microbatch + 1).astype(jnp.int32)
        return new_updates, AccumulationState(microbatch, gradient_sum, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
