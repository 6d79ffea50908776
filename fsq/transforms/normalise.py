r"""Normalisation: the delivered sums become the inner optimizer's input.

The channels delivered at step :math:`t` are sums of weighted gradients,
:math:`\sum \omega\, g` (after delay compensation and robust aggregation, if any), with
:math:`a_t = \sum \omega` their total weight. Two normalisations:

- ``by="workers"`` (gradient scope) — the inner optimizer steps on the mean over all
  :math:`W` workers, and its update is applied as it is:

  .. math:: G_t = \frac{1}{W} \textstyle\sum \omega\, g, \qquad u_t = \mathrm{inner}(G_t)

- ``by="weight"`` (step scope) — it steps on the weighted mean, and its update is scaled
  by the total weight:

  .. math:: G_t = \frac{\sum \omega\, g}{a_t}, \qquad u_t = \frac{a_t}{W}\,\mathrm{inner}(G_t)

  For SGD both are the same. For scale-invariant inner optimizers (Adam, RMSProp,
  AdaGrad) scaling the gradient barely changes the step, so only the step scope lets a
  staleness rule tame stale gradients (:mod:`fsq.staleness`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fsq.transforms.message import DeliverTransformation

BY = ("workers", "weight")


def normalise(by: str = "workers") -> DeliverTransformation:
    """Divides the delivered sum by :math:`W` (``"workers"``) or by its weight (``"weight"``).

    The last piece of every delivery side; :func:`fsq.asynchronous` adds
    ``normalise("workers")`` when none is given.

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> by_weight = fsq.transforms.normalise("weight")
      >>> totals = fsq.transforms.Totals(*[jnp.float32(2)] * 7)  # weight 2
      >>> arrival = fsq.transforms.Arrival((jnp.array([6.0]),), totals)
      >>> context = fsq.transforms.Context(jnp.int32(0), jnp.int32(0), 4, 0, 1)
      >>> out, _ = by_weight.update(arrival, (), None, context)
      >>> print(out.channels[0], out.step_scale)  # weighted mean 3, step scaled by 2 / 4
      [3.] 0.5
    """
    if by not in BY:
        raise ValueError(f"by must be one of {BY}, got {by!r}")

    def update(arrival, state, params, context):
        del params
        (total,) = arrival.channels
        if by == "weight":
            norm = jnp.maximum(arrival.totals.weight, 1e-30)
            step_scale = arrival.totals.weight / context.num_workers
        else:
            norm, step_scale = context.num_workers, None
        mean = jax.tree.map(lambda s: s / norm, total)
        return arrival._replace(channels=(mean,), step_scale=step_scale), state

    return DeliverTransformation(lambda params, layout: optax.EmptyState(), update, normalises=True)
