r"""Liveness: a worker that is down sends nothing, and the live ones stand in for it.

A :mod:`fsq.faults` model says which workers are live at each step (a pure function of
the seed, the step and the worker). A down worker's message is marked *lost*: it
carries nothing, and it is counted in ``lost`` when it would have been due. Each live
worker's message is weighted by :math:`W / n_s`, :math:`n_s` the number of live workers
at its sending step :math:`s`, so that every step's gradients keep the weight of a full
step; with delay 0 the inner optimizer sees the mean of the live gradients,

.. math:: G_t = \frac{1}{W} \sum_{i\ \text{live}} \frac{W}{n_t}\, g_i(t)
              = \frac{1}{n_t} \sum_{i\ \text{live}} g_i(t).

Every worker computes :math:`n_s` itself (liveness is a pure function of the seed), so
the re-weighting costs no communication.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fsq import _random
from fsq.faults import FaultModel
from fsq.transforms.message import SendTransformation, Status


def liveness(model: FaultModel) -> SendTransformation:
    """Marks the messages of down workers *lost* and weights live ones by :math:`W / n_s`.

    Place it first: a down worker's gradient is lost whatever else is wrong with it.

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> live = fsq.transforms.liveness(fsq.faults.crash([1], at=0))
      >>> context = fsq.transforms.Context(jnp.int32(0), jnp.int32(0), 4, 0, 0)
      >>> m = fsq.transforms.new_message(jnp.ones(2), 0, jnp.float32)
      >>> m, _ = live.update(m, live.init(None), None, context)
      >>> print(m.weight)  # 4 workers, 3 of them live
      1.3333334
    """
    if not isinstance(model, FaultModel):
        raise TypeError(f"model must be a fsq.faults model, got {type(model).__name__}")

    def update(message, state, params, context):
        del params

        def live(worker):
            key = context.key(_random.Stream.FAULT, worker)
            return model.live(key, context.step, worker)

        dtype = message.weight.dtype
        n_live = jnp.sum(jax.vmap(live)(jnp.arange(context.num_workers)).astype(dtype))
        share = context.num_workers / jnp.maximum(n_live, 1.0)
        message = message.mark(Status.LOST, ~live(context.worker))
        return message._replace(weight=message.weight * share), state

    return SendTransformation(lambda params: optax.EmptyState(), update)
