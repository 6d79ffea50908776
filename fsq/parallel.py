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
parameters. State that lives on one device (the in-flight buffer of
:class:`fsq.InFlight`, per-worker vectors such as error-feedback residuals) is stored
as the devices' blocks concatenated along axis 0, so ``shard_map`` hands each device its
block without a reshape (a reshape there makes XLA copy the buffer every step);
everything else is replicated.

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

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fsq import _checks
from fsq.transforms.delivery import InFlight
from fsq.transforms.per_worker import PerWorker

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


def _is_per_device(x: Any) -> bool:
    """State that differs across devices: the in-flight buffer, per-worker vectors."""
    return isinstance(x, InFlight | PerWorker)


def _per_device(opt_state: optax.OptState, on_device: Any, replicated: Any) -> Any:
    """A prefix of ``opt_state``: ``on_device`` for per-device parts, else ``replicated``."""
    return jax.tree.map(
        lambda x: on_device if _is_per_device(x) else replicated, opt_state, is_leaf=_is_per_device
    )


def _map_per_device(opt_state: optax.OptState, on_device: Callable, replicated: Callable) -> Any:
    """Applies ``on_device`` to the leaves of per-device parts, ``replicated`` to the rest."""
    return jax.tree.map(
        lambda x: jax.tree.map(on_device, x) if _is_per_device(x) else replicated(x),
        opt_state,
        is_leaf=_is_per_device,
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

    def device_step(params, opt_state, batch):
        losses, grads = local_gradients(params, batch)
        updates, opt_state = jax.vmap(
            lambda g: tx.update(g, opt_state, params), out_axes=None, axis_name=WORKER_AXIS
        )(grads)
        return optax.apply_updates(params, updates), opt_state, losses

    def map_devices(params, opt_state, batch):
        """Runs ``device_step`` once per device; ``batch`` leaves are ``[W, ...]``."""
        if backend == "vmap":  # one device: everything but the batch is its own block
            return jax.vmap(
                device_step, in_axes=None, out_axes=None, axis_size=1, axis_name=DEVICE_AXIS
            )(params, opt_state, batch)
        if backend == "shard_map":  # device blocks are the slices of axis 0: no reshapes
            specs = (P(), _per_device(opt_state, P(DEVICE_AXIS), P()), P(DEVICE_AXIS))
            return jax.shard_map(
                device_step, mesh=mesh, in_specs=specs, out_specs=specs, check_vma=False
            )(params, opt_state, batch)

        def split(x):
            return x.reshape((num_devices, -1) + x.shape[1:])

        def merge(x):
            return x.reshape((-1,) + x.shape[2:])

        in_axes = (None, _per_device(opt_state, 0, None), 0)
        params, opt_state, losses = jax.pmap(
            device_step,
            axis_name=DEVICE_AXIS,
            in_axes=in_axes,
            out_axes=in_axes,
            devices=list(mesh.devices.flat),
        )(
            params,
            _map_per_device(opt_state, split, lambda x: x),
            jax.tree.map(split, batch),
        )
        return params, _map_per_device(opt_state, merge, lambda x: x), merge(losses)

    def step(state: TrainState, batch: Any) -> tuple[TrainState, jax.Array]:
        for x in jax.tree.leaves(batch):
            if x.shape[:1] != (num_workers,):
                raise ValueError(
                    f"batch leaves must have a leading axis of num_workers={num_workers}, "
                    f"got shape {x.shape}"
                )
        params, opt_state, losses = map_devices(state.params, state.opt_state, batch)
        return TrainState(params, opt_state), losses

    def device_init(params):
        """The state of one device's workers, each leaf with a leading device axis of 1."""
        opt_state = jax.vmap(
            tx.init,
            in_axes=None,
            out_axes=None,
            axis_size=workers_per_device,
            axis_name=WORKER_AXIS,
        )(params)
        return jax.tree.map(lambda x: x[None], opt_state)

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
        # Per-device parts keep every device's block (concatenated on axis 0); the rest is
        # identical on all devices, so device 0's copy is kept.
        opt_state = _map_per_device(
            init_blocks(params), lambda x: x.reshape((-1,) + x.shape[2:]), lambda x: x[0]
        )
        # A copy: the step donates its state, which must not delete the caller's arrays.
        return TrainState(jax.tree.map(jnp.copy, params), opt_state)

    def init(params: optax.Params) -> TrainState:
        shapes = jax.eval_shape(init_state, params)
        split, whole = NamedSharding(mesh, P(DEVICE_AXIS)), NamedSharding(mesh, P())
        shardings = TrainState(
            jax.tree.map(lambda _: whole, shapes.params),
            _map_per_device(shapes.opt_state, lambda _: split, lambda _: whole),
        )
        return jax.jit(init_state, out_shardings=shardings)(params)

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
]
