r"""How a model is sharded inside a worker, and how the optimizer state follows it.

A mesh for :mod:`fsq.parallel` has the worker axis first (:data:`DEVICE_AXIS`, over which
workers are laid out) and any number of *model axes* after it (e.g. ``"fsdp"``,
``"tensor"``): a worker is a slice of the mesh, its model sharded over the model axes as
its user shards it. Each parameter leaf has a ``PartitionSpec`` over the model axes; every
per-parameter buffer of the optimizer state (ring rows, residuals, momenta, local
parameters, votes, the inner optimizer's moments) is shaped like its parameter with
leading axes, and is sharded like it (:func:`state_specs`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fsq.placement import PLACEMENTS, is_declared, over_model_shards, placement_of

DEVICE_AXIS = "devices"

Specs = Any  # a pytree of PartitionSpec shaped like the parameters


def normalized(spec: P) -> P:
    """``spec`` without trailing ``None`` entries: the form XLA returns, so that a state
    keeps equal shardings from one step to the next (and compiles once)."""
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def model_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
    """The mesh's model axes: every axis but the worker axis."""
    return tuple(name for name in mesh.axis_names if name != DEVICE_AXIS)


def check_mesh(mesh: Any) -> jax.sharding.Mesh:
    """Raises a ``ValueError`` naming ``mesh`` unless its first axis is the worker axis."""
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (fsq.parallel.make_mesh), got {mesh!r}")
    if not mesh.axis_names or mesh.axis_names[0] != DEVICE_AXIS:
        raise ValueError(
            f"mesh must have the worker axis {DEVICE_AXIS!r} first (then any model axes), got "
            f"axes {mesh.axis_names}: build it with fsq.parallel.make_mesh(model_axes=...)"
        )
    return mesh


def _axis_names(entry: Any) -> tuple[str, ...]:
    """The mesh axes one entry of a ``PartitionSpec`` names."""
    if entry is None or entry is P.UNCONSTRAINED:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def fsdp(params: Any, mesh: jax.sharding.Mesh) -> Specs:
    """Each leaf's largest dimension that the model shards divide, sharded over every
    model axis; a leaf with none (or without model axes) replicated.

    The rule :func:`fsq.parallel.data_parallel` uses for parameters that carry no sharding
    of their own: fully sharded data parallelism inside each worker.

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> mesh = fsq.parallel.make_mesh(8, model_axes={"fsdp": 4})
      >>> fsq.parallel.fsdp({"w": jnp.zeros((6, 8)), "b": jnp.zeros(3)}, mesh)
      {'b': P(), 'w': P(None, 'fsdp')}
    """
    axes = model_axes(check_mesh(mesh))
    shards = math.prod(mesh.shape[a] for a in axes)

    def spec(x):
        shape = np.shape(x)
        dims = [d for d in range(len(shape)) if shards > 1 and shape[d] % shards == 0]
        if not dims:
            return P()
        best = max(dims, key=lambda d: (shape[d], -d))  # the largest, then the first
        entries = [None] * len(shape)
        entries[best] = axes[0] if len(axes) == 1 else axes
        return normalized(P(*entries))

    return jax.tree.map(spec, params)


def _path(path: Any) -> str:
    return jax.tree_util.keystr(path) or "the params"


def check_specs(params: Any, specs: Specs, mesh: jax.sharding.Mesh) -> Specs:
    """``specs`` checked against ``params`` and ``mesh``: a ``ValueError`` names the leaf
    whose spec shards the worker axis, names an axis the mesh lacks, has more entries than
    the leaf has dimensions, or does not divide a dimension."""
    leaves, structure = jax.tree_util.tree_flatten_with_path(params)
    try:
        flat_specs = structure.flatten_up_to(specs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"param_specs must have the structure of the params ({e})") from None
    for (path, leaf), spec in zip(leaves, flat_specs, strict=True):
        shape = np.shape(leaf)
        if not isinstance(spec, P):
            raise TypeError(f"param_specs at {_path(path)} must be a PartitionSpec, got {spec!r}")
        if len(spec) > len(shape):
            raise ValueError(
                f"param_specs at {_path(path)}: {spec} has more entries than the parameter's "
                f"dimensions {shape}"
            )
        for dim, entry in enumerate(spec):
            names = _axis_names(entry)
            if DEVICE_AXIS in names:
                raise ValueError(
                    f"parameters must not be sharded over the worker axis {DEVICE_AXIS!r}: "
                    f"{_path(path)} has {spec}; workers hold whole copies of the model, "
                    f"sharded over the model axes {model_axes(mesh)} only"
                )
            unknown = [n for n in names if n not in mesh.axis_names]
            if unknown:
                raise ValueError(
                    f"param_specs at {_path(path)} names {unknown}, not axes of the mesh "
                    f"{mesh.axis_names}"
                )
            shards = math.prod(mesh.shape[n] for n in names)
            if shape[dim] % shards:
                raise ValueError(
                    f"the sharding {spec} of {_path(path)} does not divide its dimension "
                    f"{dim} of size {shape[dim]} into {shards} shards: fsq never pads a "
                    "parameter; choose a spec whose shards divide it"
                )
    return specs


