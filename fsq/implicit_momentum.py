r"""The momentum that asynchrony adds, and how much explicit momentum to keep.

Mitliagkas, Zhang, Hadjis and Ré (2016), "Asynchrony begets momentum, with an application
to deep learning": an asynchronous update applies gradients taken at parameters some
steps old, and in expectation that is a momentum term. With a staleness whose mean is
:math:`\bar\tau` server steps, the implicit momentum is

.. math::

  \mu_{\text{async}} = \frac{\bar\tau}{1 + \bar\tau}

(their :math:`1 - 1/M` for :math:`M` workers, whose staleness has mean :math:`M - 1`), and
it adds to the optimizer's own momentum :math:`\mu`. Tuned for synchronous training, the
sum overshoots; the paper's remedy is to lower the explicit momentum under asynchrony.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax.numpy as jnp

from fsq import _checks, optimizers

# The catalogue's optimizers with momentum: the keyword of their momentum, and whether its
# trace is undamped (effective step eta / (1 - mu), which a lowered mu must keep).
MOMENTUM_KEYWORDS = {
    "momentum": ("momentum", True),
    "nesterov": ("momentum", True),
    "adam": ("b1", False),
}


def asynchrony_momentum(mean_staleness: Any) -> Any:
    r"""The implicit momentum of asynchrony with a staleness of mean ``mean_staleness``.

    .. math::

      \mu_{\text{async}} = \frac{\bar\tau}{1 + \bar\tau}

    Args:
      mean_staleness: :math:`\bar\tau \ge 0`, in server steps (e.g. a delay model's
        ``mean_delay``); it may be traced.

    Returns:
      :math:`\mu_{\text{async}} \in [0, 1)`.

    Raises:
      ValueError: if ``mean_staleness`` is negative or not finite.

    Example:
      >>> import fsq
      >>> print(round(float(fsq.asynchrony_momentum(fsq.delays.uniform(4).mean_delay)), 4))
      0.6667
    """
    _checks.real_in_range("mean_staleness", mean_staleness, 0.0, float("inf"), high_open=True)
    return jnp.asarray(mean_staleness, jnp.float32) / (1.0 + mean_staleness)


def momentum_under_delay(momentum: Any, mean_staleness: Any) -> Any:
    r"""The explicit momentum to keep under asynchrony: what asynchrony does not already add.

    .. math::

      \mu' = \max\left(0,\; \mu - \frac{\bar\tau}{1 + \bar\tau}\right)

    Synchronous training (:math:`\bar\tau = 0`) keeps :math:`\mu`; a mean staleness of
    one step takes 0.5 off it, of nine steps 0.9. Use :math:`\mu'` for Adam's :math:`\beta_1`
    as it is. For an undamped trace (``fsq.momentum``, ``fsq.nesterov``, whose effective
    step is :math:`\eta / (1 - \mu)`), also scale the learning rate by
    :math:`(1 - \mu') / (1 - \mu)` so that the step a consistent gradient takes is
    unchanged; :func:`rate_under_delay` does.

    Args:
      momentum: the momentum tuned for synchronous training, :math:`\mu \in [0, 1)`.
      mean_staleness: :math:`\bar\tau \ge 0`, in server steps; it may be traced.

    Returns:
      :math:`\mu'`, a float32 array.

    Raises:
      ValueError: if ``momentum`` is outside ``[0, 1)`` or ``mean_staleness`` is negative.

    Example:
      >>> import fsq
      >>> delay = fsq.delays.uniform(4)  # mean 2: asynchrony adds 2/3
      >>> inner = fsq.adam(1e-3, b1=float(fsq.momentum_under_delay(0.9, delay.mean_delay)))
      >>> print(round(float(fsq.momentum_under_delay(0.9, delay.mean_delay)), 4))
      0.2333
    """
    _checks.probability_like("momentum", momentum)
    return jnp.maximum(momentum - asynchrony_momentum(mean_staleness), 0.0)


def rate_under_delay(learning_rate: Any, momentum: Any, mean_staleness: Any) -> Any:
    r"""The learning rate of an undamped momentum trace whose momentum is lowered by
    :func:`momentum_under_delay`, keeping its effective step :math:`\eta / (1 - \mu)`.

    .. math::

      \eta' = \eta \, \frac{1 - \mu'}{1 - \mu}

    Args:
      learning_rate: :math:`\eta \ge 0` (a float, possibly traced), or a schedule.
      momentum: the synchronous momentum :math:`\mu \in [0, 1)`.
      mean_staleness: :math:`\bar\tau \ge 0`, in server steps.

    Returns:
      :math:`\eta'`, a float32 array, or the schedule scaled by the same factor.

    Example:
      >>> import fsq
      >>> mean = fsq.delays.uniform(16).mean_delay  # 8: asynchrony adds 8/9
      >>> rate = fsq.rate_under_delay(0.01, 0.9, mean)
      >>> inner = fsq.nesterov(rate, momentum=float(fsq.momentum_under_delay(0.9, mean)))
      >>> print(round(float(rate), 4))  # 0.01 (1 - 0.9 + 8/9) / (1 - 0.9)
      0.0989
    """
    _checks.learning_rate(learning_rate)
    kept = momentum_under_delay(momentum, mean_staleness)
    if callable(learning_rate):
        return lambda count: learning_rate(count) * (1.0 - kept) / (1.0 - momentum)
    return learning_rate * (1.0 - kept) / (1.0 - momentum)


def hyperparameters_under_delay(name: str, mean_staleness: Any, **hparams: Any) -> dict[str, Any]:
    r"""The keywords of ``fsq.<name>`` for a mean staleness :math:`\bar\tau`: its momentum
    lowered by :func:`momentum_under_delay` (Adam's :math:`\beta_1`; heavy ball's and
    Nesterov's :math:`\mu`, with the rate scaled by :func:`rate_under_delay`). An optimizer
    without momentum (SGD, BGD, AdaGrad, RMSProp) keeps its keywords.

    Args:
      name: a name of :func:`fsq.get_optimizer`.
      mean_staleness: :math:`\bar\tau \ge 0`, in server steps: a delay model's
        ``mean_delay``, or a compute model's ``mean_staleness()``; it may be traced.
      **hparams: the keywords for synchronous training (``learning_rate`` included; an
        absent momentum is the constructor's default).

    Returns:
      The keywords to pass to :func:`fsq.get_optimizer` with ``name``.

    Raises:
      ValueError: if ``name`` is unknown, if heavy ball or Nesterov come without
        ``learning_rate``, or as :func:`momentum_under_delay`.

    Example:
      >>> import fsq
      >>> delay = fsq.delays.uniform(4)  # mean 2: asynchrony adds 2/3
      >>> hparams = fsq.hyperparameters_under_delay("adam", delay.mean_delay, learning_rate=1e-3)
      >>> tx = fsq.get_optimizer("adam", **hparams)
      >>> print(round(float(hparams["b1"]), 4))
      0.2333
    """
    if name not in optimizers.OPTIMIZERS:
        raise ValueError(f"name must be one of {sorted(optimizers.OPTIMIZERS)}, got {name!r}")
    if name not in MOMENTUM_KEYWORDS:
        return dict(hparams)
    keyword, undamped = MOMENTUM_KEYWORDS[name]
    if undamped and "learning_rate" not in hparams:
        raise ValueError(
            f"learning_rate must be given for {name!r}: it is scaled with the momentum"
        )
    default = inspect.signature(optimizers.OPTIMIZERS[name]).parameters[keyword].default
    momentum = _checks.probability_like(keyword, hparams.get(keyword, default))
    out = {**hparams, keyword: momentum_under_delay(momentum, mean_staleness)}
    if undamped:
        out["learning_rate"] = rate_under_delay(hparams["learning_rate"], momentum, mean_staleness)
    return out
