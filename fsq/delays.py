r"""Delay models: how many logical steps each gradient spends in flight.

A delay model maps ``(key, step, worker)`` to an integer delay
:math:`d_i(t) \in [0, d_{\max}]`; the gradient worker :math:`i` computes at step :math:`t`
is delivered at step :math:`t + d_i(t)`. Models are pure, jit-friendly and hashable
(frozen dataclasses), and expose ``max_delay`` so the in-flight buffer can be sized
statically. The key passed to a model is already specific to ``(seed, step, worker)``
(see :func:`fsq._random.event_key`), so a model only decides the distribution.

Example:
  >>> import jax, fsq
  >>> model = fsq.delays.uniform(4)
  >>> d = model(jax.random.key(0), step=0, worker=3)
  >>> bool(0 <= d <= model.max_delay)
  True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fsq import _checks

__all__ = [
    "DelayModel",
    "Bandwidth",
    "Constant",
    "Categorical",
    "Transmission",
    "Speeds",
    "Trace",
    "constant",
    "uniform",
    "geometric",
    "heavy_tailed",
    "speeds",
    "trace",
    "bandwidth",
    "as_delay_model",
]

# A bound far beyond any sensible simulation that keeps ring sizes and integer sums sane.
MAX_SUPPORTED_DELAY = 1 << 16


@dataclasses.dataclass(frozen=True)
class DelayModel:
    """Base class: a distribution of delays in ``[0, max_delay]``.

    Attributes:
      max_delay: the largest delay the model can produce; the in-flight buffer holds
        ``max_delay + 1`` delivery rows (none when ``max_delay`` is 0).
      num_workers: the number of workers the model is defined for, or ``None`` if any.
    """

    max_delay: int
    num_workers: int | None = None

    def __call__(self, key: jax.Array, step: jax.Array, worker: jax.Array) -> jax.Array:
        """Returns the delay (int32 scalar) of ``worker``'s gradient sent at ``step``."""
        raise NotImplementedError

    @property
    def mean_delay(self) -> float:
        """The expected delay, averaged over workers and steps."""
        raise NotImplementedError

    @property
    def min_delay(self) -> int:
        """The smallest delay the model can produce (a gradient is never delivered sooner)."""
        return 0

    def for_message(self, num_bytes: int) -> DelayModel:
        """The model for messages of ``num_bytes`` bytes: itself, for a model whose delays
        do not depend on the message (see :class:`Bandwidth`)."""
        del num_bytes
        return self


@dataclasses.dataclass(frozen=True)
class Constant(DelayModel):
    """Every gradient is delivered exactly ``max_delay`` steps after it is sent."""

    def __call__(self, key, step, worker):
        del key, step, worker
        return jnp.int32(self.max_delay)

    @property
    def mean_delay(self) -> float:
        return float(self.max_delay)

    @property
    def min_delay(self) -> int:
        return self.max_delay


@dataclasses.dataclass(frozen=True)
class Categorical(DelayModel):
    """Delays drawn i.i.d. from a fixed table: ``P(d = k) = probabilities[k]``."""

    probabilities: tuple[float, ...] = (1.0,)

    def __call__(self, key, step, worker):
        del step, worker
        logits = jnp.log(jnp.asarray(self.probabilities, jnp.float32))
        return jax.random.categorical(key, logits).astype(jnp.int32)

    @property
    def mean_delay(self) -> float:
        return float(np.dot(np.arange(len(self.probabilities)), self.probabilities))

    @property
    def min_delay(self) -> int:
        return int(np.flatnonzero(np.asarray(self.probabilities) > 0)[0])


