r"""Time: how long workers compute, and how the server coordinates them.

The logical clock ticks :math:`t = 0, 1, \dots`; one tick is ``tick_seconds`` of simulated
wall-clock time. A **compute model** gives worker :math:`i`'s :math:`j`-th job a duration
:math:`c \ge 1` ticks, a pure function of ``(seed, worker, job)`` (and of the tick it
starts, for a model that varies over time). A link model (:mod:`fsq.delays`) gives its
message a transit time :math:`\ell \ge 0`. A worker free at tick :math:`s` reads
:math:`w_s`; its gradient arrives at tick :math:`s + c - 1 + \ell`; it is busy during
ticks :math:`s + 1 .. s + c - 1` and free again at :math:`s + c` (it does not wait for its
own message; on a link of limited bandwidth, for its message to have left:
:func:`fsq.transforms.clock`). With :math:`c = 1` for every job this is the delay model
alone.

A **policy** decides which arriving gradients the inner optimizer steps on, and when:

- :func:`asynchronous` — every gradient, at the tick it arrives (Flying Squirrel; plain
  and delay-adaptive asynchronous SGD are this policy with other staleness rules).
- :func:`synchronous` — a barrier: every worker starts a round together; the round ends
  when the last message arrives, with one step on the mean of all :math:`W`; its
  wall-clock time is the sum of the rounds' maxima.
- :func:`backup` — synchronous with :math:`b` backup workers (Chen, Pan, Monga, Bengio and
  Jozefowicz, *Revisiting Distributed Synchronous SGD*, 2016): a round ends at the first
  :math:`W - b` arrivals, with one step on their mean; the others are discarded and
  their workers restart with the next round.
- :func:`rennala` — Rennala SGD (Tyurin and Richtárik, *Optimal Time Complexities of
  Parallel Stochastic Optimization Methods Under a Fixed Computation Model*, NeurIPS
  2023): workers compute without pause; gradients computed at the current parameters
  are collected until there are :math:`B`, then one step on their mean; a gradient
  computed at older parameters is discarded.
- :func:`ringmaster` — Ringmaster ASGD (Maranjyan, Tyurin and Richtárik, *Ringmaster
  ASGD: The First Asynchronous SGD with Optimal Time Complexity*, ICML 2025): asynchronous,
  but a gradient staler than :math:`R - 1` inner steps is discarded (its worker, free
  already, has started on the current parameters).

Staleness is counted in inner steps: the number of steps between the tick a gradient's
parameters were read and the tick it is applied. :func:`fsq.transforms.clock` runs a
model and a policy.

Example:
  >>> import jax, fsq
  >>> model = fsq.timing.fixed([1, 2, 4])       # worker 2 takes 4 ticks per gradient
  >>> int(model(jax.random.key(0), worker=2, job=0, tick=0))
  4
  >>> fsq.timing.backup(1)
  Policy(name='backup', size=1)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fsq import _checks

__all__ = [
    "POLICIES",
    "ComputeModel",
    "Fixed",
    "Geometric",
    "LogNormal",
    "Policy",
    "Slowdown",
    "asynchronous",
    "backup",
    "exponential",
    "fixed",
    "lognormal",
    "rennala",
    "resolve",
    "ringmaster",
    "slowdown",
    "stragglers",
    "synchronous",
]

MAX_TICKS = 1 << 12  # a bound on a job's duration that keeps the schedule's window sane


@dataclasses.dataclass(frozen=True)
class ComputeModel:
    """Base class: a distribution of job durations, in ticks, in ``[min_ticks, max_ticks]``.

    Attributes:
      max_ticks: the longest a job can take.
      min_ticks: the shortest (at least 1).
      num_workers: the workers the model is defined for, or ``None`` if any.
    """

    max_ticks: int
    min_ticks: int = 1
    num_workers: int | None = None

    def __call__(self, key: jax.Array, worker: jax.Array, job: jax.Array, tick: jax.Array):
        """The duration (int32 scalar) of ``worker``'s ``job``-th job, started at ``tick``."""
        raise NotImplementedError

    def mean_ticks(self, worker: int) -> float:
        """The expected duration of ``worker``'s jobs (ignoring variation over time)."""
        raise NotImplementedError

    def mean_staleness(self, num_workers: int | None = None) -> float:
        r"""The mean staleness, in inner steps, of the gradients under the
        :func:`asynchronous` policy with links of no transit time, when the server steps
        every tick (a gradient arrives at every tick, as when some worker's jobs take one).

        A job of :math:`c` ticks returns :math:`c - 1` steps stale, and worker :math:`i`
        returns :math:`1 / m_i` gradients a tick (:math:`m_i` = :meth:`mean_ticks`), so

        .. math::

          \bar\tau = \frac{\sum_i (m_i - 1) / m_i}{\sum_i 1 / m_i}.

        With fewer steps than ticks the staleness is lower: this is then an upper bound.
        Use it for :func:`fsq.momentum_under_delay` when workers compute in time.

        Args:
          num_workers: :math:`W`; defaults to the model's own ``num_workers``.

        Returns:
          :math:`\bar\tau \ge 0`.

        Raises:
          ValueError: if the model has no ``num_workers`` and none is given, or one that
            differs from the model's.

        Example:
          >>> import fsq
          >>> print(round(fsq.timing.stragglers(8, slow=[7], factor=10).mean_staleness(), 4))
          0.1268
        """
        num_workers = self.num_workers if num_workers is None else num_workers
        if num_workers is None:
            raise ValueError("num_workers must be given for a compute model defined for any W")
        num_workers = _checks.integer("num_workers", num_workers, low=1)
        if self.num_workers is not None and num_workers != self.num_workers:
            raise ValueError(
                f"num_workers must be the model's {self.num_workers}, got {num_workers}"
            )
        ticks = [self.mean_ticks(i) for i in range(num_workers)]
        return sum((m - 1) / m for m in ticks) / sum(1 / m for m in ticks)


