r"""Flying Squirrel: asynchronous data-parallel optimization with exactly simulated delays.

Every logical worker :math:`i \in \{0..W-1\}` calls ``update`` once per logical step
:math:`t` with its own gradient :math:`g_i(t)`, computed at the shared parameters
:math:`w_t`. The gradient is delivered at step :math:`t + d_i(t)`, with the delay drawn
from a :mod:`fsq.delays` model as a pure function of ``(seed, t, i)``. At step :math:`t`
the inner optimizer (the "server") is stepped on

.. math::

  G_t = \frac{1}{W} \sum_{(i, s):\, s + d_i(s) = t} g_i(s),

and the same update is returned on every worker. When nothing is delivered, the inner
optimizer is not stepped and the update is zero. With delay 0 this is exactly synchronous
data-parallel training with the inner optimizer.

Per step, a worker *sends* a message (its gradient plus a delivery count and its delay,
packed into one row by :mod:`fsq.transforms.wire`) into the in-flight buffer of its
device (:mod:`fsq.transforms.delivery`), and all workers *deliver* the row that is due,
with one all-reduce for the whole model.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fsq import _axes, _checks, _random, delays
from fsq.transforms import delivery, wire

# Per message: the gradient, then two scalars (a delivery count of 1, and the delay).
_NUM_TREES = 1
_NUM_SCALARS = 2


class FlyingSquirrelState(NamedTuple):
    """State of :func:`flying_squirrel`, held by every worker.

    Attributes:
      step: the logical clock :math:`t` (int32), identical on all workers.
      in_flight: the messages in flight from this device's workers.
      inner_state: state of the inner optimizer, identical on all workers.
      delivered: how many gradients were delivered at the last step (int32).
      staleness: their mean staleness :math:`t - s` in steps (float32; 0 if none).
    """

    step: jax.Array
    in_flight: delivery.InFlight
    inner_state: optax.OptState
    delivered: jax.Array
    staleness: jax.Array


def _accumulation_dtype(params: optax.Params) -> jnp.dtype:
    # Sums of many low-precision gradients would lose their small terms: use at least f32.
    return jnp.result_type(jnp.float32, *[jnp.result_type(x) for x in jax.tree.leaves(params)])


def _check_same_structure(updates: optax.Updates, params: optax.Params | None) -> None:
    if params is None:
        return
    got, want = jax.tree.structure(updates), jax.tree.structure(params)
    if got != want:
        raise ValueError(f"updates and params must have the same tree structure: {got} != {want}")


def flying_squirrel(
    inner: optax.GradientTransformation,
    *,
    num_workers: int,
    axis_name: str | tuple[str, ...] = "workers",
    delay: int | delays.DelayModel = 0,
    seed: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Asynchronous data-parallel training with delayed gradients, used per worker.

    Call ``init`` and ``update`` inside a mapped context whose ``axis_name`` axes hold
    ``num_workers`` workers in all (``jax.vmap``, ``jax.shard_map``, ``jax.pmap``, or
    nested), or let :mod:`fsq.parallel` build the step. Vmap axes share one in-flight
    buffer per device; mesh axes exchange one row per step with one all-reduce.

    .. math::

      G_t = \frac{1}{W} \sum_{(i,s):\, s + d_i(s) = t} g_i(s), \qquad
      (u_t, S_{t+1}) = \begin{cases} \mathrm{inner}(G_t, S_t, w_t) & \text{if anything
      is delivered at } t \\ (0, S_t) & \text{otherwise.} \end{cases}

    Args:
      inner: the optimizer applied to the delivered aggregate (any optax transform).
      num_workers: :math:`W \ge 1`, the number of logical workers over ``axis_name``.
      axis_name: the mapped axis name, or a tuple of nested names (outermost first) whose
        mixed-radix index is the global worker id.
      delay: an int (a constant delay) or a :mod:`fsq.delays` model.
      seed: the seed of every random choice (delays); runs are a pure function of it.
        A traced int scalar is accepted too, to ``jit`` or ``vmap`` over seeds.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`FlyingSquirrelState`; extra arguments are passed on to ``inner``.

    Example:
      >>> import jax, jax.numpy as jnp, fsq
      >>> tx = fsq.flying_squirrel(fsq.sgd(1.0), num_workers=2, delay=1)
      >>> params = jnp.zeros(1)
      >>> grads = jnp.array([[1.0], [3.0]])              # one gradient per worker
      >>> init = jax.vmap(tx.init, axis_size=2, in_axes=None, axis_name="workers")
      >>> update = jax.vmap(tx.update, in_axes=(0, 0, None), axis_name="workers")
      >>> state = init(params)
      >>> u, state = update(grads, state, params)         # t = 0: nothing delivered yet
      >>> print(u[0])
      [0.]
      >>> u, state = update(0 * grads, state, params)     # t = 1: the mean of step 0
      >>> print(u[0], state.staleness[0])
      [-2.] 1.0
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(
            f"inner must be an optax.GradientTransformation, got {type(inner).__name__}"
        )
    num_workers = _checks.integer("num_workers", num_workers, low=1)
    names = _axes.normalize(axis_name)
    model = delays.as_delay_model(delay)
    if not isinstance(seed, jax.core.Tracer):
        seed = _checks.integer("seed", seed, low=0)
    if model.num_workers is not None and model.num_workers != num_workers:
        raise ValueError(
            f"delay model is defined for {model.num_workers} workers but num_workers={num_workers}"
        )
    # Delivery counts and delay sums travel as floats; keep them exact in float32.
    if num_workers * (model.max_delay + 1) > 2**24:
        raise ValueError(
            f"num_workers * (max_delay + 1) must be at most 2**24, got {num_workers} * "
            f"{model.max_delay + 1}"
        )
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> FlyingSquirrelState:
        width = wire.width(params, _NUM_TREES, _NUM_SCALARS)
        return FlyingSquirrelState(
            step=jnp.zeros([], jnp.int32),
            in_flight=delivery.init(model.max_delay, width, _accumulation_dtype(params)),
            inner_state=inner.init(params),
            delivered=jnp.zeros([], jnp.int32),
            staleness=jnp.zeros([], jnp.float32),
        )

    def update_fn(
        updates: optax.Updates,
        state: FlyingSquirrelState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, FlyingSquirrelState]:
        _check_same_structure(updates, params)
        slots = state.in_flight.slots
        if wire.width(updates, _NUM_TREES, _NUM_SCALARS) != slots.shape[-1]:
            raise ValueError(
                "updates must have the shapes of the params given to init: they need "
                f"{wire.width(updates, _NUM_TREES, _NUM_SCALARS)} entries per message, "
                f"the in-flight buffer holds {slots.shape[-1]}"
            )
        axes = _axes.resolve(names, num_workers)
        worker = _axes.worker_index(axes.names)
        step = state.step
        delay = model(_random.event_key(seed, _random.Stream.DELAY, step, worker), step, worker)

        message = wire.pack([updates], [1, delay], slots.dtype)
        in_flight = delivery.send(state.in_flight, message, step + delay, axes.local)
        total, in_flight = delivery.deliver(in_flight, step, axes.device)
        (gradient_sum,), (count, delay_sum) = wire.unpack(total, updates, _NUM_TREES)
        delivered = jnp.round(count).astype(jnp.int32)
        mean = jax.tree.map(lambda s, g: (s / num_workers).astype(g.dtype), gradient_sum, updates)

        def step_inner(_):
            return inner.update(mean, state.inner_state, params, **extra_args)

        def skip(_):
            return optax.tree.zeros_like(mean), state.inner_state

        new_updates, inner_state = jax.lax.cond(delivered > 0, step_inner, skip, None)
        staleness = (delay_sum / jnp.maximum(count, 1.0)).astype(jnp.float32)
        return new_updates, FlyingSquirrelState(
            step + 1, in_flight, inner_state, delivered, staleness
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