@dataclasses.dataclass(frozen=True)
class Speeds(DelayModel):
    """Worker ``i`` is ``slowdowns[i]`` times slower than the fastest possible worker.

    A worker ``k`` times slower needs ``k`` ticks of the logical clock per gradient, so its
    gradient arrives ``k - 1`` steps late on average; fractional parts are rounded
    stochastically so that the mean delay is exactly ``slowdowns[i] - 1``.
    """

    slowdowns: tuple[float, ...] = (1.0,)

    def __call__(self, key, step, worker):
        del step
        lateness = jnp.asarray(self.slowdowns, jnp.float32)[worker] - 1.0
        delay = jnp.floor(lateness + jax.random.uniform(key, dtype=jnp.float32))
        return jnp.minimum(delay, self.max_delay).astype(jnp.int32)

    @property
    def mean_delay(self) -> float:
        return float(np.mean(self.slowdowns)) - 1.0

    @property
    def min_delay(self) -> int:
        return min(math.floor(min(self.slowdowns) - 1.0), self.max_delay)

    def shares(self) -> tuple[float, ...]:
        r"""Load-balanced fractions of the global batch: worker ``i`` gets a share
        :math:`s_i \propto 1 / k_i`, so that every worker needs the same time."""
        inverse = 1.0 / np.asarray(self.slowdowns)
        return tuple((inverse / inverse.sum()).tolist())

    def balanced(self) -> Speeds:
        r"""The speeds once the batch is split by :meth:`shares`.

        Worker :math:`i` then processes :math:`W s_i` times its nominal batch at slowdown
        :math:`k_i`, which takes :math:`W / \sum_j k_j^{-1} = H` ticks for every worker
        (the harmonic mean of the slowdowns), so each worker's mean delay drops from
        :math:`k_i - 1` to :math:`H - 1 \le \bar k - 1`.
        """
        harmonic = len(self.slowdowns) / float(np.sum(1.0 / np.asarray(self.slowdowns)))
        return speeds([harmonic] * len(self.slowdowns))


@dataclasses.dataclass(frozen=True)
class Trace(DelayModel):
    """Replays recorded delays: ``delays[t mod T][i]`` for worker ``i`` at step ``t``."""

    delays: tuple[tuple[int, ...], ...] = ((0,),)

    def __call__(self, key, step, worker):
        del key
        table = jnp.asarray(self.delays, jnp.int32)
        return table[step % table.shape[0], worker]

    @property
    def mean_delay(self) -> float:
        return float(np.mean(self.delays))

    @property
    def min_delay(self) -> int:
        return int(np.min(self.delays))


@dataclasses.dataclass(frozen=True)
class Bandwidth(DelayModel):
    """A link of ``bytes_per_tick`` bytes per tick after a ``latency`` of ticks: a message
    of ``b`` bytes travels ``latency + ceil(b / bytes_per_tick)`` ticks.

    Its delays depend on the size of a message, which the delay line knows: it uses
    :meth:`for_message`. The bytes are those on the wire, so compression shortens the
    transit (``max_delay`` is the latency alone until then).
    """

    latency: int = 0
    bytes_per_tick: float = 1.0

    def __call__(self, key, step, worker):
        raise ValueError("a Bandwidth link's delays depend on the message: use for_message")

    @property
    def mean_delay(self) -> float:
        raise ValueError("a Bandwidth link's delays depend on the message: use for_message")

    def for_message(self, num_bytes: int) -> Transmission:
        ticks = math.ceil(num_bytes / self.bytes_per_tick)
        return Transmission(max_delay=self.latency + ticks, transmission=ticks)


@dataclasses.dataclass(frozen=True)
class Transmission(Constant):
    """A constant transit of ``max_delay`` ticks, of which ``transmission`` occupy the
    sender's link (a :class:`Bandwidth` link resolved for a message's size): a worker in
    time (:func:`fsq.transforms.clock`) starts its next job only once its last message
    has left."""

    transmission: int = 0


def bandwidth(bytes_per_tick: float, latency: int = 0) -> Bandwidth:
    """A link that carries ``bytes_per_tick > 0`` bytes per tick, after ``latency`` ticks.

    Example:
      >>> import fsq
      >>> link = fsq.delays.bandwidth(1000.0, latency=1)
      >>> link.for_message(4096).max_delay  # 1 + ceil(4096 / 1000)
      6
    """
    per_tick = float(_checks.positive("bytes_per_tick", bytes_per_tick))
    latency = _max_delay("latency", latency)
    return Bandwidth(max_delay=latency, latency=latency, bytes_per_tick=per_tick)


def _max_delay(name: str, value: int) -> int:
    return _checks.integer(name, value, low=0, high=MAX_SUPPORTED_DELAY)


def constant(tau: int) -> Constant:
    """Every gradient is ``tau`` steps late (``tau = 0``: synchronous).

    Args:
      tau: the delay, an int in ``[0, 65536]``.
    """
    return Constant(max_delay=_max_delay("tau", tau))


