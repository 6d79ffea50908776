r"""Robust aggregation at delivery: the workers' votes, reduced by a rule that resists outliers.

With a robust rule (:mod:`fsq.aggregation`) the delay line keeps each worker's messages
apart, and this piece sees the sums delivered from each worker :math:`i` at step
:math:`t`, :math:`S_i = \sum_s \omega_{i,s}\, g_i(s)`, with weights :math:`a_i = \sum_s
\omega_{i,s}`. A worker that delivers *votes* :math:`v_i = S_i / a_i`; every device
remembers each worker's latest vote and the step it arrived (:class:`Votes`, identical
on all devices), and the rule reduces the votes that arrived within the last
:math:`d_{\max} + 1` steps:

.. math:: \textstyle\sum \omega\, g \;\leftarrow\; \mathrm{rule}(\{v_i\}) \sum_i a_i.

All channels (those of delay compensation too) are reduced together, coordinate-wise.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fsq.aggregation import Aggregation
from fsq.transforms.message import DeliverTransformation, accumulation_dtype

NEVER = -(2**30)  # the step of a worker that has not voted yet


class Votes(NamedTuple):
    """Every worker's latest vote, identical on all devices.

    Attributes:
      latest: ``[W, n]``, worker ``i``'s latest vote (zeros before its first), its
        channels flattened and concatenated.
      at: ``[W]`` (int32), the step it arrived (``-2**30`` before the first).
    """

    latest: jax.Array
    at: jax.Array


def aggregate(
    rule: Aggregation,
    votes: Votes,
    sums: jax.Array,
    weights: jax.Array,
    step: jax.Array,
    horizon: int,
) -> tuple[jax.Array, Votes]:
    """The robust stand-in for ``sums.sum(0)``, and the votes remembered.

    ``sums`` is ``[W, n]``, one row of weighted sums per worker delivered at ``step``,
    ``weights`` ``[W]`` their total weights (0 for a worker with nothing delivered). A
    delivery replaces the worker's vote with ``sums / weights``; ``rule`` reduces the
    votes that arrived within the last ``horizon + 1`` steps, times the total weight.
    """
    fresh = weights > 0
    latest = jnp.where(fresh[:, None], sums / jnp.where(fresh, weights, 1)[:, None], votes.latest)
    votes = Votes(latest, jnp.where(fresh, step, votes.at))
    return rule.reduce(latest, step - votes.at <= horizon) * jnp.sum(weights), votes


def robust(rule: Aggregation) -> DeliverTransformation:
    """Reduces the workers' votes with ``rule`` (see the module); keeps workers apart.

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> median = fsq.transforms.robust(fsq.aggregation.median())
      >>> layout = fsq.transforms.Layout(num_workers=3, num_channels=1, max_delay=0)
      >>> state = median.init(jnp.zeros(1), layout)
      >>> by_worker = fsq.transforms.Totals(*[jnp.ones(3)] * 7)  # one vote each
      >>> sums = (jnp.array([[1.0], [2.0], [100.0]]),)
      >>> arrival = fsq.transforms.Arrival(sums, None, by_worker)
      >>> context = fsq.transforms.Context(jnp.int32(0), jnp.int32(0), 3, 0, 0)
      >>> out, state = median.update(arrival, state, None, context)
      >>> print(out.channels[0])  # the median 2, times the 3 votes' weight
      [6.]
    """
    if not isinstance(rule, Aggregation):
        raise TypeError(f"rule must be a fsq.aggregation rule, got {type(rule).__name__}")

    def init(params, layout):
        size = sum(int(np.size(x)) for x in jax.tree.leaves(params))
        width = layout.num_channels * size
        dtype = accumulation_dtype(params)
        return Votes(
            jnp.zeros((layout.num_workers, width), dtype),
            jnp.full((layout.num_workers,), NEVER, jnp.int32),
        )

    def update(arrival, state, params, context):
        del params
        sums = arrival.rows
        if sums is None:  # channels of its own making: flatten them
            leaves = [x for channel in arrival.channels for x in jax.tree.leaves(channel)]
            sums = jnp.concatenate([x.reshape(context.num_workers, -1) for x in leaves], axis=1)
        reduced, state = aggregate(
            rule, state, sums, arrival.by_worker.weight, context.step, context.max_delay
        )
        channels, offset = [], 0
        for channel in arrival.channels:
            parts, treedef = jax.tree.flatten(channel)
            rebuilt = []
            for x in parts:
                size = x[0].size
                rebuilt.append(reduced[offset : offset + size].reshape(x.shape[1:]))
                offset += size
            channels.append(jax.tree.unflatten(treedef, rebuilt))
        return arrival._replace(channels=tuple(channels), by_worker=None, rows=None), state

    return DeliverTransformation(init, update, workers_apart=True)
