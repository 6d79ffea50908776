r"""Staleness-aware step sizes: scale each gradient by a function of its staleness.

A gradient computed at step :math:`s` and delivered at :math:`t` has staleness
:math:`\tau = t - s`, which in the logical clock is its delay, known when it is sent. A
rule :math:`\alpha(\tau)` scales it before it enters the in-flight buffer, so a rule
costs one multiply per parameter at send time and nothing at delivery:

.. math:: G_t = \frac{1}{W} \sum_{(i,s):\, s + \tau_i(s) = t} \alpha(\tau_i(s))\, g_i(s)

Rules (all equal 1 at :math:`\tau = 0`, so synchronous training is unchanged):

- ``"inverse"`` — :math:`\alpha(\tau) = 1 / \max(1, \tau)`: the staleness-dependent
  learning rate of Zhang, Gupta, Lian and Liu, *Staleness-aware Async-SGD for
  Distributed Deep Learning* (IJCAI 2016). Robust but slow: old gradients barely count.
- ``"delay_adaptive"`` — :math:`\alpha(\tau) = \min(1, \tau_C / \tau)`: full steps for
  gradients up to a threshold :math:`\tau_C`, steps shrinking as :math:`1/\tau` beyond
  it, the delay-adaptive step size of Koloskova, Stich and Jaggi, *Sharper Convergence
  Guarantees for Asynchronous SGD* (NeurIPS 2022) and Mishchenko, Bach, Even and
  Woodworth, *Asynchronous SGD Beats Minibatch SGD Under Arbitrary Delays* (NeurIPS 2022),
  whose rates then depend on the *average* rather than the maximum delay. The threshold
  defaults to the delay model's mean delay (at least 1).
- any callable ``tau -> alpha`` on int32 arrays, for experiments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fsq import _checks
from fsq.delays import DelayModel

StalenessRule = Callable[[jax.Array], jax.Array]
RULES = ("inverse", "delay_adaptive")


def inverse() -> StalenessRule:
    r""":math:`\alpha(\tau) = 1 / \max(1, \tau)` (Zhang et al. 2016).

    Example:
      >>> import jax.numpy as jnp
      >>> from fsq.transforms import staleness
      >>> print(staleness.inverse()(jnp.array([0, 1, 4])))
      [1.   1.   0.25]
    """
    return lambda tau: 1.0 / jnp.maximum(1.0, tau.astype(jnp.float32))


def delay_adaptive(threshold: float) -> StalenessRule:
    r""":math:`\alpha(\tau) = \min(1, \tau_C / \tau)` (Koloskova et al. 2022).

    Args:
      threshold: :math:`\tau_C > 0`, the largest staleness that keeps a full step.

    Example:
      >>> import jax.numpy as jnp
      >>> from fsq.transforms import staleness
      >>> print(staleness.delay_adaptive(2.0)(jnp.array([0, 2, 8])))
      [1.   1.   0.25]
    """
    _checks.positive("threshold", threshold)
    return lambda tau: jnp.minimum(1.0, threshold / jnp.maximum(1.0, tau.astype(jnp.float32)))


def resolve(rule: Any, model: DelayModel) -> StalenessRule | None:
    """Turns ``flying_squirrel(staleness=...)`` into a rule, or ``None`` when off."""
    if rule is None:
        return None
    if rule == "inverse":
        return inverse()
    if rule == "delay_adaptive":
        return delay_adaptive(max(1.0, model.mean_delay))
    if callable(rule):
        return rule
    raise ValueError(f"staleness must be None, one of {RULES} or a callable, got {rule!r}")