def param_specs(params: Any, given: Specs | Callable | None, mesh: jax.sharding.Mesh) -> Specs:
    """The parameters' specs: ``given`` (a tree of specs, or a rule ``params -> specs``);
    else each leaf's own ``NamedSharding`` over ``mesh``'s axes, or :func:`fsdp`'s."""
    if callable(given):
        specs = given(params)
    elif given is not None:
        specs = given
    else:
        rule = fsdp(params, mesh)

        def own(x, default):
            sharding = getattr(x, "sharding", None)
            if isinstance(sharding, NamedSharding) and set(sharding.mesh.axis_names) <= set(
                mesh.axis_names
            ):
                return sharding.spec
            return default

        specs = jax.tree.map(own, params, rule)
    return jax.tree.map(normalized, check_specs(params, specs, mesh))


def _suffix(spec: P, shape: tuple[int, ...], like: tuple[int, ...]) -> P | None:
    """``spec`` of a parameter shaped ``like``, for a buffer shaped ``shape`` that ends
    with ``like`` (``None`` if it does not)."""
    lead = len(shape) - len(like)
    if lead < 0 or tuple(shape[lead:]) != tuple(like):
        return None
    return normalized(P(*([None] * lead), *spec))


def state_specs(state: Any, params: Any, specs: Specs) -> Any:
    """The spec of every leaf of ``state`` (shapes), sharded like the parameters.

    A subtree with the parameters' structure (an inner optimizer's moments, a ring's
    channels, a residual) gives each leaf that ends with its parameter's shape that
    parameter's spec on those dimensions (leading axes unsharded); every other leaf is
    unsharded over the model axes.
    """
    flat_params, structure = jax.tree.flatten(params)
    flat_specs = structure.flatten_up_to(specs)

    def like_params(node):
        try:
            subtrees = structure.flatten_up_to(node)
        except (ValueError, TypeError):
            return None
        return structure.unflatten(
            [
                jax.tree.map(lambda x, p=p, s=s: _suffix(s, np.shape(x), np.shape(p)) or P(), sub)
                for sub, p, s in zip(subtrees, flat_params, flat_specs, strict=True)
            ]
        )

    def walk(node):
        if node is None:
            return None
        matched = like_params(node)
        if matched is not None:
            return matched
        children, treedef = jax.tree.flatten(node, is_leaf=lambda x: x is not node)
        if treedef.num_leaves == 1 and not treedef.children():  # a leaf
            return P()
        return treedef.unflatten([walk(child) for child in children])

    return walk(state)


def with_devices(spec: P) -> P:
    """``spec`` of a part stored per device or per worker (:mod:`fsq.placement`): the
    devices' blocks on axis 0."""
    rest = tuple(spec)[1:] if len(spec) else ()
    return normalized(P(DEVICE_AXIS, *rest))


def placed_specs(
    state: Any, params: Any, specs: Specs, split: bool, model: dict[str, int] | None = None
) -> Any:
    """:func:`state_specs`, with the worker axis on axis 0 of the per-device and per-worker
    parts when ``split`` (more than one worker group), and the last axis of the fields a
    part names in ``over_model_shards`` (:mod:`fsq.placement`) over the ``model`` axes
    (names and sizes) where their shards divide it."""
    leaves = state_specs(state, params, specs)
    axes = tuple(name for name, size in (model or {}).items() if size > 1)
    shards = math.prod((model or {}).values())

    def over_model(x, spec):
        if not axes or not np.ndim(x) or np.shape(x)[-1] % shards:
            return spec
        return normalized(P(*([None] * (np.ndim(x) - 1)), axes))

    def place(node_state, node_specs):
        fields = over_model_shards(node_state)
        if fields:
            node_specs = node_specs._replace(
                **{
                    f: jax.tree.map(
                        over_model,
                        getattr(node_state, f),
                        getattr(node_specs, f),
                        is_leaf=lambda x: isinstance(x, P),
                    )
                    for f in fields
                }
            )
        if split and placement_of(node_state) in PLACEMENTS:
            return jax.tree.map(
                lambda x, s: with_devices(s) if np.size(x) else s,
                node_state,
                node_specs,
                is_leaf=lambda x: isinstance(x, P),
            )
        return node_specs

    return jax.tree.map(place, state, leaves, is_leaf=is_declared)


