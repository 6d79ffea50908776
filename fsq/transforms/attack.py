r"""Byzantine workers: live workers that send something else than their gradient.

A :mod:`fsq.faults` model's ``send`` replaces what a Byzantine worker sends (for example
:math:`-4\,g`, or Gaussian noise); only a robust aggregation (:mod:`fsq.aggregation`)
can resist it. What is sent is checked again for finiteness and rejected if it is not.
Placed after worker momentum, the attacker corrupts the message an honest worker would
have sent, momentum included.
"""

from __future__ import annotations

import optax

from fsq import _random
from fsq.faults import FaultModel
from fsq.transforms.message import SendTransformation, Status
from fsq.transforms.rejection import all_finite


def attack(model: FaultModel) -> SendTransformation:
    """Replaces what the model's Byzantine workers send (``model.send``).

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> evil = fsq.transforms.attack(fsq.faults.byzantine([0], factor=-4.0))
      >>> context = fsq.transforms.Context(jnp.int32(0), jnp.int32(0), 2, 0, 0)
      >>> m = fsq.transforms.new_message(jnp.ones(2), 0, jnp.float32)
      >>> m, _ = evil.update(m, evil.init(None), None, context)
      >>> print(m.gradient)
      [-4. -4.]
    """
    if not isinstance(model, FaultModel):
        raise TypeError(f"model must be a fsq.faults model, got {type(model).__name__}")

    def update(message, state, params, context):
        del params
        key = context.key(_random.Stream.FAULT)
        sent = model.send(key, context.step, context.worker, message.gradient)
        message = message.with_gradient(sent)
        return message.mark(Status.REJECTED, ~all_finite(sent)), state

    return SendTransformation(lambda params: optax.EmptyState(), update)
