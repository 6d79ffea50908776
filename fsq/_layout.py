"""Devices: the mesh, the device axis, and how a per-device step is mapped over them.

:mod:`fsq.parallel` builds its layouts on these and exports the public ones
(:func:`make_mesh`, :func:`per_device`, :func:`worker_ids`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fsq import _checks
from fsq._local import by_placement
from fsq._sharding import DEVICE_AXIS, check_mesh, model_axes
from fsq.placement import PER_DEVICE, PER_WORKER, is_declared, placement_of


def make_mesh(
    num_devices: int | None = None, *, model_axes: Mapping[str, int] | None = None
) -> jax.sharding.Mesh:
    """A mesh over the first ``num_devices`` global devices (all by default): the worker
    axis :data:`DEVICE_AXIS`, then the model axes, if any.

    Without ``model_axes`` every device holds a whole copy of the model (a 1-D mesh).
    With them a worker group is a slice of ``prod(model_axes.values())`` devices, its
    model sharded over those axes, and the worker axis has ``num_devices / prod(...)``
    groups. After ``jax.distributed.initialize`` the global devices span every process
    (the first process's first), so the same call builds the mesh of a multi-host job,
    each group within one process when the processes' device counts are multiples of a
    group's.

    Args:
      num_devices: how many devices, in ``[1, jax.device_count()]``; ``None`` for all.
      model_axes: ``{name: size}`` of the model axes, in order (e.g. ``{"fsdp": 4}``);
        their product must divide ``num_devices``.

    Example:
      >>> import fsq
      >>> mesh = fsq.parallel.make_mesh(8, model_axes={"fsdp": 2, "tensor": 2})
      >>> dict(mesh.shape)
      {'devices': 2, 'fsdp': 2, 'tensor': 2}
    """
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    n = _checks.integer("num_devices", n, low=1, high=len(devices))
    model = dict(model_axes or {})
    for name, size in model.items():
        if not isinstance(name, str) or name == DEVICE_AXIS:
            raise ValueError(
                f"model_axes names must be strings other than {DEVICE_AXIS!r}, got {name!r}"
            )
        _checks.integer(f"model_axes[{name!r}]", size, low=1)
    shards = math.prod(model.values())
    if n % shards:
        raise ValueError(
            f"model_axes {model} make groups of {shards} devices, which must divide num_devices={n}"
        )
    shape = (n // shards, *model.values())
    names = (DEVICE_AXIS, *model)
    return jax.make_mesh(
        shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names), devices=devices[:n]
    )


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
    check_mesh(mesh)

    def stacked(*args):
        return jax.tree.map(lambda x: x[None], fn(*args))

    return jax.shard_map(stacked, mesh=mesh, in_specs=P(), out_specs=P(DEVICE_AXIS), **manual(mesh))


def manual(mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """The keywords of a ``shard_map`` over ``mesh``'s worker axis: manual over it only, the
    model axes left to XLA (GSPMD), which shards each worker's model as its user does."""
    names = {"axis_names": frozenset({DEVICE_AXIS})} if model_axes(mesh) else {}
    return {"check_vma": False, **names}


def device_map(device_step: Callable, backend: str, mesh: jax.sharding.Mesh) -> Callable:
    """``device_step(carried, opt_state, batch) -> (carried, opt_state, out)`` run once
    per device of ``mesh``: ``carried`` (the parameters, ...) is replicated, ``batch`` and
    ``out`` leaves are ``[W, ...]``, each part of the state is laid out by its placement."""
    num_devices = mesh.devices.size

    def map_devices(carried, opt_state, batch):
        if backend == "shard_map":  # device blocks are the slices of axis 0: no reshapes
            spread = P(DEVICE_AXIS)
            specs = (P(), by_placement(opt_state, spread, spread, P()), P(DEVICE_AXIS))
            return jax.shard_map(
                device_step, mesh=mesh, in_specs=specs, out_specs=specs, **manual(mesh)
            )(carried, opt_state, batch)
        # pmap splits every device's block off; the vmap of one device keeps what all its
        # workers share unbatched (a batched in-flight buffer would turn the inner step's
        # cond into a select), and only splits what each worker holds its own of.
        spread = 0 if backend == "pmap" else None
        state_axes = by_placement(opt_state, spread, 0, None)
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
                out_axes=(None, state_axes, 0),  # outputs may depend on per-worker state
                axis_size=1,
                axis_name=DEVICE_AXIS,
            )
        carried, opt_state, out = mapped(carried, each(split, opt_state), batch)
        return carried, each(merge, opt_state), jax.tree.map(merge, out)

    return map_devices


def batch_placer(
    mesh: jax.sharding.Mesh, num_workers: int
) -> tuple[tuple[int, ...], Callable[[Any], Any]]:
    """This process's workers, and the function that builds the global batch from their
    share (see :attr:`DataParallel.put_batch`)."""
    groups = mesh.devices.reshape(mesh.shape[DEVICE_AXIS], -1)
    workers_per_group = num_workers // len(groups)
    local_workers = tuple(
        group * workers_per_group + i
        for group, devices in enumerate(groups)
        if any(d.process_index == jax.process_index() for d in devices)
        for i in range(workers_per_group)
    )
    row_of = {worker: row for row, worker in enumerate(local_workers)}
    sharding = NamedSharding(mesh, P(DEVICE_AXIS))

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
                sharding,
                lambda index: x[[row_of[w] for w in range(num_workers)[index[0]]]],
            )

        return jax.tree.map(put, local_batch)

    return local_workers, put_batch
