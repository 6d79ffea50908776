r"""Logical workers onto devices: one train step, four ways to map it, no specs by hand.

``W`` logical workers run on ``D`` devices, ``W / D`` per device. Every layout binds the
same two nested axes, :data:`AXIS_NAME` ``= ("devices", "workers")``: the outer one spans
devices, the inner one (always a ``vmap``) the workers of one device. A transform built
with ``axis_name=fsq.parallel.AXIS_NAME`` therefore runs unchanged under every backend:

=============  ===========================================  ===========================
backend        ``"devices"`` axis                           use
=============  ===========================================  ===========================
``vmap``       a ``vmap`` of size 1 (one device)            laptops, tests, simulation
``shard_map``  a mesh axis over ``D`` devices               GPUs, TPU pods, multi-host
``pmap``       a ``pmap`` axis over ``D`` devices           legacy ``pmap`` code
=============  ===========================================  ===========================

The step computes each worker's *local* gradient (``shard_map`` runs with
``check_vma=False``, so ``jax.grad`` of replicated parameters is not summed over devices
behind the user's back), applies ``tx`` per worker and returns the new replicated
parameters. How each part of the optimizer state is stored follows its declared
placement (:mod:`fsq.placement`): state shared by the workers of a device (the in-flight
buffer) is stored as the devices' blocks concatenated along axis 0, so ``shard_map``
hands each device its block without a reshape (a reshape there makes XLA copy the buffer
every step); state each worker holds its own of (error-feedback residuals, worker
momentum) as ``[W, ...]``, batched over the workers of a device; everything else is
replicated, and must be the same on every worker (a clear error says otherwise).
:func:`vmap_workers` is the same mapping of workers for one device, as one optax
transformation of the workers' stacked gradients.

Example:
  >>> import jax, jax.numpy as jnp, fsq
  >>> tx = fsq.flying_squirrel(fsq.sgd(0.1), num_workers=8, delay=2,
  ...                          axis_name=fsq.parallel.AXIS_NAME)
  >>> loss = lambda w, batch: jnp.mean((batch["x"] @ w - batch["y"]) ** 2)
  >>> dp = fsq.parallel.data_parallel(loss, tx, num_workers=8, backend="vmap")
  >>> state = dp.init(jnp.zeros(3))
  >>> batch = {"x": jnp.ones((8, 4, 3)), "y": jnp.ones((8, 4))}   # [workers, ...]
  >>> state, losses = dp.step(state, batch)
  >>> losses.shape
  (8,)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fsq import _checks
from fsq.placement import PER_DEVICE, PER_WORKER, is_declared, placement_of

DEVICE_AXIS = "devices"
WORKER_AXIS = "workers"
AXIS_NAME = (DEVICE_AXIS, WORKER_AXIS)
BACKENDS = ("vmap", "shard_map", "pmap")

LossFn = Callable[[optax.Params, Any], jax.Array]


class TrainState(NamedTuple):
    """Parameters (replicated) and optimizer state (per-device parts concatenated on axis 0)."""

    params: optax.Params
    opt_state: optax.OptState


class DataParallel(NamedTuple):
    """A data-parallel training step and how it is laid out.

    Attributes:
      init: ``params -> TrainState``, placed on the devices.
      step: jitted ``(TrainState, batch) -> (TrainState, losses)``; every leaf of ``batch``
        has a leading axis of ``num_workers`` (one shard per worker) and ``losses`` is the
        ``[num_workers]`` vector of each worker's loss before the update. The input state
        is donated (its buffers are reused in place, so the in-flight buffer is never
        copied); keep using the returned state.
      num_workers: ``W``.
      mesh: the device mesh (one device for the ``vmap`` backend).
      backend: ``"vmap"``, ``"shard_map"`` or ``"pmap"``.
      local_workers: the ids of the workers whose devices belong to this process (all of
        them in a single-process job).
      put_batch: ``local_batch -> batch``: builds the global batch of a multi-process job
        (``shard_map`` backend) from this process's share, whose leaves have a leading
        axis of ``len(local_workers)``, in the order of ``local_workers``. Each process
        loads only its own workers' data. Single-process jobs can pass numpy batches to
        ``step`` directly.
    """

    init: Callable[[optax.Params], TrainState]
    step: Callable[[TrainState, Any], tuple[TrainState, jax.Array]]
    num_workers: int
    mesh: jax.sharding.Mesh
    backend: str
    local_workers: tuple[int, ...]
    put_batch: Callable[[Any], Any]


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh over the first ``num_devices`` global devices (all by default).

    After ``jax.distributed.initialize`` the global devices span every process, so the
    same call builds the mesh of a multi-host job (e.g. a TPU pod).

    Args:
      num_devices: how many devices, in ``[1, jax.device_count()]``; ``None`` for all.
    """
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    n = _checks.integer("num_devices", n, low=1, high=len(devices))
    return jax.make_mesh(
        (n,), (DEVICE_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n]
    )


