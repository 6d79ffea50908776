r"""Rejection of non-finite gradients: a NaN or an infinity never reaches the parameters.

A worker whose gradient holds a NaN or an infinity anywhere sends nothing: its message is
marked *rejected* (it travels as zeros, and is counted in ``rejected`` when it is due),
and the pieces after this one keep their state (worker momentum, error-feedback
residuals). The test is exact and costs one pass over the gradient:

.. math:: \mathrm{finite}(g) \iff \textstyle\sum_j 0 \cdot g_j = 0,

since :math:`0 \cdot x` is 0 for finite :math:`x` and NaN otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fsq.transforms.message import SendTransformation, Status


def all_finite(tree: optax.Updates) -> jax.Array:
    """Whether every entry of ``tree`` is finite (a bool scalar; true for an empty tree).

    ``sum(g @ 0)``, a product with zeros over each leaf's last axis, is one multithreaded
    pass over ``g``, much faster on CPU than reducing the boolean mask ``isfinite(g)``
    (see the documentation's performance page); it keeps the leaf's shape, and so its
    sharding.
    """

    def zero_or_nan(g):
        if not g.ndim:
            return g * 0
        return jnp.sum(g @ jnp.zeros(g.shape[-1], g.dtype))

    return jnp.isfinite(sum((zero_or_nan(g) for g in jax.tree.leaves(tree)), jnp.float32(0)))


def reject_non_finite() -> SendTransformation:
    """Marks a message whose gradient is not finite *rejected*.

    Place it before the pieces whose state must not see such a gradient.

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> reject = fsq.transforms.reject_non_finite()
      >>> m = fsq.transforms.new_message(jnp.array([1.0, jnp.nan]), 0, jnp.float32)
      >>> m, _ = reject.update(m, reject.init(None), None, None)
      >>> fsq.transforms.Status(int(m.status)).name
      'REJECTED'
    """

    def update(message, state, params, context):
        del params, context
        finite = all_finite(message.gradient) if message.finite is None else message.finite
        return message.mark(Status.REJECTED, ~finite), state

    return SendTransformation(lambda params: optax.EmptyState(), update, summable=True)
