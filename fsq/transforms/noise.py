r"""Gaussian noise added by each worker to what it sends (local differential privacy).

.. math:: g_i \leftarrow g_i + \sigma\, \xi_i(t), \qquad \xi_i(t) \sim \mathcal N(0, I)

With per-worker clipping before it (``optax.clip_by_global_norm(C)`` on the worker side)
this is DP-SGD's Gaussian mechanism applied by every worker (Abadi et al., *Deep
Learning with Differential Privacy*, CCS 2016, with the noise added locally). The noise
of worker :math:`i` at step :math:`t` is drawn from the key of ``(seed, t, i)``, so a run
is the same whatever the layout of workers onto devices.
"""

from __future__ import annotations

import jax
import optax

from fsq import _checks, _random
from fsq.transforms.message import SendTransformation


def gaussian_noise(stddev: float) -> SendTransformation:
    r"""Adds :math:`\sigma\, \xi` to each worker's gradient, :math:`\sigma` = ``stddev >= 0``.

    Leaf :math:`\ell` (in flattening order) draws its noise from
    ``jax.random.split(key, num_leaves)[l]``, with ``key`` the worker's key of the
    :data:`fsq._random.Stream.NOISE` stream at this step.

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> noise = fsq.transforms.gaussian_noise(0.0)
      >>> context = fsq.transforms.Context(jnp.int32(0), jnp.int32(0), 1, 0, 0)
      >>> m = fsq.transforms.new_message(jnp.ones(2), 0, jnp.float32)
      >>> m, _ = noise.update(m, noise.init(None), None, context)
      >>> print(m.gradient)
      [1. 1.]
    """
    stddev = float(_checks.real_in_range("stddev", stddev, 0.0))

    def update(message, state, params, context):
        del params
        leaves, treedef = jax.tree.flatten(message.gradient)
        keys = jax.random.split(context.key(_random.Stream.NOISE), max(len(leaves), 1))
        noisy = [
            g + (stddev * jax.random.normal(k, g.shape, g.dtype))
            for k, g in zip(keys, leaves, strict=False)
        ]
        return message.with_gradient(jax.tree.unflatten(treedef, noisy)), state

    return SendTransformation(lambda params: optax.EmptyState(), update)
