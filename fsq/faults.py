r"""Fault models: workers that miss steps, crash, come back, or send garbage.

A fault model decides, as a pure function of ``(key, step, worker)`` (the key already
specific to the run's seed, the step and the worker, see :mod:`fsq._random`), whether a
worker is **live** at a step, and what a live worker **sends** in place of its gradient.
Two worker-side pieces apply a model: :func:`fsq.transforms.liveness` (who is live, and
the re-weighting below) and :func:`fsq.transforms.attack` (what Byzantine workers send).

- A worker that is not live sends nothing: its gradient of that step is never delivered.
  The aggregate renormalizes by the number of live workers of the step the gradient was
  sent at, :math:`n_s`: each live gradient is weighted by :math:`W / n_s`, so that with
  delay 0 the inner optimizer sees the mean of the live gradients,

  .. math:: G_t = \frac{1}{n_t} \sum_{i\ \text{live at}\ t} g_i(t),

  and with delays each step's gradients keep the total weight of a full step. Every
  worker computes :math:`n_s` itself (liveness is a pure function of the seed), so this
  costs no communication.
- Messages a worker sent **before** it crashed are already on the network and are still
  delivered: a crash stops the worker, not the wire. (The in-flight buffer holds sums, so
  a crashed worker's messages could not be told apart anyway; a lossy network is the
  ``drops`` model.)
- A worker that recovers rejoins with the current parameters: in the logical clock every
  live worker computes its gradient at :math:`w_t`.
- A Byzantine worker is live and sends a corrupted gradient, which only a robust
  aggregation (:mod:`fsq.aggregation`) can resist.

Example:
  >>> import jax, fsq
  >>> model = fsq.faults.crash(workers=[3], at=100)
  >>> bool(model.live(jax.random.key(0), step=99, worker=3))
  True
  >>> bool(model.live(jax.random.key(0), step=100, worker=3))
  False
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from fsq import _checks

__all__ = [
    "ATTACKS",
    "Byzantine",
    "Crash",
    "Drops",
    "FaultModel",
    "Faults",
    "byzantine",
    "crash",
    "crash_recover",
    "drops",
    "as_fault_model",
]

ATTACKS = ("scale", "random")


@dataclasses.dataclass(frozen=True)
class FaultModel:
    """Base class: every worker is live and honest. Subclasses override what they change."""

    def live(self, key: jax.Array, step: jax.Array, worker: jax.Array) -> jax.Array:
        """Whether ``worker`` computes and sends its gradient at ``step`` (bool scalar)."""
        del key, step, worker
        return jnp.bool_(True)

    def send(self, key: jax.Array, step: jax.Array, worker: jax.Array, grads):
        """What a live ``worker`` sends at ``step`` in place of its gradient ``grads``."""
        del key, step, worker
        return grads

    def check(self, num_workers: int) -> None:
        """Raises if the model names a worker outside ``[0, num_workers)``."""
        del num_workers

    @property
    def corrupts(self) -> bool:
        """Whether some live worker may send something else than its gradient."""
        return False


def _worker_ids(workers: Sequence[int]) -> tuple[int, ...]:
    if isinstance(workers, int) or not isinstance(workers, Sequence) or not workers:
        raise TypeError(f"workers must be a non-empty sequence of worker ids, got {workers!r}")
    ids = tuple(_checks.integer("workers[i]", w, low=0) for w in workers)
    if len(set(ids)) != len(ids):
        raise ValueError(f"workers must be distinct, got {list(workers)}")
    return ids


def _check_ids(ids: tuple[int, ...], num_workers: int) -> None:
    if max(ids) >= num_workers:
        raise ValueError(
            f"fault model names worker {max(ids)}, but worker ids must be in "
            f"[0, {num_workers - 1}] for num_workers={num_workers}"
        )


def _is_one_of(worker: jax.Array, ids: tuple[int, ...]) -> jax.Array:
    return jnp.any(jnp.asarray(ids) == worker)


@dataclasses.dataclass(frozen=True)
class Drops(FaultModel):
    """Each worker misses each step independently with probability ``rate``."""

    rate: float = 0.0

    def live(self, key, step, worker):
        del step, worker
        return jax.random.uniform(key, dtype=jnp.float32) >= self.rate


@dataclasses.dataclass(frozen=True)
class Crash(FaultModel):
    """``workers`` are down for the steps in ``[start, stop)`` (for good if ``stop`` is None)."""

    workers: tuple[int, ...] = ()
    start: int = 0
    stop: int | None = None

    def live(self, key, step, worker):
        del key
        down = step >= self.start
        if self.stop is not None:
            down = down & (step < self.stop)
        return ~(down & _is_one_of(worker, self.workers))

    def check(self, num_workers):
        _check_ids(self.workers, num_workers)


@dataclasses.dataclass(frozen=True)
class Byzantine(FaultModel):
    """``workers`` send ``factor * g`` (``"scale"``) or ``factor`` times Gaussian noise."""

    workers: tuple[int, ...] = ()
    attack: str = "scale"
    factor: float = -4.0

    def send(self, key, step, worker, grads):
        del step
        if self.attack == "scale":
            bad = jax.tree.map(lambda g: (self.factor * g).astype(g.dtype), grads)
        else:
            leaves, treedef = jax.tree.flatten(grads)
            keys = jax.random.split(key, len(leaves))
            bad = jax.tree.unflatten(
                treedef,
                [
                    (self.factor * jax.random.normal(k, g.shape, jnp.float32)).astype(g.dtype)
                    for k, g in zip(keys, leaves, strict=True)
                ],
            )
        evil = _is_one_of(worker, self.workers)
        return jax.tree.map(lambda b, g: jnp.where(evil, b, g), bad, grads)

    def check(self, num_workers):
        _check_ids(self.workers, num_workers)

    @property
    def corrupts(self) -> bool:
        return True


@dataclasses.dataclass(frozen=True)
class Faults(FaultModel):
    """Several fault models at once: live if live under every one; their attacks in order.

    Each part draws from its own key, so adding a model never changes another's events.
    """

    parts: tuple[FaultModel, ...] = ()

    def live(self, key, step, worker):
        alive = jnp.bool_(True)
        for i, part in enumerate(self.parts):
            alive = alive & part.live(jax.random.fold_in(key, i), step, worker)
        return alive

    def send(self, key, step, worker, grads):
        for i, part in enumerate(self.parts):
            grads = part.send(jax.random.fold_in(key, i), step, worker, grads)
        return grads

    def check(self, num_workers):
        for part in self.parts:
            part.check(num_workers)

    @property
    def corrupts(self) -> bool:
        return any(part.corrupts for part in self.parts)


def drops(rate: float) -> Drops:
    """Bernoulli drops: each worker misses each step with probability ``rate`` in [0, 1)."""
    return Drops(float(_checks.probability_like("rate", rate)))


def crash(workers: Sequence[int], at: int) -> Crash:
    """Crash-stop: ``workers`` stop for good at step ``at`` (an int >= 0)."""
    return Crash(_worker_ids(workers), _checks.integer("at", at, low=0))


def crash_recover(workers: Sequence[int], at: int, until: int) -> Crash:
    """Crash and recover: ``workers`` are down for the steps ``at <= t < until``."""
    at = _checks.integer("at", at, low=0)
    return Crash(_worker_ids(workers), at, _checks.integer("until", until, low=at + 1))


def byzantine(workers: Sequence[int], attack: str = "scale", factor: float = -4.0) -> Byzantine:
    """Byzantine workers: ``attack="scale"`` sends ``factor * g`` (``factor=-1`` is the
    sign-flipping attack; the default ``-4`` a strong one), ``attack="random"`` sends
    ``factor`` times standard Gaussian noise of the gradient's shape.
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")
    factor = float(_checks.real_in_range("factor", factor))
    return Byzantine(_worker_ids(workers), attack, factor)


def as_fault_model(faults: FaultModel | Sequence[FaultModel] | None) -> FaultModel | None:
    """``None``, a model, or a sequence of models (combined with :class:`Faults`)."""
    if faults is None or isinstance(faults, FaultModel):
        return faults
    if isinstance(faults, Sequence) and all(isinstance(f, FaultModel) for f in faults):
        return Faults(tuple(faults)) if faults else None
    raise TypeError(
        "faults must be None, a fsq.faults model or a sequence of them, "
        f"got {type(faults).__name__} {faults!r}"
    )
