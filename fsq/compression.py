r"""Gradient compression with error feedback: send a small fraction of the gradient.

Each worker compresses what it sends with an operator :math:`\mathcal{C}` and, with
**error feedback** (on by default), keeps what was left out in a residual :math:`e_i`
that it adds to its next gradient (Seide et al. 2014; Stich, Cordonnier and Jaggi,
*Sparsified SGD with Memory*, NeurIPS 2018; Karimireddy, Rebjock, Stich and Jaggi,
*Error Feedback Fixes SignSGD and other Gradient Compression Schemes*, ICML 2019):

.. math::

  x = g_i(t) + e_i, \qquad \hat g_i(t) = \mathcal{C}(x), \qquad e_i \leftarrow x - \hat g_i(t)

so nothing is lost, only delayed: :math:`\sum_t \hat g_i(t) + e_i = \sum_t g_i(t)`. The
worker-side piece :func:`fsq.transforms.compress` applies an operator and owns the
residual, each worker's own.
Compressors act on the gradient's tree, over all of it (global) or leaf by leaf:

- :func:`top_k` — the :math:`k = \lceil \rho P \rceil` entries of largest magnitude
  (globally, or :math:`\lceil \rho P_\ell \rceil` per leaf). Wire: :math:`k` (index,
  value) pairs, 8 bytes each.
- :func:`random_k` — :math:`k` entries chosen uniformly, the *same* for every worker at a
  step (a key of the seed and the step), so values can be summed without indices. Wire:
  :math:`k` values, 4 bytes each.
- :func:`sign` — the scaled sign :math:`\frac{\lVert x_\ell \rVert_1}{P_\ell}
  \operatorname{sign}(x_\ell)` per leaf (EF-SignSGD, Karimireddy et al. 2019). Wire: one
  bit per entry plus a 4-byte scale per leaf.
- :func:`quantize` — unbiased stochastic quantization to :math:`b` bits per leaf (QSGD,
  Alistarh et al., NeurIPS 2017): :math:`s_\ell = \max |x_\ell| / (2^{b-1} - 1)`,
  :math:`\hat x = s_\ell \lfloor x / s_\ell + u \rfloor`, :math:`u \sim U[0, 1)`. Wire:
  :math:`b` bits per entry plus a 4-byte scale per leaf.

A worker whose message carries nothing (down, rejected or dropped by the staleness bound)
keeps its residual unchanged. Delay compensation's extra channels are computed from the
compressed gradient, and sent compressed the same way.

On a model sharded over several devices (:mod:`fsq.parallel`'s model axes) a compressor
must run leaf by leaf, each leaf's entries where its shards are: :func:`top_k` with
``per_leaf=True`` (its selection is exact: the leaf's largest entries, whatever the
sharding), :func:`sign` and :func:`quantize` (their scales are reductions over the whole
leaf); the global :func:`top_k` and :func:`random_k` choose among every entry of the
gradient at once and raise a ``ValueError`` there.

Example:
  >>> import jax, jax.numpy as jnp, fsq
  >>> top = fsq.compression.top_k(0.5, error_feedback=False)
  >>> x = {"w": jnp.array([0.1, -3.0, 2.0, 0.5])}
  >>> print(top.compress(x, jax.random.key(0))["w"])
  [ 0. -3.  2.  0.]
  >>> top.payload_bytes((4,))
  16
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fsq import _checks, _sharding

__all__ = [
    "Compressor",
    "keep",
    "Quantize",
    "RandomK",
    "Sign",
    "TopK",
    "quantize",
    "random_k",
    "sign",
    "top_k",
]

Sizes = Sequence[int]  # the sizes of the gradient's leaves, in flattening order


@dataclasses.dataclass(frozen=True)
class Compressor:
    """Base class: a compression operator on the gradient's tree.

    Attributes:
      error_feedback: keep what is not sent in a per-worker residual, added to the next
        gradient.
    """

    error_feedback: bool = True

    # Whether the message is k-sparse, so that it can travel as (index, value) pairs.
    sparse = False
    # Whether every worker draws the same random choices at a step (shared key).
    shared = False
    # Whether it acts leaf by leaf, and so runs where each leaf's shards are.
    per_leaf = True

    def compress(self, x: Any, key: jax.Array) -> Any:
        """Returns :math:`\\mathcal{C}(x)`, dense, a tree shaped like ``x``."""
        raise NotImplementedError

    def payload_bytes(self, sizes: Sizes, channels: int = 1) -> int:
        """Bytes on the wire for ``channels`` compressed gradient-shaped channels."""
        raise NotImplementedError


def _count(density: float, size: int) -> int:
    return min(size, max(1, math.ceil(density * size)))


def _offsets(leaves: Sequence[jax.Array]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([x.size for x in leaves])]).astype(int)


def keep(x: Any, positions: jax.Array) -> Any:
    """``x`` at the flat ``positions`` (``[k]``, over its leaves in order), zeros elsewhere."""
    leaves, treedef = jax.tree.flatten(x)
    kept = []
    for leaf, offset in zip(leaves, _offsets(leaves), strict=False):
        # Positions in other leaves are dropped (an index past this leaf's end).
        local = positions - offset
        local = jnp.where((local >= 0) & (local < leaf.size), local, leaf.size)
        mask = jnp.zeros(leaf.size, bool).at[local].set(True, mode="drop")
        kept.append(jnp.where(_sharding.typed_like(mask.reshape(leaf.shape), leaf), leaf, 0))
    return treedef.unflatten(kept)


@dataclasses.dataclass(frozen=True)
class TopK(Compressor):
    """The entries of largest magnitude: a fraction ``density``, globally or per leaf."""

    density: float = 0.01
    per_leaf: bool = False

    sparse = True

    def indices(self, x: Any, key: jax.Array) -> jax.Array:
        """The flat positions kept, over ``x``'s leaves in order, ``[k]`` (int32)."""
        del key
        leaves = jax.tree.leaves(x)
        if not self.per_leaf:
            flat = jnp.concatenate([_sharding.flat(jnp.abs(leaf)) for leaf in leaves])
            return jax.lax.top_k(flat, _count(self.density, flat.size))[1]
        return jnp.concatenate(
            [
                jax.lax.top_k(_sharding.flat(jnp.abs(leaf)), _count(self.density, leaf.size))[1]
                + offset
                for leaf, offset in zip(leaves, _offsets(leaves), strict=False)
                if leaf.size
            ],
            dtype=jnp.int32,
        )

    def compress(self, x, key):
        return keep(x, self.indices(x, key))

    def count(self, sizes: Sizes) -> int:
        """How many entries are kept, :math:`k`."""
        if self.per_leaf:
            return sum(self.leaf_counts(sizes))
        return _count(self.density, sum(sizes))

    def leaf_counts(self, sizes: Sizes) -> tuple[int, ...] | None:
        """How many entries each leaf keeps, in order (:meth:`indices` lists them leaf by
        leaf), or ``None`` when the count per leaf varies (global)."""
        if not self.per_leaf:
            return None
        return tuple(_count(self.density, n) if n else 0 for n in sizes)

    def payload_bytes(self, sizes, channels=1):
        # An int32 index shared by the channels and a float32 value per channel and entry.
        return 4 * (1 + channels) * self.count(sizes)


