"""The mapped axes that carry the logical workers, and which of them cross devices.

A worker axis is either *device-spanning* (a manual mesh axis: ``shard_map`` or ``pmap``),
where exchanging data costs a real collective, or *local* (a ``vmap`` axis), where every
worker of the axis lives on the same device and gathering their values is free: under
``vmap``, ``all_gather`` over the mapped axis just hands the batch to every member.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class WorkerAxes(NamedTuple):
    """The worker axes of a mapped context, outermost first.

    Attributes:
      names: every worker axis; the global worker id is their mixed-radix index.
      device: the axes among ``names`` that span devices (mesh axes).
      local: the axes among ``names`` that stay on one device (vmap axes).
    """

    names: tuple[str, ...]
    device: tuple[str, ...]
    local: tuple[str, ...]


def normalize(axis_name: str | tuple[str, ...]) -> tuple[str, ...]:
    """Checks ``axis_name`` (a name or a non-empty tuple of distinct names)."""
    names = (axis_name,) if isinstance(axis_name, str) else axis_name
    if (
        not isinstance(names, tuple)
        or not names
        or not all(isinstance(n, str) for n in names)
        or len(set(names)) != len(names)
    ):
        raise TypeError(
            f"axis_name must be a str or a non-empty tuple of distinct str, got {axis_name!r}"
        )
    return names


def is_bound(names: tuple[str, ...]) -> bool:
    """Whether every axis of ``names`` is bound where this is traced."""
    try:
        for name in names:
            lax.axis_size(name)
    except NameError:
        return False
    return True


def resolve(names: tuple[str, ...], num_workers: int | None) -> WorkerAxes:
    """Splits ``names`` into device and local axes; checks they are bound and hold W workers
    (``num_workers``; ``None``: any number, when the caller maps a subset of them).

    Must be called while tracing inside the mapped context.
    """
    try:
        sizes = [lax.axis_size(n) for n in names]
    except NameError as e:
        raise ValueError(
            f"axis_name {names} is not bound: Flying Squirrel runs per worker, inside "
            f"jax.vmap, jax.shard_map or jax.pmap over those axes. Train with "
            f"fsq.parallel.data_parallel, or for a Flax NNX model fsq.nnx.DataParallel; "
            f"an nnx.Optimizer's update must run inside nnx.vmap(..., axis_name=...) ({e})"
        ) from None
    if num_workers is not None and math.prod(sizes) != num_workers:
        raise ValueError(
            f"num_workers={num_workers} but axis_name {names} spans {math.prod(sizes)} "
            f"workers (axis sizes {sizes}); under fsq.parallel use "
            f"axis_name=fsq.parallel.AXIS_NAME"
        )
    mesh_axes = set(jax.sharding.get_abstract_mesh().manual_axes)
    device = tuple(n for n in names if n in mesh_axes)
    local = tuple(n for n in names if n not in mesh_axes)
    return WorkerAxes(names, device, local)


def worker_index(names: tuple[str, ...]) -> jax.Array:
    """The global id of this worker: the mixed-radix index over ``names``, outermost first."""
    index = lax.axis_index(names[0])
    for name in names[1:]:
        index = index * lax.axis_size(name) + lax.axis_index(name)
    return index


def stack(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """``x`` of every worker over ``axes`` (outermost first), stacked on a new axis 0 in
    worker order. Free over vmap axes; an all-gather over mesh axes."""
    x = x[None]
    for axis in reversed(axes):
        x = lax.all_gather(x, axis, tiled=True)
    return x


def local_index(local: tuple[str, ...]) -> jax.Array:
    """This worker's index among the workers of its device (0 if there are no local axes)."""
    return worker_index(local) if local else jnp.int32(0)


def local_count(local: tuple[str, ...]) -> int:
    """How many workers share this device."""
    return math.prod(lax.axis_size(n) for n in local)


def model_shards() -> int:
    """How many devices a worker's model is sharded over here (:func:`model_axes`)."""
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[name] for name in model_axes())


def model_axes() -> tuple[str, ...]:
    """The axes that shard the model here: inside a ``shard_map`` manual over the worker
    axes only (:mod:`fsq.parallel` with model axes), the mesh's other axes of more than one
    device; ``()`` anywhere else."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not mesh.manual_axes:
        return ()
    manual = set(mesh.manual_axes)
    return tuple(
        name
        for name, size in zip(mesh.axis_names, mesh.axis_sizes, strict=True)
        if name not in manual and size > 1
    )
