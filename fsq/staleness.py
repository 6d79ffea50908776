r"""Staleness-aware step sizes: weigh each gradient by a function of its staleness.

A gradient computed at step :math:`s` and delivered at :math:`t` has staleness
:math:`\tau = t - s`, which in the logical clock is its delay, known when it is sent. A
rule :math:`\alpha(\tau)` scales it before it enters the in-flight buffer
(:func:`fsq.transforms.scale_by_staleness`), so a rule costs one multiply per parameter
at send time and nothing at delivery. Rules act in one of two *scopes*, which decide how
the delivered sums are normalised (:func:`fsq.transforms.normalise`):

- ``"gradient"`` — each gradient is scaled, the inner optimizer sees the scaled mean:

  .. math:: G_t = \frac{1}{W} \sum_{\text{delivered}} \alpha(\tau)\, g

- ``"step"`` — the rule weighs the delivered gradients, the inner optimizer sees their
  weighted mean, and its *update* is scaled by the total weight:

  .. math::

    G_t = \frac{\sum \alpha(\tau)\, g}{\sum \alpha(\tau)}, \qquad
    u_t = \frac{\sum \alpha(\tau)}{W}\, \mathrm{inner}(G_t)

  For SGD both scopes are the same. For scale-invariant inner optimizers (Adam,
  RMSProp, AdaGrad) scaling a gradient barely changes the step, so only the step scope
  tames staleness.

Rules (all equal 1 at :math:`\tau = 0`, so synchronous training is unchanged):

- ``"inverse"`` — :math:`\alpha(\tau) = 1 / \max(1, \tau)`, gradient scope: the
  staleness-dependent learning rate of Zhang, Gupta, Lian and Liu, *Staleness-aware
  Async-SGD for Distributed Deep Learning* (IJCAI 2016). Robust but slow: old gradients
  barely count.
- ``"delay_adaptive"`` — :math:`\alpha(\tau) = \min(1, \tau_C / \tau)`, gradient scope:
  full steps for gradients up to a threshold :math:`\tau_C`, steps shrinking as
  :math:`1/\tau` beyond it, the delay-adaptive step size of Koloskova, Stich and Jaggi,
  *Sharper Convergence Guarantees for Asynchronous SGD* (NeurIPS 2022) and Mishchenko,
  Bach, Even and Woodworth, *Asynchronous SGD Beats Minibatch SGD Under Arbitrary
  Delays* (NeurIPS 2022), whose rates then depend on the *average* rather than the
  maximum delay. The threshold defaults to the delay model's mean delay (at least 1).
- ``"weighted_step"`` — :math:`\alpha(\tau) = \min(1, \tau_C / \tau)` with
  :math:`\tau_C = 3`, step scope: Flying Squirrel's rule, chosen by measurement (the
  coordination study of ``experiments/``): it keeps the stability margin of the
  synchronously tuned learning rate for any inner optimizer.
- a :class:`StalenessRule`, or any callable ``tau -> alpha`` (gradient scope).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fsq import _checks
from fsq.delays import DelayModel

SCOPES = ("gradient", "step")
RULES = ("inverse", "delay_adaptive", "weighted_step")


class StalenessRule(NamedTuple):
    """A staleness rule: ``scale(tau) -> alpha``, and its scope.

    ``tau`` is a float array of staleness values (in the dtype the weights are kept in);
    ``alpha`` has the same shape and dtype.
    """

    scale: Callable[[jax.Array], jax.Array]
    scope: str = "gradient"


def inverse() -> StalenessRule:
    r""":math:`\alpha(\tau) = 1 / \max(1, \tau)` (Zhang et al. 2016).

    Example:
      >>> import jax.numpy as jnp
      >>> from fsq import staleness
      >>> print(staleness.inverse().scale(jnp.array([0, 1, 4])))
      [1.   1.   0.25]
    """
    return StalenessRule(lambda tau: 1.0 / jnp.maximum(1.0, tau))


def delay_adaptive(threshold: float, scope: str = "gradient") -> StalenessRule:
    r""":math:`\alpha(\tau) = \min(1, \tau_C / \tau)` (Koloskova et al. 2022).

    Args:
      threshold: :math:`\tau_C > 0`, the largest staleness that keeps a full step.
      scope: ``"gradient"`` or ``"step"`` (see the module docstring).

    Example:
      >>> import jax.numpy as jnp
      >>> from fsq import staleness
      >>> print(staleness.delay_adaptive(2.0).scale(jnp.array([0, 2, 8])))
      [1.   1.   0.25]
    """
    _checks.positive("threshold", threshold)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    return StalenessRule(
        lambda tau: jnp.minimum(1.0, threshold / jnp.maximum(1.0, tau)),
        scope,
    )


def weighted_step(threshold: float = 3.0) -> StalenessRule:
    r"""Flying Squirrel's rule: :math:`\min(1, \tau_C / \tau)` weights, step scope.

    Args:
      threshold: :math:`\tau_C > 0`, the staleness up to which a gradient counts fully.
    """
    return delay_adaptive(threshold, scope="step")


def resolve(rule: Any, model: DelayModel) -> StalenessRule | None:
    """Turns ``flying_squirrel(staleness=...)`` into a rule, or ``None`` when off."""
    if rule is None or isinstance(rule, StalenessRule):
        return rule
    if rule == "inverse":
        return inverse()
    if rule == "delay_adaptive":
        return delay_adaptive(max(1.0, model.mean_delay))
    if rule == "weighted_step":
        return weighted_step()
    if callable(rule):
        return StalenessRule(rule)
    raise ValueError(f"staleness must be None, one of {RULES} or a callable, got {rule!r}")
