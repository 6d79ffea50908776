"""The workers of one device: a transform's ``vmap`` over them, with the axes its state's
declared placements call for (:mod:`fsq.placement`). :mod:`fsq.parallel` builds every
layout on it, and exports :func:`vmap_workers`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fsq import _checks
from fsq._sharding import constrain
from fsq.placement import PER_DEVICE, PER_WORKER, is_declared, placement_of
from fsq.transforms.rejection import all_finite

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


def map_workers(state: Any, fn: Callable) -> Any:
    """Applies ``fn`` to the leaves of per-worker parts, leaves the rest."""
    return jax.tree.map(
        lambda x: jax.tree.map(fn, x) if placement_of(x) == PER_WORKER else x,
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
    the rest once; for abstract parameters, ``jax.ShapeDtypeStruct`` leaves, its shapes);
    ``update(grads, state, params)``, with ``grads`` leaves ``[W, ...]``,
    returns the update (the same for every worker, once) and the new state. ``tx`` is
    called per worker under the axis ``axis_name`` (a Flying Squirrel transform built with
    the same ``axis_name`` and ``num_workers``). With ``rows`` (``[K]`` distinct local
    indices) and ``worker_ids`` (their global ids), ``grads`` holds those workers' only:
    the others are not mapped at all and keep their state (workers busy with an earlier
    job, which send nothing). With ``summed`` (``[W]`` bools), ``grads`` (no leading axis)
    is the sum of the gradients of the workers where ``summed`` holds, the others' being
    rejected as not finite, for a transform whose state allows it (:func:`sums_workers`).

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
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
            return jax.eval_shape(init_fn, params)  # abstract parameters: the state's shapes
        init = functools.partial(jax.vmap, tx.init, in_axes=None, axis_size=num_workers, **workers)
        axes = worker_axes(jax.eval_shape(init(out_axes=0), params))
        return init(out_axes=axes)(params)

    def update_fn(
        updates, state, params=None, *, rows=None, worker_ids=None, summed=None, **extra_args
    ):
        axes = worker_axes(state)
        if rows is not None:  # only these workers: the others keep their own state
            whole, state = state, map_workers(state, lambda x: x[rows])

        def update(grads, state, worker_id, summed):
            extra = extra_args if worker_id is None else {**extra_args, "worker_id": worker_id}
            extra = extra if summed is None else {**extra, "summed": summed}
            return tx.update(grads, state, params, **extra)

        try:
            # Summed, every worker is handed the sum, and it is sent once for them all.
            updates, state = jax.vmap(
                update,
                in_axes=(None if summed is not None else 0, axes, 0, 0),
                out_axes=(None, axes),
                **workers,
            )(updates, state, worker_ids, summed)
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
        if rows is not None:
            state = jax.tree.map(
                lambda w, x: (
                    jax.tree.map(lambda a, b: a.at[rows].set(b), w, x)
                    if placement_of(w) == PER_WORKER
                    else x
                ),
                whole,
                state,
                is_leaf=is_declared,
            )
        return updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _says_who_starts(state: Any) -> bool:
    return callable(getattr(type(state), "starting_workers", None))


def starting_workers(opt_state: Any, ids: jax.Array) -> jax.Array | None:
    """Which of the workers ``ids`` start a job at the coming step, ``None`` when they all
    do: read from the part of ``opt_state`` that says so with a ``starting_workers() ->
    [W]`` method (a clock, :func:`fsq.transforms.clock`), whatever its type."""
    said = [x for x in jax.tree.leaves(opt_state, is_leaf=_says_who_starts) if _says_who_starts(x)]
    return said[0].starting_workers()[ids] if said else None


def sums_workers(opt_state: Any) -> bool:
    """Whether the transform whose state is ``opt_state`` may be given the sum of a
    device's workers' gradients in place of each one (``update(..., summed=mask)``): its
    state says so with a ``sums_workers() -> bool`` method
    (:meth:`fsq.FlyingSquirrelState.sums_workers`), whatever its type. Only the state of
    the whole transform is asked: a transform around it may need each gradient."""
    says = getattr(type(opt_state), "sums_workers", None)
    return callable(says) and bool(opt_state.sums_workers())


def _holds_params(state: Any) -> bool:
    return callable(getattr(type(state), "worker_params", None))


def worker_parameters(opt_state: Any, params: Any) -> Any | None:
    """The parameters each of a device's workers computes its gradient at (leaves ``[L,
    ...]``), or ``None`` when they all use ``params``.

    A state that holds its worker's own parameters (local steps,
    :func:`fsq.transforms.local_steps`) says so with a ``worker_params(params) -> params``
    method; the per-worker parts of ``opt_state`` are batched over the workers, and every
    such state replaces its own leaves, in order."""
    holders = [x for x in jax.tree.leaves(opt_state, is_leaf=_holds_params) if _holds_params(x)]
    if not holders:
        return None

    def of_worker(holders):
        own = params
        for holder in holders:
            own = holder.worker_params(own)
        return own

    return jax.vmap(of_worker)(holders)


def check_output(out: Any, has_aux: bool) -> None:
    """Raises a ``TypeError`` naming the fix unless ``out`` (what ``loss_fn`` returned for
    one worker's batch, arrays or shapes) is one scalar loss, or with ``has_aux`` a pair
    ``(loss, aux)``."""
    shapes = jax.tree.map(jnp.shape, out)
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                "with has_aux=True, loss_fn must return a pair (loss, aux) for one worker's "
                f"batch, got {shapes}: return the loss alone without has_aux"
            )
        out = out[0]
    if not (hasattr(out, "shape") and hasattr(out, "dtype")) or jnp.shape(out) != ():
        hint = (
            "return one scalar loss"
            if has_aux
            else "return the loss alone, or pass has_aux=True to return (loss, aux) with "
            "metrics such as accuracy in aux (returned stacked over the workers)"
        )
        raise TypeError(
            f"loss_fn must return one scalar loss for one worker's batch, got {shapes}: {hint}"
        )


def check_loss(
    loss_fn: Callable[[Any, Any], Any], params: Any, worker_batch: Any, has_aux: bool = False
) -> None:
    """:func:`check_output` of ``loss_fn`` on one worker's batch, by its shapes, after
    checking that every parameter is floating point (a gradient needs it)."""
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            raise TypeError(
                f"the parameter at {jax.tree_util.keystr(path)} is {jnp.result_type(x)}: "
                "gradients are taken of floating-point parameters only; keep integer "
                "variables out of the parameters (with fsq.nnx.DataParallel, wrt= a filter "
                "that leaves them out, or another nnx.Variable type than nnx.Param)"
            )
    try:
        out = jax.eval_shape(loss_fn, params, worker_batch)
    except (TypeError, ValueError) as e:  # the model's own error, with the likely layout slip
        shapes = jax.tree.map(jnp.shape, worker_batch)
        raise type(e)(
            f"loss_fn failed on one worker's batch, shaped {shapes} (the batch without its "
            "leading axis of workers). If that is one example rather than a worker's "
            "examples, the batch lacks its worker axis: its leaves must be [num_workers, "
            f"examples per worker, ...]. The error: {e}"
        ) from e
    check_output(out, has_aux)


def _blank(x: Any) -> jax.Array:
    """What an idle worker reports in place of ``x``: NaN (zero for integers)."""
    fill = jnp.nan if jnp.issubdtype(x.dtype, jnp.inexact) else 0
    return jnp.full(x.shape, fill, x.dtype)


def workers_step(
    loss_fn: Callable[[Any, Any], jax.Array],
    workers: optax.GradientTransformationExtraArgs,
    params: Any,
    opt_state: Any,
    batch: Any,
    *,
    ids: jax.Array,
    slots: int | None = None,
    has_aux: bool = False,
) -> tuple[Any, Any, Any]:
    """One step of a device's workers: their losses and gradients, and the update.

    ``loss_fn(params, worker_batch)`` is one worker's loss (with ``has_aux``, a pair
    ``(loss, aux)``); ``batch`` leaves have a
    leading axis of the device's ``L`` workers, whose global ids are ``ids``; ``workers``
    is :func:`vmap_workers` of the transform. Each worker's gradient is taken at
    ``params``, or at its own parameters where the state holds them (local steps,
    :func:`worker_parameters`).

    Where the transform's messages of the device's workers share a ring row
    (:func:`sums_workers`: delay 0, or a constant delay, without pieces that need each
    gradient apart), one gradient of the workers' summed losses stands for their
    gradients, as one large-batch step computes it; if that sum is not finite, the step
    computes each worker's gradient instead, so that only the non-finite ones are
    rejected.

    With a clock in the transform (:func:`fsq.transforms.clock`), a worker busy with an
    earlier job sends nothing, so its gradient is not computed: a worker alone on its
    device is skipped by a ``lax.cond``; of ``L`` workers, the smallest of ``slots``,
    ``2 slots``, ``4 slots``, ... or ``L`` that holds those that start a job is mapped
    (they first, idle ones to fill it). Idle workers report a NaN loss (and NaN, or 0 for
    integers, in every leaf of aux).

    Returns:
      ``(updates, opt_state, losses)``, ``losses`` of shape ``[L]``; with ``has_aux``,
      ``(updates, opt_state, (losses, aux))``, aux leaves stacked ``[L, ...]``.

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> tx = fsq.flying_squirrel(fsq.sgd(0.1), num_workers=2, compute=fsq.timing.fixed([1, 2]))
      >>> workers = fsq.parallel.vmap_workers(tx, num_workers=2)
      >>> loss = lambda w, x: jnp.sum((w - x) ** 2)
      >>> params = jnp.zeros(1)
      >>> opt_state = workers.init(params)
      >>> for _ in range(2):
      ...     _, opt_state, losses = fsq.parallel.workers_step(
      ...         loss, workers, params, opt_state, jnp.ones((2, 1)), ids=jnp.arange(2))
      ...     print(losses)  # worker 1 is busy at the second step
      [1. 1.]
      [ 1. nan]
    """
    if slots is not None:
        slots = _checks.integer("gradient_slots", slots, low=1)
    check_loss(loss_fn, params, jax.tree.map(lambda x: x[0], batch), has_aux)
    # One form for both: (loss, aux), aux None without has_aux.
    with_aux = loss_fn if has_aux else (lambda p, b: (loss_fn(p, b), None))
    value_and_grad = jax.value_and_grad(with_aux, has_aux=True)
    active = starting_workers(opt_state, ids)
    num_local = jax.tree.leaves(batch)[0].shape[0]
    own = worker_parameters(opt_state, params)

    def result(updates, opt_state, out):
        return updates, opt_state, (out if has_aux else out[0])

    def at(rows):
        """The parameters of the workers ``rows`` (``None``: all), and their vmap axis."""
        if own is None:
            return params, None
        return (own, 0) if rows is None else (jax.tree.map(lambda x: x[rows], own), 0)

    def every(rows, batch):
        where, axis = at(rows)
        out, grads = jax.vmap(value_and_grad, in_axes=(axis, 0))(where, batch)
        return out, constrain(grads, leading=1)

    if num_local == 1:
        # A vmap of size 1 would turn the weight gradients into batched matmuls, twice as
        # slow on CPU: compute the single worker's gradient unbatched.
        def one():
            where = params if own is None else jax.tree.map(lambda x: x[0], own)
            out, grads = value_and_grad(where, jax.tree.map(lambda x: x[0], batch))
            return jax.tree.map(lambda x: x[None], (out, constrain(grads)))

        def idle():
            out, grads = jax.eval_shape(one)
            return jax.tree.map(_blank, out), optax.tree.zeros_like(grads)

        out, grads = one() if active is None else jax.lax.cond(active[0], one, idle)
        return result(*workers.update(grads, opt_state, params), out)

    def all_workers():
        out, grads = every(None, batch)
        if active is not None:
            out = jax.tree.map(lambda x: _where_active(active, x), out)
        return result(*workers.update(grads, opt_state, params), out)

    if active is None and own is None and sums_workers(opt_state):

        def summed_loss(params):
            out = jax.vmap(with_aux, in_axes=(None, 0))(params, batch)
            return jnp.sum(out[0]), out

        (_, out), total = jax.value_and_grad(summed_loss, has_aux=True)(params)

        def finite_only():  # some gradient is not finite: the sum of the others
            _, grads = every(None, batch)
            finite = jax.vmap(all_finite)(grads)

            def kept(g):
                held = finite.reshape(finite.shape + (1,) * (g.ndim - 1))
                return jnp.tensordot(jnp.ones(num_local, g.dtype), jnp.where(held, g, 0), 1)

            return jax.tree.map(kept, grads), finite

        total, finite = jax.lax.cond(
            all_finite(total), lambda: (total, jnp.ones(num_local, bool)), finite_only
        )
        return result(*workers.update(constrain(total), opt_state, params, summed=finite), out)
    if active is None or slots is None or slots >= num_local:
        return all_workers()

    def some_workers(capacity):
        def run():
            rows = jnp.argsort(~active, stable=True)[:capacity]  # the active ones first
            out, grads = every(rows, jax.tree.map(lambda x: x[rows], batch))
            updates, new_state = workers.update(
                grads, opt_state, params, rows=rows, worker_ids=ids[rows]
            )
            out = jax.tree.map(
                lambda x: (
                    _blank(jnp.zeros((num_local,) + x.shape[1:], x.dtype))
                    .at[rows]
                    .set(_where_active(active[rows], x))
                ),
                out,
            )
            return result(updates, new_state, out)

        return run

    # Capacities slots, 2 slots, 4 slots, ... then every worker: the smallest that holds
    # this step's active workers is run.
    capacities = []
    while slots * 2 ** len(capacities) < num_local:
        capacities.append(slots * 2 ** len(capacities))
    branches = [some_workers(c) for c in capacities] + [all_workers]
    index = jnp.searchsorted(jnp.asarray(capacities), jnp.sum(active))
    return jax.lax.switch(index, branches)


def _where_active(active: jax.Array, x: jax.Array) -> jax.Array:
    """``x`` (``[L, ...]``) for the active workers, blank for the idle ones."""
    return jnp.where(active.reshape(active.shape + (1,) * (x.ndim - 1)), x, _blank(x))
