r"""Robust aggregation: combine the workers' delivered gradients so a few bad ones can't steer.

The default, ``"mean"``, is the sum of :mod:`fsq.transforms.delivery`: one buffer per
device of partial sums, one all-reduce. A robust rule needs each worker's contribution
separately, so with one the in-flight buffer keeps a row per local worker
(:math:`(d_{\max}+1) \times (W/D) \times P` per device) and delivery all-gathers the
:math:`W` rows (:math:`W \times P` received per device instead of an all-reduce of
:math:`P`). At step :math:`t` worker :math:`i` *votes* with the weighted mean of its
gradients delivered at :math:`t`,

.. math:: v_i = \frac{\sum_s \alpha_{i,s}\, g_i(s)}{\sum_s \alpha_{i,s}},

(one vote per worker and step, however many of its gradients arrive together), and the
rule reduces the votes of the :math:`n` workers with a delivery, coordinate-wise:

- ``median()`` — the coordinate-wise median (Yin et al., *Byzantine-Robust Distributed
  Learning: Towards Optimal Statistical Rates*, ICML 2018). Resists up to half the votes
  being arbitrary; :math:`O(W P \log W)` per step for the sort.
- ``trimmed_mean(trim)`` — drop the :math:`\lfloor \beta n \rfloor` largest and smallest
  values of each coordinate, average the rest (same paper). Resists a fraction
  :math:`\beta < 1/2` of bad votes and is less noisy than the median when all are
  honest; ``trim=0`` is the plain mean of the votes.
- ``centered_clip(iterations)`` — centered clipping (Karimireddy, He and Jaggi, *Learning
  from History for Byzantine Robust Optimization*, ICML 2021): from the coordinate-wise
  median :math:`c`, repeat :math:`c \leftarrow c + \frac1n \sum_i (v_i - c)
  \min(1, \tau / \lVert v_i - c \rVert)` with the radius :math:`\tau` the median of the
  distances :math:`\lVert v_i - c \rVert`: each vote moves the center by at most
  :math:`\tau / n`, and honest votes near the center count fully, so it is nearly as
  efficient as the mean. Best with ``worker_momentum``, which concentrates honest votes.
  :math:`O(L W P)` per step.

The reduced vote :math:`c` stands for every delivered gradient: the aggregate passed on
is :math:`c \sum_{i,s} \alpha_{i,s}`. Each worker counts once per step, so
``trimmed_mean(0)`` (the mean of the votes) equals the plain mean when every worker
delivers one gradient (e.g. without delays), and otherwise weighs a worker whose
gradients arrive together as one.
Staleness rules and delay compensation then act as without a robust rule (compensation's
channels are reduced coordinate-wise like the gradient).

Use a robust rule when some workers may send wrong gradients (bugs, bit flips,
adversaries; see :func:`fsq.faults.byzantine`); the mean when all are trusted, as it is
cheaper and least noisy. Non-finite gradients need no robust rule: they are rejected at
send time whatever the aggregation.

Example:
  >>> import jax.numpy as jnp, fsq
  >>> votes = jnp.array([[1.0], [2.0], [100.0]])
  >>> present = jnp.array([True, True, True])
  >>> print(fsq.aggregation.median().reduce(votes, present))
  [2.]
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fsq import _checks

__all__ = [
    "RULES",
    "Aggregation",
    "aggregate",
    "centered_clip",
    "mean",
    "median",
    "resolve",
    "trimmed_mean",
]

RULES = ("mean", "median", "trimmed_mean", "centered_clip")


class Aggregation(NamedTuple):
    r"""A rule that reduces the workers' votes, coordinate-wise.

    Attributes:
      name: one of :data:`RULES`.
      trim: for ``"trimmed_mean"``, the fraction :math:`\beta \in [0, 1/2)` cut at each end.
      iterations: for ``"centered_clip"``, the clipping iterations :math:`L \ge 1`.
    """

    name: str
    trim: float = 0.0
    iterations: int = 3

    @property
    def per_worker(self) -> bool:
        """Whether the rule needs each worker's gradients apart (all but ``"mean"``)."""
        return self.name != "mean"

    def reduce(self, votes: jax.Array, present: jax.Array) -> jax.Array:
        """Reduces ``votes`` ``[W, n]`` over the workers where ``present`` ``[W]`` holds
        (``"mean"``: the mean of the votes).

        Returns zeros where no worker is present.
        """
        count = jnp.sum(present.astype(jnp.int32))
        if self.name == "centered_clip":
            return _centered_clip(votes, present, count, self.iterations)
        ordered = _ordered(votes, present)
        if self.name == "median":
            return _median(ordered, count)
        cut = jnp.floor(self.trim * count.astype(jnp.float32)).astype(jnp.int32)
        rank = jnp.arange(votes.shape[0])[:, None]
        kept = (rank >= cut) & (rank < count - cut)
        total = jnp.sum(jnp.where(kept, ordered, 0), axis=0)
        return total / jnp.maximum(count - 2 * cut, 1).astype(votes.dtype)