@dataclasses.dataclass(frozen=True)
class Fixed(ComputeModel):
    """Worker ``i`` takes ``ticks[i]`` ticks for every job."""

    ticks: tuple[int, ...] = (1,)

    def __call__(self, key, worker, job, tick):
        del key, job, tick
        return jnp.asarray(self.ticks, jnp.int32)[worker]

    def mean_ticks(self, worker):
        return float(self.ticks[worker])


@dataclasses.dataclass(frozen=True)
class Geometric(ComputeModel):
    r"""Memoryless durations: worker ``i``'s are geometric on :math:`\{1, 2, \dots\}` with
    mean ``means[i]`` (the discrete exponential), truncated at ``max_ticks``."""

    means: tuple[float, ...] = (1.0,)

    def __call__(self, key, worker, job, tick):
        del job, tick
        mean = jnp.asarray(self.means, jnp.float32)[worker]
        # P(c > k) = (1 - 1/mean)^k: c = 1 + floor(log(u) / log(1 - 1/mean)).
        u = jax.random.uniform(key, dtype=jnp.float32, minval=1e-12)
        tail = jnp.log1p(-1.0 / jnp.maximum(mean, 1.0 + 1e-6))
        c = 1 + jnp.floor(jnp.log(u) / tail)
        return jnp.where(mean <= 1.0, 1, jnp.clip(c, 1, self.max_ticks)).astype(jnp.int32)

    def mean_ticks(self, worker):
        mean = self.means[worker]
        if mean <= 1.0:
            return 1.0
        q = 1.0 - 1.0 / mean  # P(c > k) = q^k; truncated at max_ticks
        return float(sum(q**k for k in range(self.max_ticks)))


@dataclasses.dataclass(frozen=True)
class LogNormal(ComputeModel):
    r"""Heavy-ish tails: worker ``i``'s durations are :math:`\mathrm{round}(m_i e^{\sigma
    \xi})`, :math:`\xi \sim \mathcal N(0, 1)`, clipped to ``[1, max_ticks]``."""

    medians: tuple[float, ...] = (1.0,)
    sigma: float = 0.5

    def __call__(self, key, worker, job, tick):
        del job, tick
        median = jnp.asarray(self.medians, jnp.float32)[worker]
        c = jnp.round(median * jnp.exp(self.sigma * jax.random.normal(key, dtype=jnp.float32)))
        return jnp.clip(c, 1, self.max_ticks).astype(jnp.int32)

    def mean_ticks(self, worker):
        z = np.random.default_rng(0).normal(size=200_000)
        draws = np.clip(np.round(self.medians[worker] * np.exp(self.sigma * z)), 1, self.max_ticks)
        return float(draws.mean())


@dataclasses.dataclass(frozen=True)
class Slowdown(ComputeModel):
    """``base``, with ``workers``' jobs started in ``[start, stop)`` ``factor`` times longer
    (rounded up): throttling or preemption for a while."""

    base: ComputeModel | None = None
    workers: tuple[int, ...] = ()
    factor: float = 1.0
    start: int = 0
    stop: int = 0

    def __call__(self, key, worker, job, tick):
        c = self.base(key, worker, job, tick)
        slow = jnp.any(jnp.asarray(self.workers) == worker) & (tick >= self.start)
        slow = slow & (tick < self.stop)
        longer = jnp.ceil(c.astype(jnp.float32) * self.factor).astype(jnp.int32)
        return jnp.where(slow, jnp.minimum(longer, self.max_ticks), c)

    def mean_ticks(self, worker):
        return self.base.mean_ticks(worker)


def _sequence(name: str, values: Any) -> Sequence:
    if isinstance(values, str) or not isinstance(values, Sequence | np.ndarray) or not len(values):
        raise TypeError(f"{name} must be a non-empty sequence, got {values!r}")
    return values


def _ticks(name: str, values: Sequence[float], low: float = 1.0) -> tuple[float, ...]:
    values = _sequence(name, values)
    return tuple(float(_checks.real_in_range(f"{name}[i]", v, low)) for v in values)


def _max_ticks(value: int) -> int:
    return _checks.integer("max_ticks", value, low=1, high=MAX_TICKS)