@dataclasses.dataclass(frozen=True)
class RandomK(TopK):
    """A fraction ``density`` of the entries, chosen at random, the same on every worker."""

    shared = True

    def indices(self, x, key):
        size = sum(leaf.size for leaf in jax.tree.leaves(x))
        return jax.random.choice(key, size, (_count(self.density, size),), replace=False)

    def count(self, sizes):
        return _count(self.density, sum(sizes))

    def leaf_counts(self, sizes):
        return None

    def payload_bytes(self, sizes, channels=1):
        return 4 * channels * self.count(sizes)  # values only: indices follow from the seed


@dataclasses.dataclass(frozen=True)
class Sign(Compressor):
    """The scaled sign, per leaf: ``mean(|x|) * sign(x)``."""

    def compress(self, x, key):
        del key
        return jax.tree.map(lambda v: jnp.mean(jnp.abs(v)) * jnp.sign(v) if v.size else v, x)

    def payload_bytes(self, sizes, channels=1):
        return channels * sum(math.ceil(n / 8) + 4 for n in sizes)


@dataclasses.dataclass(frozen=True)
class Quantize(Compressor):
    """Unbiased stochastic quantization to ``bits`` bits per entry, per leaf."""

    bits: int = 8

    def compress(self, x, key):
        levels = 2 ** (self.bits - 1) - 1
        leaves, treedef = jax.tree.flatten(x)
        offsets = _offsets(leaves)
        # One draw over the gradient's entries in order, each leaf its own stretch of it.
        noise = jax.random.uniform(key, (int(offsets[-1]),), jnp.result_type(*leaves))

        def leaf(v, offset):
            scale = jnp.max(jnp.abs(v), initial=0) / levels
            safe = jnp.where(scale > 0, scale, 1)
            u = noise[offset : offset + v.size].reshape(v.shape)
            return jnp.where(scale > 0, safe * jnp.floor(v / safe + u), 0)

        return treedef.unflatten([leaf(v, o) for v, o in zip(leaves, offsets, strict=False)])

    def payload_bytes(self, sizes, channels=1):
        return channels * sum(math.ceil(n * self.bits / 8) + 4 for n in sizes)


def dense_bytes(sizes: Sizes, channels: int = 1) -> int:
    """Bytes of ``channels`` uncompressed float32 channels: the 1x reference."""
    return 4 * channels * sum(sizes)


def _density(density: float) -> float:
    return float(_checks.real_in_range("density", density, 0.0, 1.0, low_open=True))


def top_k(density: float, *, per_leaf: bool = False, error_feedback: bool = True) -> TopK:
    """Top-k sparsification: keep the fraction ``density`` in (0, 1] of largest magnitude.

    Args:
      density: :math:`\\rho \\in (0, 1]`; :math:`k = \\lceil \\rho P \\rceil` (at least 1).
      per_leaf: choose :math:`\\lceil \\rho P_\\ell \\rceil` in every leaf instead of
        :math:`k` over the whole gradient.
      error_feedback: keep the rest in a per-worker residual.
    """
    return TopK(bool(error_feedback), _density(density), bool(per_leaf))


def random_k(density: float, *, error_feedback: bool = True) -> RandomK:
    """Random-k sparsification with a seed shared by all workers (``density`` in (0, 1])."""
    return RandomK(bool(error_feedback), _density(density))


def sign(*, error_feedback: bool = True) -> Sign:
    """Scaled sign compression, one bit per entry (with error feedback: EF-SignSGD)."""
    return Sign(bool(error_feedback))


def quantize(bits: int = 8, *, error_feedback: bool = True) -> Quantize:
    """Stochastic quantization to ``bits`` in [2, 16] bits per entry."""
    return Quantize(bool(error_feedback), _checks.integer("bits", bits, low=2, high=16))
