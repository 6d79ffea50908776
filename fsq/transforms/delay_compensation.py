r"""Delay compensation as two pieces: extra channels at send time, their combination at delivery.

See :mod:`fsq.compensation` for the method (DC-ASGD, Zheng et al. 2017). A worker sends
three channels, formed in the accumulation dtype (at least float32, so that
:math:`g \odot g` of a float16 gradient cannot overflow):

.. math:: (c_1, c_2, c_3) = (g,\; g \odot g,\; g \odot g \odot w_s),

and at delivery, with :math:`\sum` over the messages due at :math:`t`,

.. math:: \sum \tilde g = \textstyle\sum c_1 + \lambda_t \big(\sum c_2 \odot w_t - \sum c_3\big).

Where the channels of a finite gradient overflow (:math:`|g|` near the square root of the
largest float), the correction is dropped for those coordinates: the combination falls
back to :math:`\sum c_1` there, and the mean square of DC-ASGD-a keeps its last finite
value, so an overflow never reaches the parameters. Both are selects, fused into the
combination (a test per message would cost a pass over every gradient). Non-finite
gradients are rejected before (:func:`fsq.transforms.reject_non_finite`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fsq import _sharding
from fsq.compensation import DelayCompensation
from fsq.transforms.message import DeliverTransformation, SendTransformation, accumulation_dtype

NUM_CHANNELS = 3


def _need(params: optax.Params | None) -> optax.Params:
    if params is None:
        raise ValueError("compensation needs the current params: call update(g, s, params)")
    return params


def compensation_channels() -> SendTransformation:
    r"""Sends :math:`(g, g \odot g, g \odot g \odot w_s)` instead of :math:`g`.

    Needs ``params`` in ``update``; place it last on the worker side (after compression,
    so the channels are those of the compressed gradient).

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> dc = fsq.transforms.compensation_channels()
      >>> m = fsq.transforms.new_message(jnp.array([2.0]), 1, jnp.float32)
      >>> m, _ = dc.update(m, dc.init(None), jnp.array([3.0]), None)
      >>> print([c[0].item() for c in m.channels])
      [2.0, 4.0, 12.0]
    """

    def update(message, state, params, context):
        del context
        params = _need(params)
        gradient = message.gradient
        dtype = accumulation_dtype(params)
        square = jax.tree.map(lambda g: g.astype(dtype) * g.astype(dtype), gradient)
        at_send = jax.tree.map(lambda s, w: s * w, square, params)
        return message._replace(channels=(gradient, square, at_send)), state

    return SendTransformation(lambda params: optax.EmptyState(), update, channels=NUM_CHANNELS)


class CompensationState(NamedTuple):
    """``mean_square``: :math:`\\nu_t`, the EMA of delivered :math:`g \\odot g` (adaptive)."""

    mean_square: optax.Updates


def compensate(config: DelayCompensation) -> DeliverTransformation:
    r"""Combines the delivered channels into :math:`\sum \tilde g` (see the module).

    With ``config.adaptive`` (DC-ASGD-a), :math:`\lambda_t = \lambda_0 / \sqrt{\nu_t +
    \epsilon}` per coordinate, where :math:`\nu_t = m\,\nu_{t-1} + (1 - m)\, \sum c_2 / a_t`
    and :math:`a_t` is the total weight delivered; otherwise :math:`\lambda_t = \lambda`.

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> combine = fsq.transforms.compensate(fsq.compensation.constant(0.5))
      >>> totals = fsq.transforms.Totals(*[jnp.float32(1)] * 7)
      >>> sums = (jnp.array([2.0]), jnp.array([4.0]), jnp.array([4.0]))  # sent at w = 1
      >>> arrival = fsq.transforms.Arrival(sums, totals)
      >>> layout = fsq.transforms.Layout(num_workers=1, num_channels=3, max_delay=1)
      >>> out, _ = combine.update(arrival, combine.init(None, layout), jnp.array([3.0]), None)
      >>> print(out.channels[0])  # 2 + 0.5 * (4 * 3 - 4)
      [6.]
    """

    def init(params, layout):
        del layout
        if not config.adaptive:
            return CompensationState(optax.EmptyState())
        dtype = accumulation_dtype(params)
        return CompensationState(jax.tree.map(lambda p: _sharding.zeros((), p, dtype), params))

    def update(arrival, state, params, context):
        del context
        params = _need(params)
        first, square, at_send = arrival.channels
        weight = arrival.totals.weight
        if config.adaptive:

            def average(nu, c2):
                new = config.decay * nu + (1 - config.decay) * c2 / jnp.maximum(weight, 1e-30)
                return jnp.where((weight > 0) & jnp.isfinite(new), new, nu)

            mean_square = jax.tree.map(average, state.mean_square, square)
            strength = jax.tree.map(
                lambda nu: config.strength / jnp.sqrt(nu + config.eps), mean_square
            )
            state = CompensationState(mean_square)
        else:
            strength = jax.tree.map(lambda _: config.strength, first)

        def corrected(c1, lam, c2, w, c3):
            total = c1 + lam * (c2 * w - c3)
            return jnp.where(jnp.isfinite(total), total, c1)  # an overflowed correction

        total = jax.tree.map(corrected, first, strength, square, params, at_send)
        return arrival._replace(channels=(total,)), state

    return DeliverTransformation(init, update, channels=1)
