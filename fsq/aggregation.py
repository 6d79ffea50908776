r"""Robust aggregation: combine the workers' delivered gradients so a few bad ones can't steer.

The default, ``"mean"``, is the sum of the delay line (:mod:`fsq.transforms.line`): one
buffer per device of partial sums, one all-reduce. A robust rule
(:func:`fsq.transforms.robust` applies one at delivery) needs each worker's contribution
separately, so with one the in-flight buffer keeps a row per local worker
(:math:`(d_{\max}+1) \times (W/D) \times P` per device) and delivery all-gathers the
:math:`W` rows (:math:`W \times P` received per device instead of an all-reduce of
:math:`P`). At step :math:`t` worker :math:`i` *votes* with the weighted mean of its
gradients delivered at :math:`t`,

.. math:: v_i = \frac{\sum_s \alpha_{i,s}\, g_i(s)}{\sum_s \alpha_{i,s}},

(one vote per worker and step, however many of its gradients arrive together), and the
rule reduces the :math:`n` recent votes (which ones: below), coordinate-wise:

- ``median()`` — the coordinate-wise median (Yin et al., *Byzantine-Robust Distributed
  Learning: Towards Optimal Statistical Rates*, ICML 2018). Resists up to half the votes
  being arbitrary; :math:`O(W P \log^2 W)` per step for the sorting network.
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

Every rule can first apply *nearest-neighbour mixing* (``mixing=f``; Allouah et al.,
*Fixing by Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity*, AISTATS 2023):
each vote is replaced by the mean of the :math:`n - f` votes nearest to it (itself
included), which averages the honest votes' noise away before the rule looks at them
while a bad vote can pull each mixed vote by at most :math:`f/(n - f)` of a distance.
Coordinate-wise rules are biased when the attackers all sit on one side (the median of
8 votes with 2 of them low is the mean of the 2nd and 3rd smallest honest ones); mixing
shrinks that bias with the honest spread. :math:`O(W^2 P)` per step.

Votes are only as good as their number: with random delays a step sees only the workers
whose gradients happen to arrive at it (5.4 of 8 per step for ``uniform(4)``), and two
Byzantine workers can be most of them. So every device remembers each worker's latest
vote and the step it arrived (:class:`fsq.transforms.Votes`, :math:`W \times` the message width,
identical on all devices), and the rule reduces the latest votes of every worker that
voted within the last :math:`d_{\max} + 1` steps. A live worker always has one: its
gradient sent :math:`d_{\max}` steps ago has arrived; a worker that crashed or keeps
dropping out ages out. This memory of each worker's latest update is MIFA's (Gu et al.,
*Fast Federated Learning in the Presence of Arbitrary Device Unavailability*, NeurIPS
2021), used here as the voting population. Without delays every vote is fresh at every
step and the memory changes nothing. (Holding a step's messages until all have arrived,
so that its votes are complete, would make every message as late as the step's slowest;
the faults study measured that it costs accuracy.)

The reduced vote :math:`c` stands for every gradient delivered at the step: the aggregate
passed on is :math:`c \sum_{i,s} \alpha_{i,s}`, and a step with nothing delivered
changes nothing. Each worker counts once, so
``trimmed_mean(0)`` (the mean of the votes) equals the plain mean when every worker
delivers one gradient per step (e.g. without delays), and otherwise is the mean of the
workers' latest votes.
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

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fsq import _checks

__all__ = [
    "RULES",
    "Aggregation",
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
      mixing: nearest-neighbour mixing first, for up to ``mixing`` bad votes (0: off).
    """

    name: str
    trim: float = 0.0
    iterations: int = 3
    mixing: int = 0

    @property
    def per_worker(self) -> bool:
        """Whether the rule needs each worker's gradients apart (all but ``"mean"``)."""
        return self.name != "mean"

    def reduce(self, votes: Any, present: jax.Array) -> Any:
        """Reduces ``votes`` over the workers where ``present`` ``[W]`` holds
        (``"mean"``: the mean of the votes).

        ``votes`` is an array ``[W, n]`` or any pytree whose leaves are ``[W, ...]`` (a
        vote's coordinates, laid out as the parameters are): coordinate-wise rules reduce
        each leaf, and the distances of mixing and centered clipping are over every
        coordinate of every leaf. Returns zeros where no worker is present.
        """
        count = jnp.sum(present.astype(jnp.int32))
        if self.mixing:
            votes = _mix(votes, present, count, self.mixing)
        if self.name == "centered_clip":
            return _centered_clip(votes, present, count, self.iterations)

        def leaf(v):
            ordered = _ordered(v, present)
            if self.name == "median":
                return _median(ordered, count)
            cut = jnp.floor(self.trim * count.astype(jnp.float32)).astype(jnp.int32)
            rank = _along_workers(jnp.arange(v.shape[0]), v)
            total = _sum_rows(jnp.where((rank >= cut) & (rank < count - cut), ordered, 0))
            return total / jnp.maximum(count - 2 * cut, 1).astype(v.dtype)

        return jax.tree.map(leaf, votes)


