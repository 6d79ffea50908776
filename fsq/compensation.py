r"""Delay compensation (DC-ASGD): correct a stale gradient with a Taylor step.

Zheng, Meng, Wang, Chen, Yu, Ma and Liu, *Asynchronous Stochastic Gradient Descent with
Delay Compensation* (ICML 2017): a gradient :math:`g` computed at :math:`w_s` and applied
at :math:`w_t` is replaced by a first-order estimate of the gradient at :math:`w_t`, with
the outer product :math:`\lambda\, g \odot g` as a cheap approximation of the Hessian:

.. math:: \tilde g = g + \lambda\, g \odot g \odot (w_t - w_s)

The correction is linear in three per-gradient quantities, so the sums over everything
delivered at step :math:`t` can be accumulated *at send time* and need no history of
parameters:

.. math::

  \sum \tilde g = \underbrace{\textstyle\sum g}_{c_1}
  + \lambda \Big(\underbrace{\textstyle\sum g \odot g}_{c_2} \odot w_t
  - \underbrace{\textstyle\sum g \odot g \odot w_s}_{c_3}\Big)

Each message therefore carries three channels instead of one
(:func:`fsq.transforms.compensation_channels` on the worker side,
:func:`fsq.transforms.compensate` at delivery). Two modes:

- constant (DC-ASGD-c): a fixed :math:`\lambda \ge 0`;
- adaptive (DC-ASGD-a): :math:`\lambda_t = \lambda_0 / \sqrt{\nu_t + \epsilon}`
  per coordinate, with :math:`\nu_t = m\, \nu_{t-1} + (1 - m)\, c_2 / a_t` an
  exponential moving average of the mean square of the gradients delivered at :math:`t`
  (weighted by their staleness weights, whose sum is :math:`a_t`; with no staleness rule
  :math:`a_t` is the number delivered); it normalizes the correction to the gradient
  scale, so :math:`\lambda_0` transfers across models.

Example:
  >>> import fsq
  >>> fsq.compensation.adaptive()
  DelayCompensation(strength=1.0, adaptive=True, decay=0.95, eps=1e-07)
  >>> fsq.compensation.resolve(0.5)
  DelayCompensation(strength=0.5, adaptive=False, decay=0.95, eps=1e-07)
"""

from __future__ import annotations

import dataclasses

from fsq import _checks


@dataclasses.dataclass(frozen=True)
class DelayCompensation:
    """Configuration of delay compensation (see the module docstring).

    Attributes:
      strength: :math:`\\lambda` (constant) or :math:`\\lambda_0` (adaptive), ``>= 0``.
      adaptive: DC-ASGD-a when true, DC-ASGD-c otherwise.
      decay: :math:`m \\in [0, 1)`, the EMA rate of the mean square (adaptive only).
      eps: :math:`\\epsilon > 0` (adaptive only).
    """

    strength: float
    adaptive: bool = False
    decay: float = 0.95
    eps: float = 1e-7


def constant(strength: float) -> DelayCompensation:
    """DC-ASGD-c with a fixed :math:`\\lambda` = ``strength >= 0``."""
    _checks.real_in_range("compensation", strength, 0.0)
    return DelayCompensation(_checks.scalar(strength))


def adaptive(strength: float = 1.0, decay: float = 0.95, eps: float = 1e-7) -> DelayCompensation:
    """DC-ASGD-a: :math:`\\lambda_t = \\lambda_0 / \\sqrt{\\nu_t + \\epsilon}`.

    Args:
      strength: :math:`\\lambda_0 \\ge 0`; the paper uses 2 on CIFAR-10; Flying Squirrel's
        default is 1, chosen with the weighted-step rule by the coordination study.
      decay: EMA rate :math:`m \\in [0, 1)` of the mean square.
      eps: :math:`\\epsilon > 0`.
    """
    _checks.real_in_range("strength", strength, 0.0)
    _checks.probability_like("decay", decay)
    _checks.positive("eps", eps)
    return DelayCompensation(
        _checks.scalar(strength), True, _checks.scalar(decay), _checks.scalar(eps)
    )


def resolve(
    compensation: float | str | DelayCompensation | None,
) -> DelayCompensation | None:
    """Turns ``flying_squirrel(compensation=...)`` into a configuration or ``None``.

    ``"adaptive"`` stands for :func:`adaptive` with its defaults.
    """
    if compensation is None or isinstance(compensation, DelayCompensation):
        return compensation
    if isinstance(compensation, str):  # a string, compared only then: a float may be traced
        if compensation == "adaptive":
            return adaptive()
        raise TypeError(
            "compensation must be None, a float lambda, 'adaptive' or "
            f"fsq.compensation.adaptive(...), got {compensation!r}"
        )
    return constant(compensation)