def _by_placement(state: Any, per_device: Any, per_worker: Any, replicated: Any) -> Any:
    """A prefix of ``state``: the value for each declared part's placement, else
    ``replicated`` for each leaf."""
    value = {PER_DEVICE: per_device, PER_WORKER: per_worker}
    return jax.tree.map(
        lambda x: value.get(placement_of(x), replicated), state, is_leaf=is_declared
    )


def _map_placed(state: Any, spread: Callable, replicated: Callable) -> Any:
    """Applies ``spread`` to the leaves of per-device and per-worker parts (stored along
    axis 0 across devices), ``replicated`` to the rest."""
    return jax.tree.map(
        lambda x: jax.tree.map(spread, x) if is_declared(x) else replicated(x),
        state,
        is_leaf=is_declared,
    )


def _worker_axes(state: Any) -> Any:
    """The ``vmap`` axes of ``state`` over the workers of a device: 0 for per-worker parts."""
    return _by_placement(state, None, 0, None)


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
        axes = _worker_axes(jax.eval_shape(init(out_axes=0), params))
        return init(out_axes=axes)(params)

    def update_fn(updates, state, params=None, **extra_args):
        axes = _worker_axes(state)

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


def worker_ids(num_local: int) -> jax.Array:
    """The global ids of the ``num_local`` workers of this device (``[num_local]`` int32),
    inside a function mapped over the devices (:func:`per_device`, or the step of
    :func:`data_parallel`): device ``d`` holds workers ``d * num_local .. (d + 1) *
    num_local - 1``, the order of :data:`AXIS_NAME`'s mixed-radix worker index."""
    device = jax.lax.axis_index(DEVICE_AXIS)
    return (device * num_local + jnp.arange(num_local)).astype(jnp.int32)


def per_device(fn: Callable[..., Any], *, mesh: jax.sharding.Mesh) -> Callable[..., Any]:
    """``fn`` run once per device of ``mesh``, under the device axis of :data:`AXIS_NAME`:
    every argument is given whole to every device, and every output comes back stacked
    over the devices (a leading axis of ``D``).

    For programs that keep a whole simulation on the devices (a ``scan`` over steps of
    :func:`vmap_workers` updates, as the studies of ``experiments/`` run), where no state
    crosses between devices but through the transform's own collectives.

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> mesh = fsq.parallel.make_mesh(2)
      >>> fsq.parallel.per_device(lambda x: x + fsq.parallel.worker_ids(3), mesh=mesh)(
      ...     jnp.zeros(3)).tolist()
      [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    """
    if mesh.axis_names != (DEVICE_AXIS,):
        raise ValueError(f"mesh must have the single axis {DEVICE_AXIS!r} (use make_mesh)")

    def stacked(*args):
        return jax.tree.map(lambda x: x[None], fn(*args))

    return jax.shard_map(
        stacked, mesh=mesh, in_specs=P(), out_specs=P(DEVICE_AXIS), check_vma=False
    )