def _ordered(votes: jax.Array, present: jax.Array) -> jax.Array:
    # Absent votes sort last, so the present ones are the first `count` of each column.
    return jnp.sort(jnp.where(present[:, None], votes, jnp.inf), axis=0)


def _median(ordered: jax.Array, count: jax.Array) -> jax.Array:
    low = jnp.take(ordered, jnp.maximum(count - 1, 0) // 2, axis=0)
    high = jnp.take(ordered, count // 2, axis=0, mode="clip")
    return jnp.where(count > 0, (low + high) / 2, 0)


def _centered_clip(votes, present, count, iterations):
    """Centered clipping from the coordinate-wise median, radius the median distance."""
    center = _median(_ordered(votes, present), count)
    for _ in range(iterations):
        offsets = jnp.where(present[:, None], votes - center, 0)
        distances = jnp.sqrt(jnp.sum(offsets * offsets, axis=1))
        radius = _median(_ordered(distances[:, None], present), count)[0]
        scale = jnp.minimum(1, radius / jnp.maximum(distances, 1e-30))
        center = center + jnp.sum(offsets * scale[:, None], axis=0) / jnp.maximum(count, 1)
    return center


def aggregate(rule: Aggregation, sums: jax.Array, weights: jax.Array) -> jax.Array:
    """The robust stand-in for ``sums.sum(0)``: ``rule`` over the votes ``sums / weights``,
    times the total weight. ``sums`` is ``[W, n]``, one row of weighted sums per worker,
    ``weights`` ``[W]`` their total weights (0 for a worker with nothing delivered).
    """
    present = weights > 0
    votes = sums / jnp.where(present, weights, 1)[:, None]
    return rule.reduce(votes, present) * jnp.sum(weights)


def mean() -> Aggregation:
    """The plain mean (the default): an all-reduce of partial sums."""
    return Aggregation("mean")


def median() -> Aggregation:
    """The coordinate-wise median of the workers' votes."""
    return Aggregation("median")


def trimmed_mean(trim: float = 0.25) -> Aggregation:
    """The coordinate-wise mean after cutting the fraction ``trim`` in [0, 0.5) at each end."""
    trim = _checks.real_in_range("trim", trim, 0.0, 0.5, high_open=True)
    return Aggregation("trimmed_mean", float(trim))


def centered_clip(iterations: int = 3) -> Aggregation:
    """Centered clipping with an adaptive radius, ``iterations`` >= 1 rounds."""
    return Aggregation("centered_clip", iterations=_checks.integer("iterations", iterations, 1))


def resolve(aggregation: str | Aggregation | None) -> Aggregation:
    """``None`` or ``"mean"``, ``"median"``, ``"trimmed_mean"`` (trim 0.25), or a rule."""
    if isinstance(aggregation, Aggregation):
        return aggregation
    named = {
        None: mean,
        "mean": mean,
        "median": median,
        "trimmed_mean": trimmed_mean,
        "centered_clip": centered_clip,
    }
    if isinstance(aggregation, str | None) and aggregation in named:
        return named[aggregation]()
    raise ValueError(
        f"aggregation must be one of {RULES}, a fsq.aggregation rule or None, got {aggregation!r}"
    )