def _along_workers(x: jax.Array, like: jax.Array) -> jax.Array:
    """``x`` (``[W]``) shaped to broadcast against ``like`` (``[W, ...]``)."""
    return x.reshape(x.shape + (1,) * (like.ndim - 1))


def _coordinates(v: jax.Array) -> tuple[int, ...]:
    """The axes of a vote's coordinates in ``v`` (``[W, ...]``): all but the first."""
    return tuple(range(1, v.ndim))


def _mix(votes: Any, present: jax.Array, count: jax.Array, bad: int) -> Any:
    """Nearest-neighbour mixing: each vote becomes the mean of the ``count - bad`` present
    votes nearest to it (itself included)."""
    grams = [
        jnp.tensordot(v, v, axes=(_coordinates(v), _coordinates(v))) for v in jax.tree.leaves(votes)
    ]
    gram = sum(grams[1:], grams[0])
    norms = jnp.diag(gram)
    distances = jnp.where(present[None, :], norms[:, None] + norms[None, :] - 2 * gram, jnp.inf)
    rank = jnp.argsort(jnp.argsort(distances, axis=1), axis=1)
    nearest = jnp.maximum(count - bad, 1)
    weights = (rank < nearest).astype(gram.dtype) / nearest.astype(gram.dtype)
    return jax.tree.map(lambda v: jnp.tensordot(weights.astype(v.dtype), v, axes=1), votes)


def _sum_rows(x: jax.Array) -> jax.Array:
    # Row by row: XLA's CPU reduction over the leading axis was 25x slower (column-wise).
    total = x[0]
    for row in x[1:]:
        total = total + row
    return total


# Up to this many votes, sort with a network of elementwise min / max, which XLA fuses into
# a few passes over the votes. XLA's generic sort was 150x slower on CPU when the
# simulated devices' threads outnumber the cores (60 ms against 0.4 ms for 8 x 45k).
NETWORK_MAX_VOTES = 32


def _sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort for ``n`` inputs: compare-exchange pairs ``(i, j)``,
    ``i < j``, that sort any sequence when applied in order (Knuth, TAOCP 5.3.4).

    Built for the next power of two; a pair reaching past ``n`` would compare with padding
    that sorts last and change nothing, so it is dropped.
    """
    size, pairs, p = 1 << max(n - 1, 0).bit_length(), [], 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(pairs)


def _ordered(votes: jax.Array, present: jax.Array) -> jax.Array:
    # Absent votes sort last, so the present ones are the first `count` of each column.
    votes = jnp.where(_along_workers(present, votes), votes, jnp.inf)
    if votes.shape[0] > NETWORK_MAX_VOTES:
        return jnp.sort(votes, axis=0)
    rows = list(votes)
    for i, j in _sorting_network(len(rows)):
        rows[i], rows[j] = jnp.minimum(rows[i], rows[j]), jnp.maximum(rows[i], rows[j])
    return jnp.stack(rows)


def _median(ordered: jax.Array, count: jax.Array) -> jax.Array:
    low = jnp.take(ordered, jnp.maximum(count - 1, 0) // 2, axis=0)
    high = jnp.take(ordered, count // 2, axis=0, mode="clip")
    return jnp.where(count > 0, (low + high) / 2, 0)


def _centered_clip(votes, present, count, iterations):
    """Centered clipping from the coordinate-wise median, radius the median distance."""
    center = jax.tree.map(lambda v: _median(_ordered(v, present), count), votes)
    for _ in range(iterations):
        offsets = jax.tree.map(
            lambda v, c: jnp.where(_along_workers(present, v), v - c, 0), votes, center
        )
        squares = [jnp.sum(o * o, axis=_coordinates(o)) for o in jax.tree.leaves(offsets)]
        distances = jnp.sqrt(sum(squares[1:], squares[0]))
        radius = _median(_ordered(distances[:, None], present), count)[0]
        scale = jnp.minimum(1, radius / jnp.maximum(distances, 1e-30))

        def moved(c, o, scale=scale):
            return c + _sum_rows(o * _along_workers(scale, o)) / jnp.maximum(count, 1)

        center = jax.tree.map(moved, center, offsets)
    return center


def mean() -> Aggregation:
    """The plain mean (the default): an all-reduce of partial sums."""
    return Aggregation("mean")


def median(mixing: int = 0) -> Aggregation:
    """The coordinate-wise median of the workers' votes (``mixing``: see the module)."""
    return Aggregation("median", mixing=_checks.integer("mixing", mixing, 0))


def trimmed_mean(trim: float = 0.25, mixing: int = 0) -> Aggregation:
    """The coordinate-wise mean after cutting the fraction ``trim`` in [0, 0.5) at each end."""
    trim = _checks.real_in_range("trim", trim, 0.0, 0.5, high_open=True)
    return Aggregation("trimmed_mean", float(trim), mixing=_checks.integer("mixing", mixing, 0))


def centered_clip(iterations: int = 3, mixing: int = 0) -> Aggregation:
    """Centered clipping with an adaptive radius, ``iterations`` >= 1 rounds."""
    return Aggregation(
        "centered_clip",
        iterations=_checks.integer("iterations", iterations, 1),
        mixing=_checks.integer("mixing", mixing, 0),
    )


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
