r"""The classic catalogue: SGD, batch GD, momentum, Nesterov, AdaGrad, RMSProp and Adam.

Each entry is a thin, validated front to the optax alias of the same algorithm, so the
numerics are optax's own. Every constructor takes the learning rate first, as a float or
an optax schedule (``step -> learning rate``), and raises ``ValueError`` at construction
time for hyperparameters outside their range. Throughout, :math:`g_t` is the gradient at
step :math:`t`, :math:`\eta_t` the learning rate and :math:`u_t` the returned update
(added to the parameters with :func:`optax.apply_updates`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from fsq import _checks
from fsq.accumulation import accumulate

ScalarOrSchedule = float | optax.Schedule


def sgd(learning_rate: ScalarOrSchedule) -> optax.GradientTransformation:
    r"""Stochastic gradient descent.

    .. math::

      u_t = -\eta_t \, g_t

    The baseline every other method is measured against: one multiply per parameter, no
    state, and with a decaying step size the best-understood convergence guarantees. It is
    slow on ill-conditioned problems, where the step size must suit the sharpest direction,
    and it is the inner optimizer with the most predictable response to stale gradients.

    Args:
      learning_rate: :math:`\eta \ge 0`, or a schedule.

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> tx = fsq.sgd(0.1)
      >>> u, _ = tx.update(jnp.array([1.0, -2.0]), tx.init(jnp.zeros(2)))
      >>> print(u)
      [-0.1  0.2]
    """
    return optax.sgd(_checks.learning_rate(learning_rate))


def bgd(learning_rate: ScalarOrSchedule, num_microbatches: int) -> optax.GradientTransformation:
    r"""Batch gradient descent: average ``k = num_microbatches`` gradients, then one SGD step.

    .. math::

      u_t = \begin{cases} -\eta_n \frac{1}{k}\sum_{j=t-k+1}^{t} g_j & t + 1 \equiv 0 \pmod k \\
                          0 & \text{otherwise,} \end{cases}

    where :math:`n = \lfloor t / k \rfloor` counts full batches (schedules see :math:`n`).
    With ``k`` equal to the number of minibatches in the data set this is full-batch
    gradient descent: the least noisy direction, deterministic, and the natural reference
    for convergence proofs, at ``k`` gradient evaluations per step. The inner SGD step runs
    only on the last call of each batch (see :func:`fsq.accumulate`).

    Args:
      learning_rate: :math:`\eta \ge 0`, or a schedule of the batch count.
      num_microbatches: :math:`k \ge 1` calls per step.

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> tx = fsq.bgd(0.5, num_microbatches=2)
      >>> state = tx.init(jnp.zeros(1))
      >>> u, state = tx.update(jnp.ones(1), state)
      >>> u, state = tx.update(3 * jnp.ones(1), state)
      >>> print(u)
      [-1.]
    """
    return accumulate(sgd(learning_rate), num_microbatches)


def momentum(
    learning_rate: ScalarOrSchedule, momentum: float = 0.9
) -> optax.GradientTransformation:
    r"""Heavy-ball momentum (Polyak 1964), with optax's undamped trace.

    .. math::

      m_t = g_t + \mu \, m_{t-1}, \qquad u_t = -\eta_t \, m_t, \qquad m_{-1} = 0

    Momentum accumulates a velocity along consistent directions, which speeds up
    ill-conditioned problems by up to a factor :math:`\sqrt{\kappa}` and averages out
    gradient noise. The effective step is :math:`\eta / (1-\mu)`, and the velocity is itself
    a kind of staleness: under asynchrony the effective delay adds to the implicit
    :math:`1/(1-\mu)` memory, so high momentum and large delays compound.

    Args:
      learning_rate: :math:`\eta \ge 0`, or a schedule.
      momentum: :math:`\mu \in [0, 1)`.

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> tx = fsq.momentum(0.1, momentum=0.5)
      >>> state = tx.init(jnp.zeros(1))
      >>> u, state = tx.update(jnp.ones(1), state)
      >>> u, state = tx.update(jnp.ones(1), state)  # m = 1 + 0.5 * 1
      >>> print(u)
      [-0.15]
    """
    _checks.probability_like("momentum", momentum)
    return optax.sgd(_checks.learning_rate(learning_rate), momentum=momentum)


def nesterov(
    learning_rate: ScalarOrSchedule, momentum: float = 0.9
) -> optax.GradientTransformation:
    r"""Nesterov accelerated gradient (Nesterov 1983; Sutskever et al. 2013), optax form.

    .. math::

      m_t = g_t + \mu \, m_{t-1}, \qquad u_t = -\eta_t \, (g_t + \mu \, m_t)

    The look-ahead form of momentum: the update uses the velocity after this step, which
    damps the oscillations of heavy ball and gives the optimal
    :math:`O(\sqrt{\kappa}\log 1/\epsilon)` rate on smooth strongly convex problems. In
    practice it tolerates a slightly larger step than heavy ball at the same momentum.

    Args:
      learning_rate: :math:`\eta \ge 0`, or a schedule.
      momentum: :math:`\mu \in [0, 1)`.

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> tx = fsq.nesterov(0.1, momentum=0.5)
      >>> u, _ = tx.update(jnp.ones(1), tx.init(jnp.zeros(1)))  # g + 0.5 * g
      >>> print(u)
      [-0.15]
    """
    _checks.probability_like("momentum", momentum)
    return optax.sgd(_checks.learning_rate(learning_rate), momentum=momentum, nesterov=True)


def adagrad(
    learning_rate: ScalarOrSchedule,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
) -> optax.GradientTransformation:
    r"""AdaGrad (Duchi et al. 2011), with optax's accumulator and epsilon placement.

    .. math::

      s_t = s_{t-1} + g_t^2, \qquad u_t = -\eta_t \, \frac{g_t}{\sqrt{s_t + \epsilon}},
      \qquad s_{-1} = s_0^{\text{init}}

    Per-coordinate step sizes that shrink with the accumulated squared gradient: rare
    features keep large steps, which is why it shines on sparse and convex problems. The
    step size only decreases, so on long non-convex runs it can stall; it is also the most
    robust of the adaptive methods to the choice of :math:`\eta`.

    Args:
      learning_rate: :math:`\eta \ge 0`, or a schedule.
      initial_accumulator_value: :math:`s_0^{\text{init}} \ge 0`.
      eps: :math:`\epsilon > 0`, added inside the square root.

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> tx = fsq.adagrad(1.0, initial_accumulator_value=0.0, eps=1e-12)
      >>> u, _ = tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))  # 2 / sqrt(4)
      >>> print(u)
      [-1.]
    """
    _checks.real_in_range("initial_accumulator_value", initial_accumulator_value, 0.0)
    _checks.positive("eps", eps)
    return optax.adagrad(
        _checks.learning_rate(learning_rate),
        initial_accumulator_value=initial_accumulator_value,
        eps=eps,
    )


def rmsprop(
    learning_rate: ScalarOrSchedule, decay: float = 0.9, eps: float = 1e-8
) -> optax.GradientTransformation:
    r"""RMSProp (Tieleman and Hinton 2012), with optax's epsilon placement.

    .. math::

      \nu_t = \rho \, \nu_{t-1} + (1-\rho) \, g_t^2, \qquad
      u_t = -\eta_t \, \frac{g_t}{\sqrt{\nu_t + \epsilon}}, \qquad \nu_{-1} = 0

    AdaGrad with a forgetting factor: the per-coordinate scale tracks the recent gradient
    magnitude, so step sizes adapt without vanishing. It suits non-stationary, non-convex
    objectives; early steps are large (the average starts at zero, unbiased only after
    about :math:`1/(1-\rho)` steps), so it wants a smaller :math:`\eta` than SGD.

    Args:
      learning_rate: :math:`\eta \ge 0`, or a schedule.
      decay: :math:`\rho \in [0, 1)`.
      eps: :math:`\epsilon > 0`, added inside the square root.

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> tx = fsq.rmsprop(0.1, decay=0.75, eps=1e-12)
      >>> u, _ = tx.update(jnp.array([4.0]), tx.init(jnp.zeros(1)))  # 4 / sqrt(0.25 * 16)
      >>> print(u)
      [-0.2]
    """
    _checks.probability_like("decay", decay)
    _checks.positive("eps", eps)
    return optax.rmsprop(_checks.learning_rate(learning_rate), decay=decay, eps=eps)


def adam(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    r"""Adam (Kingma and Ba 2015), with optax's numerics (epsilon outside the root).

    .. math::

      m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
      v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \\
      u_t = -\eta_t \, \frac{m_t / (1-\beta_1^{t+1})}{\sqrt{v_t / (1-\beta_2^{t+1})} + \epsilon}

    Momentum plus RMSProp scaling with bias correction: the default choice for deep
    networks, fast from the first step and forgiving of poor conditioning. Its update is
    roughly scale-free (:math:`|u| \lesssim \eta`), which also bounds the damage a stale or
    outlying gradient can do; it can generalize worse than tuned SGD-momentum.

    Args:
      learning_rate: :math:`\eta \ge 0`, or a schedule.
      b1: :math:`\beta_1 \in [0, 1)`.
      b2: :math:`\beta_2 \in [0, 1)`.
      eps: :math:`\epsilon > 0`.

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> tx = fsq.adam(0.1)
      >>> u, _ = tx.update(jnp.array([3.0]), tx.init(jnp.zeros(1)))  # first step: -lr * sign
      >>> print(f"{float(u[0]):.4f}")
      -0.1000
    """
    _checks.probability_like("b1", b1)
    _checks.probability_like("b2", b2)
    _checks.positive("eps", eps)
    return optax.adam(_checks.learning_rate(learning_rate), b1=b1, b2=b2, eps=eps)


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": sgd,
    "bgd": bgd,
    "momentum": momentum,
    "nesterov": nesterov,
    "adagrad": adagrad,
    "rmsprop": rmsprop,
    "adam": adam,
}


def get_optimizer(name: str, **hparams: Any) -> optax.GradientTransformation:
    """Builds a catalogue optimizer by name.

    Args:
      name: one of ``"sgd", "bgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"``.
      **hparams: the keyword arguments of that constructor (``learning_rate`` included).

    Returns:
      The ``optax.GradientTransformation`` built by ``fsq.<name>(**hparams)``.

    Raises:
      ValueError: if ``name`` is unknown.

    Example:
      >>> import fsq
      >>> tx = fsq.get_optimizer("nesterov", learning_rate=0.1)
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"name must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name](**hparams)
