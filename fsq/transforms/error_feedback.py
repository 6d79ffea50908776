r"""Compression with error feedback: each worker sends a compressed gradient and keeps the rest.

With an operator :math:`\mathcal C` of :mod:`fsq.compression` and worker :math:`i`'s
residual :math:`e_i` (its own state, zero at first):

.. math::

  x = g_i(t) + e_i, \qquad \hat g_i(t) = \mathcal{C}(x), \qquad e_i \leftarrow x - \hat g_i(t),

and :math:`\hat g_i(t)` is sent. A message that carries nothing (its worker down, its
gradient rejected or dropped by the staleness bound) leaves the residual unchanged.
Without error feedback the residual is not kept and what :math:`\mathcal C` leaves out is
lost. The operator acts on the flattened gradient; a sparse operator's kept positions
travel with the message (:attr:`fsq.transforms.Message.support`), for the sparse
exchange of the delay line.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from fsq import _random
from fsq.compression import Compressor
from fsq.transforms.message import SendTransformation, accumulation_dtype


class ErrorFeedbackState(NamedTuple):
    """``residual``: :math:`e_i`, the worker's flattened residual (accumulation dtype)."""

    residual: jax.Array


def compress(compressor: Compressor) -> SendTransformation:
    """Sends :math:`\\mathcal C(g + e)` and keeps :math:`e` (see the module).

    Args:
      compressor: an operator of :mod:`fsq.compression`; its ``error_feedback`` decides
        whether the residual is kept.

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> top = fsq.transforms.compress(fsq.compression.top_k(0.5))
      >>> state = top.init(jnp.zeros(4))
      >>> context = fsq.transforms.Context(jnp.int32(0), jnp.int32(0), 1, 0, 0)
      >>> m = fsq.transforms.new_message(jnp.array([0.1, -3.0, 2.0, 0.5]), 0, jnp.float32)
      >>> m, state = top.update(m, state, None, context)
      >>> print(m.gradient, state.residual)
      [ 0. -3.  2.  0.] [0.1 0.  0.  0.5]
    """
    if not isinstance(compressor, Compressor):
        raise TypeError(
            "compressor must be a fsq.compression operator (top_k, random_k, sign, quantize), "
            f"got {type(compressor).__name__} {compressor!r}"
        )
    feedback = compressor.error_feedback

    def init(params):
        if not feedback:
            return optax.EmptyState()
        size = sum(x.size for x in jax.tree.leaves(params))
        return ErrorFeedbackState(jnp.zeros(size, accumulation_dtype(params)))

    def update(message, state, params, context):
        del params
        flat, unravel = ravel_pytree(message.gradient)
        x = flat.astype(state.residual.dtype) + state.residual if feedback else flat
        sizes = [g.size for g in jax.tree.leaves(message.gradient)]
        # A shared operator (random-k) makes the same choice on every worker.
        worker = 0 if compressor.shared else None
        key = context.key(_random.Stream.COMPRESSION, worker)
        kept = None
        if compressor.sparse:
            kept = compressor.indices(x, sizes, key)
            sent = jnp.zeros_like(x).at[kept].set(x[kept])
        else:
            sent = compressor.compress(x, sizes, key)
        if feedback:
            state = ErrorFeedbackState(jnp.where(message.sent, x - sent, state.residual))
        message = message.with_gradient(unravel(sent.astype(flat.dtype)))
        return message._replace(support=kept, shared_support=compressor.shared), state

    return SendTransformation(init, update, wire_bytes=compressor.payload_bytes)
