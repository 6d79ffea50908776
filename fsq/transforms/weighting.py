r"""Weights of messages: by their staleness, and by their worker's share of the batch.

A message is sent scaled by its weight :math:`\omega`, and the weights travel with it, so
that delivery can normalise by their sum (:func:`fsq.transforms.normalise`).

- :func:`scale_by_staleness` multiplies it by a staleness rule :math:`\alpha(d)` of its
  delay (:mod:`fsq.staleness`).
- :func:`scale_by_worker` multiplies worker :math:`i`'s by a fixed :math:`\omega_i`: with
  load balancing (:meth:`fsq.delays.Speeds.shares`) worker :math:`i` computes on a share
  :math:`s_i` of the global batch, and :math:`\omega_i = W s_i` weighs its gradient by
  the examples it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fsq import _checks
from fsq.staleness import StalenessRule
from fsq.transforms.message import SendTransformation


def scale_by_staleness(
    rule: StalenessRule | Callable[[jax.Array], jax.Array],
) -> SendTransformation:
    r"""Multiplies each message's weight by :math:`\alpha(d)`, ``d`` its delay.

    Args:
      rule: a :class:`fsq.staleness.StalenessRule` or a callable ``tau -> alpha`` on float
        arrays.

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> scale = fsq.transforms.scale_by_staleness(fsq.staleness.inverse())
      >>> m = fsq.transforms.new_message(jnp.ones(1), 4, jnp.float32)
      >>> m, _ = scale.update(m, scale.init(None), None, None)
      >>> print(m.weight)
      0.25
    """
    scale = rule.scale if isinstance(rule, StalenessRule) else rule
    if not callable(scale):
        raise TypeError(f"rule must be a StalenessRule or a callable, got {rule!r}")

    def update(message, state, params, context):
        del params, context
        alpha = scale(message.age.astype(message.weight.dtype))
        return message._replace(weight=message.weight * alpha), state

    return SendTransformation(lambda params: optax.EmptyState(), update, summable=True)


def scale_by_worker(weights: Sequence[float]) -> SendTransformation:
    r"""Multiplies worker :math:`i`'s weight by ``weights[i] > 0`` (load balancing: :math:`W s_i`).

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> scale = fsq.transforms.scale_by_worker([0.5, 1.5])
      >>> context = fsq.transforms.Context(jnp.int32(0), jnp.int32(1), 2, 0, 0)
      >>> m = fsq.transforms.new_message(jnp.ones(1), 0, jnp.float32)
      >>> m, _ = scale.update(m, scale.init(None), None, context)
      >>> print(m.weight)
      1.5
    """
    table = np.asarray([_checks.positive("weights[i]", w) for w in weights], np.float64)

    def update(message, state, params, context):
        del params
        if context.num_workers != table.size:
            raise ValueError(
                f"weights has {table.size} entries, but there are {context.num_workers} workers"
            )
        weight = jnp.asarray(table, message.weight.dtype)[context.worker]
        return message._replace(weight=message.weight * weight), state

    return SendTransformation(lambda params: optax.EmptyState(), update)
