r"""Worker momentum: each worker sends an average of its recent gradients.

.. math:: m_i \leftarrow \beta\, m_i + (1 - \beta)\, g_i, \qquad \text{send } m_i

(Karimireddy, He and Jaggi, *Learning from History for Byzantine Robust Optimization*,
ICML 2021): averaging over time shrinks the honest workers' noise, so that a robust
aggregation (:mod:`fsq.aggregation`) can tell Byzantine messages apart. The momentum is
``optax.ema`` (without debiasing) kept in the accumulation dtype, one per worker; it is
not updated when the worker computed nothing usable (down, or a rejected gradient).
"""

from __future__ import annotations

import jax
import optax

from fsq import _checks
from fsq.transforms.message import SendTransformation, accumulation_dtype, on_gradient


def worker_momentum(beta: float) -> SendTransformation:
    r"""Each worker sends its momentum :math:`m_i` (see the module), :math:`\beta \in [0, 1)`.

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> momentum = fsq.transforms.worker_momentum(0.5)
      >>> state = momentum.init(jnp.zeros(1))
      >>> m = fsq.transforms.new_message(jnp.array([4.0]), 0, jnp.float32)
      >>> m, state = momentum.update(m, state, None, None)
      >>> print(m.gradient)  # 0.5 * 0 + 0.5 * 4
      [2.]
    """
    beta = _checks.scalar(_checks.probability_like("beta", beta))
    lifted = on_gradient(optax.ema(beta, debias=False))

    def init(params):
        dtype = accumulation_dtype(params)
        return lifted.init(jax.tree.map(lambda p: p.astype(dtype), params))

    return lifted._replace(init=init)
