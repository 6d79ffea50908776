"""The workers of one device: a transform's ``vmap`` over them, with the axes its state's
declared placements call for (:mod:`fsq.placement`). :mod:`fsq.parallel` builds every
layout on it, and exports :func:`vmap_workers`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import optax

from fsq import _checks
from fsq.placement import PER_DEVICE, PER_WORKER, is_declared, placement_of

WORKER_AXIS = "workers"


def by_placement(state: Any, per_device: Any, per_worker: Any, replicated: Any) -> Any:
    """A prefix of ``state``: the value for each declared part's placement, else
    ``replicated`` for each leaf."""
    value = {PER_DEVICE: per_device, PER_WORKER: per_worker}
    return jax.tree.map(
        lambda x: value.get(placement_of(x), replicated), state, is_leaf=is_declared
    )


def map_placed(state: Any, spread: Callable, replicated: Callable) -> Any:
    """Applies ``spread`` to the leaves of per-device and per-worker parts (stored along
    axis 0 across devices), ``replicated`` to the rest."""
    return jax.tree.map(
        lambda x: jax.tree.map(spread, x) if is_declared(x) else replicated(x),
        state,
        is_leaf=is_declared,
    )


def worker_axes(state: Any) -> Any:
    """The ``vmap`` axes of ``state`` over the workers of a device: 0 for per-worker parts."""
    return by_placement(state, None, 0, None)


def vmap_workers(
    tx: optax.GradientTransformation, *, num_workers: int, axis_name: str = WORKER_AXIS
) -> optax.GradientTransformationExtraArgs:
    """``tx`` for ``num_workers`` workers on one device, as one transformation of their
    stacked gradients: the ``jax.vmap`` over the workers with the right axes for each part
    of the state, so that nobody writes them by hand.

    ``init(params)`` returns the workers' state (per-worker parts stacked ``[W, ...]``,
    the rest once); ``update(grads, state, params)``, with ``grads`` leaves ``[W, ...]``,
    returns the update (the same for every worker, once) and the new state. ``tx`` is
    called per worker under the axis ``axis_name`` (a Flying Squirrel transform built with
    the same ``axis_name`` and ``num_workers``).

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> tx = fsq.flying_squirrel(fsq.sgd(1.0), num_workers=2, worker_momentum=0.5)
      >>> w = fsq.parallel.vmap_workers(tx, num_workers=2)
      >>> state = w.init(jnp.zeros(1))
      >>> updates, state = w.update(jnp.array([[2.0], [4.0]]), state, jnp.zeros(1))
      >>> print(updates)  # the mean of the workers' momenta 1 and 2
      [-1.5]
    """
    num_workers = _checks.integer("num_workers", num_workers, low=1)
    workers = {"axis_name": axis_name}

    def init_fn(params):
        init = functools.partial(jax.vmap, tx.init, in_axes=None, axis_size=num_workers, **workers)
        axes = worker_axes(jax.eval_shape(init(out_axes=0), params))
        return init(out_axes=axes)(params)

    def update_fn(updates, state, params=None, **extra_args):
        axes = worker_axes(state)

        def update(grads, state):
            return tx.update(grads, state, params, **extra_args)

        try:
            return jax.vmap(update, in_axes=(0, axes), out_axes=(None, axes), **workers)(
                updates, state
            )
        except ValueError as e:
            if "out_axes" not in str(e):
                raise
            raise ValueError(
                "the optimizer's update or state differs between the workers of a device "
                "where it must be the same on every worker: state that is each worker's own "
                "must declare it (fsq.placement.PerWorker). optax.MultiSteps, for one, "
                "accumulates each worker's gradients in undeclared state: to step on the "
                "mean of several calls, accumulate in the inner optimizer instead "
                f"(fsq.accumulate(inner, k)) or feed larger batches ({e})"
            ) from None

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