def data_parallel(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    num_workers: int,
    backend: str = "shard_map",
    mesh: jax.sharding.Mesh | None = None,
) -> DataParallel:
    """Builds the jitted data-parallel train step of ``loss_fn`` with ``tx``, per worker.

    Args:
      loss_fn: ``(params, worker_batch) -> scalar loss`` for one worker's shard.
      tx: the optimizer, called per worker; a Flying Squirrel transform must be built with
        ``axis_name=fsq.parallel.AXIS_NAME`` and the same ``num_workers``.
      num_workers: ``W``, a multiple of the number of devices.
      backend: ``"vmap"`` (one device), ``"shard_map"`` or ``"pmap"``.
      mesh: for ``shard_map`` / ``pmap``, a mesh from :func:`make_mesh` (default: all
        devices); ignored by ``vmap``.

    Returns:
      A :class:`DataParallel` with ``init`` and ``step``.
    """
    num_workers = _checks.integer("num_workers", num_workers, low=1)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "vmap":
        mesh = make_mesh(1)
    elif mesh is None:
        mesh = make_mesh()
    elif mesh.axis_names != (DEVICE_AXIS,):
        raise ValueError(f"mesh must have the single axis {DEVICE_AXIS!r} (use make_mesh)")
    num_devices = mesh.devices.size
    if num_workers % num_devices:
        raise ValueError(
            f"num_workers={num_workers} must be a multiple of the number of devices "
            f"({num_devices}); fsq never pads workers silently"
        )
    workers_per_device = num_workers // num_devices

    def local_gradients(params, batch):
        """Each local worker's loss and gradient; batch leaves are ``[W / D, ...]``."""
        value_and_grad = jax.value_and_grad(loss_fn)
        if jax.tree.leaves(batch)[0].shape[0] == 1:
            # A vmap of size 1 would turn the weight gradients into batched matmuls, twice
            # as slow on CPU: compute the single worker's gradient unbatched.
            loss, grads = value_and_grad(params, jax.tree.map(lambda x: x[0], batch))
            return loss[None], jax.tree.map(lambda g: g[None], grads)
        return jax.vmap(value_and_grad, in_axes=(None, 0))(params, batch)

    local = vmap_workers(tx, num_workers=workers_per_device)

    def device_step(params, opt_state, batch):
        losses, grads = local_gradients(params, batch)
        updates, opt_state = local.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, losses

    def map_devices(params, opt_state, batch):
        """Runs ``device_step`` once per device; ``batch`` leaves are ``[W, ...]``."""
        if backend == "shard_map":  # device blocks are the slices of axis 0: no reshapes
            spread = P(DEVICE_AXIS)
            specs = (P(), _by_placement(opt_state, spread, spread, P()), P(DEVICE_AXIS))
            return jax.shard_map(
                device_step, mesh=mesh, in_specs=specs, out_specs=specs, check_vma=False
            )(params, opt_state, batch)
        # pmap splits every device's block off; the vmap of one device keeps what all its
        # workers share unbatched (a batched in-flight buffer would turn the inner step's
        # cond into a select), and only splits what each worker holds its own of.
        spread = 0 if backend == "pmap" else None
        state_axes = _by_placement(opt_state, spread, 0, None)
        in_axes = (None, state_axes, 0 if backend == "pmap" else None)

        def split(x):
            return x.reshape((num_devices, -1) + x.shape[1:])

        def merge(x):
            return x.reshape((-1,) + x.shape[2:])

        split_off = (PER_DEVICE, PER_WORKER) if backend == "pmap" else (PER_WORKER,)

        def each(f, state):
            return jax.tree.map(
                lambda x: jax.tree.map(f, x) if placement_of(x) in split_off else x,
                state,
                is_leaf=is_declared,
            )

        if backend == "pmap":
            mapped = jax.pmap(
                device_step,
                axis_name=DEVICE_AXIS,
                in_axes=in_axes,
                out_axes=(None, state_axes, 0),
                devices=list(mesh.devices.flat),
            )
            batch = jax.tree.map(split, batch)
        else:
            mapped = jax.vmap(
                device_step,
                in_axes=in_axes,
                out_axes=(None, state_axes, None),
                axis_size=1,
                axis_name=DEVICE_AXIS,
            )
        params, opt_state, losses = mapped(params, each(split, opt_state), batch)
        return params, each(merge, opt_state), merge(losses) if backend == "pmap" else losses

    def step(state: TrainState, batch: Any) -> tuple[TrainState, jax.Array]:
        for x in jax.tree.leaves(batch):
            if x.shape[:1] != (num_workers,):
                raise ValueError(
                    f"batch leaves must have a leading axis of num_workers={num_workers}, "
                    f"got shape {x.shape}"
                )
        params, opt_state, losses = map_devices(state.params, state.opt_state, batch)
        # The state keeps the shardings ``init`` gave it, so the step compiles once.
        opt_state = jax.lax.with_sharding_constraint(opt_state, shardings(opt_state))
        return TrainState(params, opt_state), losses

    def device_init(params):
        """The state of one device's workers, each leaf with a leading device axis of 1."""
        return jax.tree.map(lambda x: x[None], local.init(params))

    def init_blocks(params):
        """Runs ``tx.init`` in the mapped context of the step, stacking the devices' states."""
        if backend == "vmap":
            stacked = jax.vmap(device_init, in_axes=None, axis_size=1, axis_name=DEVICE_AXIS)(
                params
            )
            return jax.tree.map(lambda x: x[0], stacked)
        if backend == "shard_map":
            return jax.shard_map(
                device_init, mesh=mesh, in_specs=P(), out_specs=P(DEVICE_AXIS), check_vma=False
            )(params)
        stacked = jax.pmap(  # pmap needs a mapped argument: the device ids
            lambda _, params: device_init(params),
            axis_name=DEVICE_AXIS,
            in_axes=(0, None),
            devices=list(mesh.devices.flat),
        )(jnp.arange(num_devices), params)
        return jax.tree.map(lambda x: x[:, 0], stacked)

    def init_state(params):
        # Per-device and per-worker parts keep every device's block (concatenated on axis
        # 0); the rest is identical on all devices, so device 0's copy is kept.
        opt_state = _map_placed(
            init_blocks(params), lambda x: x.reshape((-1,) + x.shape[2:]), lambda x: x[0]
        )
        # A copy: the step donates its state, which must not delete the caller's arrays.
        return TrainState(jax.tree.map(jnp.copy, params), opt_state)

    split, whole = NamedSharding(mesh, P(DEVICE_AXIS)), NamedSharding(mesh, P())

    def shardings(opt_state):
        # Over one device, or for an empty block, XLA gives the replicated sharding: so do
        # we, or the step would see other shardings than init's and compile twice.
        def spread(x):
            return split if num_devices > 1 and np.size(x) else whole

        return _map_placed(opt_state, spread, lambda _: whole)

    def init(params: optax.Params) -> TrainState:
        shapes = jax.eval_shape(init_state, params)
        out = TrainState(jax.tree.map(lambda _: whole, shapes.params), shardings(shapes.opt_state))
        return jax.jit(init_state, out_shardings=out)(params)

    local_workers = tuple(
        device * workers_per_device + i
        for device, d in enumerate(mesh.devices.flat)
        if d.process_index == jax.process_index()
        for i in range(workers_per_device)
    )
    row_of = {worker: row for row, worker in enumerate(local_workers)}
    batch_sharding = NamedSharding(mesh, P(DEVICE_AXIS))

    def put_batch(local_batch: Any) -> Any:
        def put(x):
            x = np.asarray(x)
            if x.shape[:1] != (len(local_workers),):
                raise ValueError(
                    f"local batch leaves must have a leading axis of {len(local_workers)} "
                    f"(this process's workers), got shape {x.shape}"
                )
            return jax.make_array_from_callback(
                (num_workers, *x.shape[1:]),
                batch_sharding,
                lambda index: x[[row_of[w] for w in range(num_workers)[index[0]]]],
            )

        return jax.tree.map(put, local_batch)

    return DataParallel(
        init,
        jax.jit(step, donate_argnums=0),
        num_workers,
        mesh,
        backend,
        local_workers,
        put_batch,
    )


__all__ = [
    "AXIS_NAME",
    "BACKENDS",
    "DEVICE_AXIS",
    "WORKER_AXIS",
    "DataParallel",
    "TrainState",
    "data_parallel",
    "make_mesh",
    "per_device",
    "vmap_workers",
    "worker_ids",
]
