r"""Compression with error feedback: each worker sends a compressed gradient and keeps the rest.

With an operator :math:`\mathcal C` of :mod:`fsq.compression` and worker :math:`i`'s
residual :math:`e_i` (its own state, zero at first):

.. math::

  x = g_i(t) + e_i, \qquad \hat g_i(t) = \mathcal{C}(x), \qquad e_i \leftarrow x - \hat g_i(t),

and :math:`\hat g_i(t)` is sent. A message that carries nothing (its worker down, its
gradient rejected or dropped by the staleness bound) leaves the residual unchanged.
Without error feedback the residual is not kept and what :math:`\mathcal C` leaves out is
lost. The operator acts on the gradient's tree and the residual is shaped like it (and so
sharded like the parameters); a sparse operator's kept positions travel with the message
(:attr:`fsq.transforms.Message.support`), for the sparse exchange of the delay line.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fsq import _axes, _random, _sharding
from fsq.compression import Compressor, keep
from fsq.transforms.message import SendTransformation, accumulation_dtype


class ErrorFeedbackState(NamedTuple):
    """``residual``: :math:`e_i`, the worker's residual, shaped like the gradient
    (accumulation dtype)."""

    residual: optax.Updates


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

    def check_sharding():
        if not compressor.per_leaf and _axes.model_axes():
            raise ValueError(
                f"compression={compressor!r} chooses among every entry of the gradient at "
                f"once, which cannot run on a model sharded over {_axes.model_axes()}: "
                "compress leaf by leaf (fsq.compression.top_k(density, per_leaf=True), "
                "sign(), quantize())"
            )

    def init(params):
        check_sharding()
        if not feedback:
            return optax.EmptyState()
        dtype = accumulation_dtype(params)
        return ErrorFeedbackState(jax.tree.map(lambda p: _sharding.zeros((), p, dtype), params))

    def update(message, state, params, context):
        del params
        check_sharding()
        gradient = message.gradient
        if feedback:
            x = jax.tree.map(lambda g, e: g.astype(e.dtype) + e, gradient, state.residual)
        else:
            x = gradient
        # A shared operator (random-k) makes the same choice on every worker.
        worker = 0 if compressor.shared else None
        key = context.key(_random.Stream.COMPRESSION, worker)
        kept = None
        if compressor.sparse:
            kept = compressor.indices(x, key)
            sent = keep(x, kept)
        else:
            sent = compressor.compress(x, key)
        if feedback:
            residual = jax.tree.map(
                lambda x, s, e: jnp.where(message.sent, x - s, e), x, sent, state.residual
            )
            state = ErrorFeedbackState(residual)
        sent = jax.tree.map(lambda s, g: s.astype(g.dtype), sent, gradient)
        message = message.with_gradient(sent)
        return message._replace(support=kept, shared_support=compressor.shared), state

    def support(sizes):
        return compressor.count(sizes), compressor.leaf_counts(sizes)

    return SendTransformation(
        init,
        update,
        wire_bytes=compressor.payload_bytes,
        support=support if compressor.sparse else None,
    )