_PARAMETERS = contextvars.ContextVar("fsq_parameter_specs", default=None)


@contextlib.contextmanager
def parameters(specs: Specs | None) -> Iterator[None]:
    """Within, Flying Squirrel keeps every per-parameter value it computes (gradients,
    messages, rows in flight) sharded like the parameters, whose specs are ``specs``
    (``None``: unconstrained).

    :func:`fsq.parallel.data_parallel` traces its step under it; a loop of your own that
    shards a model inside a ``shard_map`` manual over the worker axis (as the studies'
    trainer does with :func:`fsq.parallel.per_device`) traces its steps under it too, or
    XLA may gather a value it reshapes.

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> mesh = fsq.parallel.make_mesh(8, model_axes={"fsdp": 4})
      >>> specs = fsq.parallel.fsdp({"w": jnp.zeros((4, 8))}, mesh)
      >>> with fsq.parallel.sharded_like(specs):
      ...     pass  # trace the workers' steps here
    """
    token = _PARAMETERS.set(specs)
    try:
        yield
    finally:
        _PARAMETERS.reset(token)


def constrain(tree: Any, leading: int = 0) -> Any:
    """``tree`` (shaped like the parameters, every leaf with ``leading`` leading axes)
    constrained to the parameters' sharding, inside a step of :mod:`fsq.parallel` with
    model axes; unchanged anywhere else (or if it is not shaped like the parameters)."""
    specs = _PARAMETERS.get()
    if specs is None:
        return tree
    structure = jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P))
    try:
        flat = structure.flatten_up_to(tree)
    except (ValueError, TypeError):
        return tree
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))

    def one(x, spec):
        if np.ndim(x) < leading + len(spec):
            return x
        return jax.lax.with_sharding_constraint(x, P(*([None] * leading), *spec))

    return structure.unflatten(
        [
            jax.tree.map(lambda x, s=s: one(x, s), sub)
            for sub, s in zip(flat, spec_leaves, strict=True)
        ]
    )


def typed(x: Any) -> NamedSharding | None:
    """The sharding ``x`` is typed with on a mesh of explicit axes (jax's sharding in
    types: ``jax.make_mesh``'s default), ``None`` anywhere else; a
    ``jax.ShapeDtypeStruct`` gives its own. What a ``jax.ShapeDtypeStruct`` of ``x``
    carries."""
    if isinstance(x, jax.ShapeDtypeStruct):
        sharding = x.sharding
    else:
        try:
            sharding = jax.typeof(x).sharding
        except TypeError:
            return None
    if not isinstance(sharding, NamedSharding) or sharding.mesh.empty:
        return None
    return sharding if jax.sharding.AxisType.Explicit in sharding.mesh.axis_types else None


def explicit_spec(x: Any) -> P | None:
    """The ``PartitionSpec`` of :func:`typed`'s sharding, ``None`` where there is none."""
    sharding = typed(x)
    return None if sharding is None else sharding.spec


def zeros(leading: tuple[int, ...], like: Any, dtype: Any) -> jax.Array:
    """Zeros of ``leading + like.shape`` in ``dtype``, sharded as ``like`` is on its
    trailing dimensions where ``like`` is typed with an explicit sharding (the leading
    ones unsharded): a buffer of a parameter, typed like it."""
    shape = tuple(leading) + tuple(np.shape(like))
    spec = explicit_spec(like)
    if spec is None:
        return jax.numpy.zeros(shape, dtype)
    return jax.numpy.zeros(shape, dtype, out_sharding=P(*([None] * len(leading)), *spec))


def typed_like(x: Any, like: Any, leading: int = 0) -> Any:
    """``x`` resharded as ``like`` is, less ``like``'s first ``leading`` dimensions, where
    ``like`` is typed with an explicit sharding (a value computed replicated, such as a
    mask or a robust rule's reduction, meeting a sharded parameter)."""
    spec = explicit_spec(like)
    if spec is None:
        return x
    spec = normalized(P(*tuple(spec)[leading:]))
    if explicit_spec(x) is not None and normalized(explicit_spec(x)) == spec:
        return x
    return jax.sharding.reshard(x, spec)


def flat(x: Any) -> jax.Array:
    """``x`` flattened; typed with an explicit sharding, gathered first (a flat vector of a
    sharded leaf has no sharding of its own: what needs one, such as a selection among
    the leaf's entries, gathers it anyway)."""
    if explicit_spec(x) is not None:
        x = jax.sharding.reshard(x, P())
    return jax.numpy.ravel(x)