def fixed(ticks: Sequence[int]) -> Fixed:
    r"""Fixed heterogeneous durations: worker ``i`` takes ``ticks[i] >= 1`` ticks per job.

    For times :math:`\tau_i` in seconds, ``fixed([max(1, round(tau / tick_seconds)) for tau
    in taus])``; Tyurin and Richtárik's experiments use :math:`\tau_i = \sqrt{i}`.
    """
    ticks = _sequence("ticks", ticks)
    values = tuple(_checks.integer("ticks[i]", t, low=1, high=MAX_TICKS) for t in ticks)
    return Fixed(max(values), min(values), len(values), values)


def stragglers(num_workers: int, slow: Sequence[int], factor: int, base: int = 1) -> Fixed:
    """Persistent stragglers: ``slow`` workers take ``factor * base`` ticks, the rest ``base``."""
    num_workers = _checks.integer("num_workers", num_workers, low=1)
    factor = _checks.integer("factor", factor, low=1)
    base = _checks.integer("base", base, low=1)
    ids = {_checks.integer("slow[i]", w, 0, num_workers - 1) for w in _sequence("slow", slow)}
    return fixed([base * (factor if i in ids else 1) for i in range(num_workers)])


def exponential(means: Sequence[float], max_ticks: int) -> Geometric:
    """Random memoryless durations with per-worker ``means >= 1`` (geometric in ticks),
    truncated at ``max_ticks``."""
    means = _ticks("means", means)
    return Geometric(_max_ticks(max_ticks), 1, len(means), means)


def lognormal(medians: Sequence[float], sigma: float, max_ticks: int) -> LogNormal:
    """Log-normal durations with per-worker ``medians >= 1`` and spread ``sigma >= 0``."""
    medians = _ticks("medians", medians)
    sigma = float(_checks.real_in_range("sigma", sigma, 0.0))
    return LogNormal(_max_ticks(max_ticks), 1, len(medians), medians, sigma)


def slowdown(
    base: ComputeModel, workers: Sequence[int], factor: float, start: int, stop: int
) -> Slowdown:
    """``base`` with ``workers`` ``factor >= 1`` times slower for jobs started in ``[start,
    stop)`` (time-varying speed: preemption, throttling)."""
    if not isinstance(base, ComputeModel):
        raise TypeError(f"base must be a fsq.timing compute model, got {base!r}")
    factor = float(_checks.real_in_range("factor", factor, 1.0))
    start = _checks.integer("start", start, low=0)
    stop = _checks.integer("stop", stop, low=start)
    high = None if base.num_workers is None else base.num_workers - 1
    ids = tuple(_checks.integer("workers[i]", w, 0, high) for w in _sequence("workers", workers))
    longest = min(MAX_TICKS, math.ceil(base.max_ticks * factor))
    return Slowdown(longest, base.min_ticks, base.num_workers, base, ids, factor, start, stop)


POLICIES = ("asynchronous", "synchronous", "backup", "rennala", "ringmaster")


@dataclasses.dataclass(frozen=True)
class Policy:
    """A coordination policy (see the module).

    Attributes:
      name: one of :data:`POLICIES`.
      size: the backup workers :math:`b` (``backup``), the batch :math:`B` (``rennala``)
        or the staleness threshold :math:`R` (``ringmaster``); 0 otherwise.
    """

    name: str
    size: int = 0

    @property
    def rounds(self) -> bool:
        """Whether every worker starts together, in rounds (synchronous, backup)."""
        return self.name in ("synchronous", "backup")

    @property
    def applies_stale(self) -> bool:
        """Whether an applied gradient can be stale: those of a round, or of Rennala's
        batch, are applied before any other step."""
        return self.name in ("asynchronous", "ringmaster")


def resolve(policy: str | Policy) -> Policy:
    """A policy, or the name of one that takes no size (``"asynchronous"``, ``"synchronous"``)."""
    if isinstance(policy, Policy):
        return policy
    if policy in ("asynchronous", "synchronous"):
        return Policy(policy)
    raise ValueError(
        "policy must be 'asynchronous', 'synchronous' or a fsq.timing policy (backup(b), "
        f"rennala(B), ringmaster(R)), got {policy!r}"
    )


def asynchronous() -> Policy:
    """Every gradient is applied at the tick it arrives."""
    return Policy("asynchronous")


def synchronous() -> Policy:
    """A barrier per round; one step on the mean of all workers."""
    return Policy("synchronous")


def backup(workers: int) -> Policy:
    """Synchronous with ``workers >= 1`` backup workers: a round ends at the first ``W -
    workers`` arrivals."""
    return Policy("backup", _checks.integer("workers", workers, low=1))


def rennala(batch: int) -> Policy:
    """Rennala SGD: a step on every ``batch >= 1`` gradients computed at the current
    parameters (at most ``W``)."""
    return Policy("rennala", _checks.integer("batch", batch, low=1))


def ringmaster(threshold: int) -> Policy:
    """Ringmaster ASGD: gradients staler than ``threshold - 1`` inner steps are discarded
    (``threshold >= 1``)."""
    return Policy("ringmaster", _checks.integer("threshold", threshold, low=1))
