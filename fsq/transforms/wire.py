"""The wire format of a message: pytrees and scalars packed into one flat row.

A worker's message (its gradient, and later the extra channels that compensation or
compression need, plus bookkeeping scalars such as a delivery count) travels as a single
flat vector. Sums of messages are messages, so one row of the in-flight buffer holds the
sum of everything due at one step, and one all-reduce of one row delivers it: a single
collective per step, however many leaves the model has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = object


def width(like: PyTree, num_trees: int, num_scalars: int) -> int:
    """Length of a row holding ``num_trees`` trees shaped like ``like`` and the scalars."""
    return num_trees * sum(int(np.size(x)) for x in jax.tree.leaves(like)) + num_scalars


def parts(
    trees: Sequence[PyTree],
    scalars: Sequence[jax.Array],
    dtype: jnp.dtype,
    scale: jax.Array | float = 1.0,
    valid: jax.Array | bool = True,
) -> list[jax.Array]:
    """The pieces of a message, in row order: ``scale`` times the leaves of ``trees``
    (flat, in order), then the scalars. Their concatenation is the message; kept apart,
    each can be added into a row of the in-flight buffer where it is computed, without
    first building the message (a pass over the message less).

    Where ``valid`` is false the trees are sent as zeros: a select, not a multiply (``0 *
    NaN`` is NaN), fused into whatever consumes the piece.
    """
    scale = jnp.asarray(scale, dtype)
    pieces = [
        jnp.where(valid, scale * jnp.ravel(x).astype(dtype), 0)
        for tree in trees
        for x in jax.tree.leaves(tree)
    ]
    pieces.append(jnp.stack([jnp.asarray(s, dtype) for s in scalars]))
    return pieces


def unpack(read: Callable[[int, int], jax.Array], like: PyTree, num_trees: int) -> list[PyTree]:
    """Inverse of concatenating :func:`parts`: ``num_trees`` trees shaped like ``like``,
    from ``read(start, size)``, the row's entries ``start .. start + size``.

    The trees keep the row's dtype, so sums can be rescaled before any rounding.
    """
    leaves, treedef = jax.tree.flatten(like)
    trees, offset = [], 0
    for _ in range(num_trees):
        parts = []
        for x in leaves:
            parts.append(read(offset, x.size).reshape(x.shape))
            offset += x.size
        trees.append(jax.tree.unflatten(treedef, parts))
    return trees
