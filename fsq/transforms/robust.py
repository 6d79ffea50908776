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

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fsq import _sharding
from fsq.aggregation import Aggregation
from fsq.transforms.message import DeliverTransformation, accumulation_dtype

NEVER = -(2**30)  # the step of a worker that has not voted yet


class Votes(NamedTuple):
    """Every worker's latest vote, identical on all devices.

    Attributes:
      latest: worker ``i``'s latest vote at ``i`` (zeros before its first): its channels,
        trees shaped like the gradient with leaves ``[W, *shape]``.
      at: ``[W]`` (int32), the step it arrived (``-2**30`` before the first).
    """

    latest: tuple[Any, ...]
    at: jax.Array


def aggregate(
    rule: Aggregation,
    votes: Votes,
    sums: tuple[Any, ...],
    weights: jax.Array,
    step: jax.Array,
    horizon: int,
) -> tuple[tuple[Any, ...], Votes]:
    """The robust stand-in for the sum of ``sums`` over the workers, and the votes
    remembered.

    ``sums`` holds one vote's worth of weighted sums per worker delivered at ``step``
    (leaves ``[W, *shape]``), ``weights`` ``[W]`` their total weights (0 for a worker with
    nothing delivered). A delivery replaces the worker's vote with ``sums / weights``;
    ``rule`` reduces the votes that arrived within the last ``horizon + 1`` steps, times
    the total weight.
    """
    fresh = weights > 0
    share = jnp.where(fresh, weights, 1)

    def latest(total, old):
        shape = (-1,) + (1,) * (total.ndim - 1)
        return jnp.where(fresh.reshape(shape), total / share.reshape(shape), old)

    votes = Votes(jax.tree.map(latest, sums, votes.latest), jnp.where(fresh, step, votes.at))
    reduced = rule.reduce(votes.latest, step - votes.at <= horizon)
    # Sharded like the votes (a reduction over the workers may come back replicated).
    reduced = jax.tree.map(
        lambda r, v: _sharding.typed_like(r, v, leading=1), reduced, votes.latest
    )
    return jax.tree.map(lambda x: x * jnp.sum(weights), reduced), votes


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
        dtype = accumulation_dtype(params)
        channel = jax.tree.map(lambda p: _sharding.zeros((layout.num_workers,), p, dtype), params)
        return Votes(
            (channel,) * layout.num_channels, jnp.full((layout.num_workers,), NEVER, jnp.int32)
        )

    def update(arrival, state, params, context):
        del params
        reduced, state = aggregate(
            rule,
            state,
            tuple(arrival.channels),
            arrival.by_worker.weight,
            context.step,
            context.max_delay,
        )
        return arrival._replace(channels=reduced, by_worker=None), state

    return DeliverTransformation(init, update, workers_apart=True)
