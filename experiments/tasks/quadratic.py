r"""An ill-conditioned quadratic with a known optimum: stochastic linear least squares.

Examples are :math:`x \sim \mathcal N(0, \operatorname{diag}(c))` with curvatures
:math:`c` log-spaced from 1 / condition number to 1 (so that step sizes suit the same
grid as the other tasks), and targets
:math:`y = x^\top w^\star + \sigma \varepsilon`. The per-example loss
:math:`\tfrac12 (x^\top w - y)^2` has the expectation

.. math::

  L(w) = \tfrac12 (w - w^\star)^\top \operatorname{diag}(c)\, (w - w^\star) + \tfrac12 \sigma^2,

so the optimum :math:`w^\star` and the floor :math:`\sigma^2 / 2` are exact, and the test
loss is :math:`L(w)` itself, computed in closed form instead of on samples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments.tasks.base import Task

DIM, CONDITION, NOISE = 20, 100.0, 1.0


def curvatures(dim: int = DIM, condition: float = CONDITION) -> np.ndarray:
    """The eigenvalues of the Hessian, log-spaced in ``[1 / condition, 1]``."""
    return np.logspace(-np.log10(condition), 0.0, dim)


def task(dim: int = DIM, condition: float = CONDITION, noise: float = NOISE) -> Task:
    """The quadratic of ``dim`` parameters; the optimum :math:`c^{-1/2}` makes each
    direction contribute 1/2 to the initial excess loss (at ``w = 0``)."""
    c = jnp.asarray(curvatures(dim, condition), jnp.float32)
    optimum = 1.0 / jnp.sqrt(c)

    def init(key):
        del key  # the same start for every seed: only the data differ
        return {"w": jnp.zeros(dim)}

    def sample(key, size):
        x_key, noise_key = jax.random.split(key)
        x = jax.random.normal(x_key, (size, dim)) * jnp.sqrt(c)
        return x, x @ optimum + noise * jax.random.normal(noise_key, (size,))

    def loss(params, batch):
        x, y = batch
        return 0.5 * (x @ params["w"] - y) ** 2

    def evaluate(params):
        gap = 0.5 * jnp.sum(c * (params["w"] - optimum) ** 2)
        return {"test_loss": gap + 0.5 * noise**2}

    return Task("quadratic", init, loss, sample, evaluate, "test_loss", 0.5 * noise**2)