def uniform(max_delay: int) -> Categorical:
    """Delays uniform over ``0 .. max_delay`` inclusive (mean ``max_delay / 2``).

    Args:
      max_delay: an int in ``[0, 65536]``.
    """
    n = _max_delay("max_delay", max_delay) + 1
    return Categorical(max_delay=n - 1, probabilities=(1.0 / n,) * n)


def geometric(mean: float, max_delay: int) -> Categorical:
    r"""Geometric delays truncated to ``0 .. max_delay``: memoryless network jitter.

    .. math:: P(d = k) \propto q^k, \quad q = \frac{\mu}{1 + \mu}, \quad 0 \le k \le d_{\max}

    so that without truncation the mean would be :math:`\mu`.

    Args:
      mean: :math:`\mu > 0`, the mean of the untruncated distribution.
      max_delay: an int in ``[0, 65536]``.
    """
    _checks.positive("mean", mean)
    n = _max_delay("max_delay", max_delay) + 1
    q = mean / (1.0 + mean)
    weights = q ** np.arange(n)
    return Categorical(max_delay=n - 1, probabilities=tuple((weights / weights.sum()).tolist()))


def heavy_tailed(max_delay: int, alpha: float = 1.5) -> Categorical:
    r"""Stragglers: most gradients are fast, a few are very late (a truncated power law).

    .. math:: P(d = k) \propto (k + 1)^{-\alpha}, \quad 0 \le k \le d_{\max}

    Smaller :math:`\alpha` means a heavier tail; with :math:`\alpha = 1.5` and
    :math:`d_{\max} = 64`, 42% of gradients arrive at once, the mean delay is 5.2 and
    5% are 30 or more steps late.

    Args:
      max_delay: an int in ``[0, 65536]``, where the tail is cut.
      alpha: tail exponent :math:`\alpha > 0`.
    """
    _checks.positive("alpha", alpha)
    n = _max_delay("max_delay", max_delay) + 1
    weights = np.arange(1, n + 1, dtype=np.float64) ** -float(alpha)
    return Categorical(max_delay=n - 1, probabilities=tuple((weights / weights.sum()).tolist()))


def speeds(slowdowns: Sequence[float]) -> Speeds:
    """Per-worker speeds: worker ``i`` is ``slowdowns[i]`` times slower than the fastest.

    Args:
      slowdowns: one factor ``>= 1`` per worker; ``max_delay`` is
        ``ceil(max(slowdowns)) - 1``.
    """
    factors = tuple(float(_checks.real_in_range("slowdowns", s, 1.0)) for s in slowdowns)
    if not factors:
        raise ValueError("slowdowns must name one factor per worker, got an empty sequence")
    max_delay = _max_delay("ceil(max(slowdowns)) - 1", math.ceil(max(factors)) - 1)
    return Speeds(max_delay=max_delay, num_workers=len(factors), slowdowns=factors)


def trace(delays: Sequence[Sequence[int]] | np.ndarray, max_delay: int | None = None) -> Trace:
    """Replays a recorded or hand-built schedule of delays, cyclically in the step.

    Args:
      delays: integer array of shape ``[steps, num_workers]``.
      max_delay: the buffer bound (defaults to the largest delay in ``delays``); every
        delay must lie in ``[0, max_delay]``.
    """
    table = np.asarray(delays)
    if table.ndim != 2 or table.size == 0 or not np.issubdtype(table.dtype, np.integer):
        raise ValueError(
            f"delays must be a non-empty integer array [steps, num_workers], got shape "
            f"{table.shape} and dtype {table.dtype}"
        )
    bound = _max_delay("max_delay", int(table.max()) if max_delay is None else max_delay)
    if table.min() < 0 or table.max() > bound:
        raise ValueError(
            f"delays must lie in [0, max_delay={bound}], got values in "
            f"[{table.min()}, {table.max()}]"
        )
    return Trace(
        max_delay=bound,
        num_workers=table.shape[1],
        delays=tuple(tuple(int(d) for d in row) for row in table),
    )


def as_delay_model(delay: int | DelayModel) -> DelayModel:
    """Accepts an int (a constant delay) or a :class:`DelayModel`."""
    if isinstance(delay, DelayModel):
        return delay
    if isinstance(delay, bool) or not isinstance(delay, (int, np.integer)):
        raise TypeError(
            f"delay must be an int or a fsq.delays model, got {type(delay).__name__} {delay!r}"
        )
    return constant(_max_delay("delay", int(delay)))  # checked here to name the argument
