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

**A worker as a group of devices.** A mesh may have *model axes* after the worker axis
(:func:`make_mesh` ``(model_axes=...)``): each worker group is then a slice of the mesh,
its model sharded over those axes (``param_specs``, the parameters' own shardings, or
:func:`fsdp`'s rule), the ``shard_map`` manual over the worker axis only, and every
per-parameter buffer of the optimizer state sharded like its parameter (the
documentation's "Large models" page).

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

from fsq import _checks, _sharding
from fsq._layout import (
    DEVICE_AXIS,
    batch_placer,
    device_map,
    make_mesh,
    per_device,
    worker_ids,
)
from fsq._local import (
    WORKER_AXIS,
    map_placed,
    starting_workers,
    sums_workers,
    vmap_workers,
    workers_step,
)
from fsq._sharding import check_mesh, fsdp, model_axes, placed_specs
from fsq._sharding import parameters as sharded_like
from fsq.evaluation import evaluator

AXIS_NAME = (DEVICE_AXIS, WORKER_AXIS)
BACKENDS = ("vmap", "shard_map", "pmap")

LossFn = Callable[[optax.Params, Any], jax.Array]


class TrainState(NamedTuple):
    """What a data-parallel run carries from step to step.

    Attributes:
      params: the parameters (replicated).
      opt_state: the optimizer state (per-device parts concatenated on axis 0).
      model_state: the model's other state (replicated), such as BatchNorm statistics, or
        ``None``.
      step: how many steps were taken (int32), from which each worker's random key is
        drawn.
    """

    params: optax.Params
    opt_state: optax.OptState
    model_state: Any = None
    step: Any = 0


class DataParallel(NamedTuple):
    """A data-parallel training step and how it is laid out.

    Attributes:
      init: ``(params, model_state=None) -> TrainState``, placed on the devices.
      step: jitted ``(TrainState, batch) -> (TrainState, losses)``; every leaf of ``batch``
        has a leading axis of ``num_workers`` (one shard per worker) and ``losses`` is the
        ``[num_workers]`` vector of each worker's loss before the update; with
        ``has_aux``, ``(TrainState, (losses, aux))``, aux leaves ``[num_workers, ...]``
        (NaN, or 0 for integers, for workers idle at this step). The input state
        is donated (its buffers are reused in place, so the in-flight buffer is never
        copied; with ``donate_params=False`` only its ``opt_state``); keep using the
        returned state.
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
      abstract: ``(params, model_state=None) -> TrainState`` of ``jax.ShapeDtypeStruct``
        leaves, with the shapes and shardings ``init`` would give (``params`` may be
        abstract too): to compile the step ahead of time without allocating anything,
        ``dp.step.lower(dp.abstract(params), batch).compile()``, and read its memory.
    """

    init: Callable[..., TrainState]
    step: Callable[[TrainState, Any], tuple[TrainState, Any]]
    num_workers: int
    mesh: jax.sharding.Mesh
    backend: str
    local_workers: tuple[int, ...]
    put_batch: Callable[[Any], Any]
    abstract: Callable[..., TrainState]


def data_parallel(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    num_workers: int,
    backend: str = "shard_map",
    mesh: jax.sharding.Mesh | None = None,
    param_specs: Any = None,
    gradient_slots: int | None = None,
    has_aux: bool = False,
    seed: int | None = None,
    donate_params: bool = True,
) -> DataParallel:
    r"""Builds the jitted data-parallel train step of ``loss_fn`` with ``tx``, per worker.

    ``loss_fn(params, worker_batch)`` is called per worker, with keyword arguments for
    what the run holds:

    - ``key=``: with ``seed``, the worker's key at this step (for dropout), a pure function
      of the seed, the step and the *logical* worker :math:`i`, whatever the layout:

      .. math:: k_{t,i} = \operatorname{fold\_in}(\operatorname{fold\_in}(
         \operatorname{key}(\text{seed}), t), i)

    - ``model_state=``: when ``init`` was given a model state (BatchNorm statistics, any
      mutable collection); ``loss_fn`` then returns its new value in second place, as
      ``(loss, new_model_state)`` or with ``has_aux`` ``(loss, (aux, new_model_state))``.
      The step averages the workers' new values over the workers that computed a gradient
      at this step (all of them but those a clock keeps busy); every worker then starts
      the next step from the same, replicated, state. Integer leaves are averaged and
      rounded down.

    Args:
      loss_fn: ``(params, worker_batch, **kwargs) -> loss`` for one worker's shard (or
        ``(loss, aux)`` with ``has_aux``).
      tx: the optimizer, called per worker; a Flying Squirrel transform must be built with
        ``axis_name=fsq.parallel.AXIS_NAME`` and the same ``num_workers``.
      num_workers: ``W``, a multiple of the number of devices.
      backend: ``"vmap"`` (one device), ``"shard_map"`` or ``"pmap"``.
      mesh: for ``shard_map`` / ``pmap``, a mesh from :func:`make_mesh` (default: all
        devices); ignored by ``vmap``. With model axes (``shard_map`` only) a worker group
        is a slice of the mesh, its model sharded over those axes by ``param_specs``.
      param_specs: with model axes, how each parameter leaf is sharded over them: a tree of
        ``PartitionSpec`` shaped like the parameters, or a rule ``params -> specs`` (e.g.
        :func:`fsdp`); ``None``: each leaf's own ``NamedSharding``, if it has one on this
        mesh's axes, else :func:`fsdp`'s. Every per-parameter buffer of the optimizer
        state is sharded like its parameter.
      gradient_slots: with a clock in ``tx`` (:func:`fsq.transforms.clock`), how many
        gradients per device and step to compute at most, for the workers that start a
        job (more are computed when more start, a synchronous round for one); ``None``:
        every local worker's (a worker alone on its device is skipped when busy anyway).
        Idle workers report a NaN loss.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; the step returns each worker's aux
        stacked ``[num_workers, ...]``.
      seed: when given, ``loss_fn`` receives each worker's key as ``key=``.
      donate_params: whether the step donates the parameters' and the model state's
        buffers too; ``False`` keeps them valid for whatever else holds them (an NNX
        module, :class:`fsq.nnx.DataParallel`), at the cost of fresh buffers per step.

    Returns:
      A :class:`DataParallel` with ``init`` and ``step``.
    """
    num_workers = _checks.integer("num_workers", num_workers, low=1)
    if gradient_slots is not None:
        gradient_slots = _checks.integer("gradient_slots", gradient_slots, low=1)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "vmap":
        mesh = make_mesh(1)
    elif mesh is None:
        mesh = make_mesh()
    sharded = bool(model_axes(check_mesh(mesh)))
    if sharded and backend != "shard_map":
        raise ValueError(
            f"a mesh with model axes {model_axes(mesh)} needs backend='shard_map', got "
            f"backend={backend!r}"
        )
    num_devices = mesh.shape[DEVICE_AXIS]  # worker groups: devices of a 1-D mesh
    if num_workers % num_devices:
        raise ValueError(
            f"num_workers={num_workers} must be a multiple of the number of worker groups "
            f"({num_devices} on mesh axis {DEVICE_AXIS!r}); fsq never pads workers silently"
        )
    workers_per_device = num_workers // num_devices

    if seed is not None:
        seed = _checks.integer("seed", seed, low=0)
    local = vmap_workers(tx, num_workers=workers_per_device)

    def device_step(carried, opt_state, batch):
        params, model_state, step = carried
        # (The vmap backend's device axis is a formality of size 1: device 0's workers.)
        ids = jnp.arange(num_workers) if backend == "vmap" else worker_ids(workers_per_device)
        stateful = model_state is not None

        def worker_loss(params, worker):
            batch, worker_id = worker
            kwargs = {} if model_state is None else {"model_state": model_state}
            if seed is not None:
                key = jax.random.fold_in(jax.random.key(seed), step)
                kwargs["key"] = jax.random.fold_in(key, worker_id)
            return loss_fn(params, batch, **kwargs)

        active = starting_workers(opt_state, ids)
        updates, opt_state, out = workers_step(
            worker_loss,
            local,
            params,
            opt_state,
            (batch, ids),
            ids=ids,
            slots=gradient_slots,
            has_aux=has_aux or stateful,
        )
        if stateful:
            losses, extra = out
            aux, new_state = split_model_state(extra, model_state, has_aux)
            model_state = average_over_workers(new_state, model_state, active)
            out = (losses, aux) if has_aux else losses
        return (optax.apply_updates(params, updates), model_state), opt_state, out

    map_devices = device_map(device_step, backend, mesh)

    def step(state: TrainState, batch: Any) -> tuple[TrainState, Any]:
        for x in jax.tree.leaves(batch):
            if x.shape[:1] != (num_workers,):
                raise ValueError(
                    f"batch leaves must have a leading axis of num_workers={num_workers}, "
                    f"got shape {x.shape}"
                )
        carried = (state.params, state.model_state, state.step)
        with sharded_like(specs_of(state.params) if sharded else None):
            (params, model_state), opt_state, out = map_devices(carried, state.opt_state, batch)
        # The state keeps the shardings ``init`` gave it, so the step compiles once.
        opt_state = jax.lax.with_sharding_constraint(opt_state, shardings(opt_state, params))
        params = jax.lax.with_sharding_constraint(params, param_shardings(params))
        return TrainState(params, opt_state, model_state, state.step + 1), out

    def init_blocks(params):
        """Runs ``tx.init`` in the mapped context of the step, stacking the devices' states."""
        if backend != "pmap":
            return per_device(local.init, mesh=mesh)(params)
        return jax.pmap(  # pmap needs a mapped argument: the device ids
            lambda _, params: local.init(params),
            axis_name=DEVICE_AXIS,
            in_axes=(0, None),
            devices=list(mesh.devices.flat),
        )(jnp.arange(num_devices), params)

    def init_state(params, model_state):
        # The parameters as the model is sharded, before the transform sees them.
        params = jax.lax.with_sharding_constraint(params, param_shardings(params))
        # Per-device and per-worker parts keep every device's block (concatenated on axis
        # 0); the rest is identical on all devices, so device 0's copy is kept.
        opt_state = map_placed(
            init_blocks(params), lambda x: x.reshape((-1,) + x.shape[2:]), lambda x: x[0]
        )
        # Copies: the step donates its state, which must not delete the caller's arrays.
        params, model_state = jax.tree.map(jnp.copy, (params, model_state))
        return TrainState(params, opt_state, model_state, jnp.int32(0))

    whole = NamedSharding(mesh, P())
    resolved = {}  # the parameters' specs, resolved by init

    def specs_of(params):
        if not sharded:
            return jax.tree.map(lambda _: P(), params)
        if "params" not in resolved:  # a state made elsewhere: the rule, on its shapes
            shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
            resolved["params"] = _sharding.param_specs(shapes, param_specs, mesh)
        return resolved["params"]

    def param_shardings(params):
        return jax.tree.map(lambda s: NamedSharding(mesh, s), specs_of(params))

    def shardings(opt_state, params):
        # Over one device, or for an empty block, XLA gives the replicated sharding: so do
        # we, or the step would see other shardings than init's and compile twice.
        specs = placed_specs(
            opt_state,
            params,
            specs_of(params),
            split=num_devices > 1,
            model={name: mesh.shape[name] for name in model_axes(mesh)},
        )
        return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)

    def placed(params, model_state):
        """The shapes and shardings of the state ``init`` makes."""
        if sharded:
            resolved["params"] = _sharding.param_specs(params, param_specs, mesh)
        shapes = jax.eval_shape(init_state, params, model_state)
        out = jax.tree.map(lambda _: whole, shapes)._replace(
            params=param_shardings(shapes.params),
            opt_state=shardings(shapes.opt_state, shapes.params),
        )
        return shapes, out

    def init(params: optax.Params, model_state: Any = None) -> TrainState:
        _, out = placed(params, model_state)
        return jax.jit(init_state, out_shardings=out)(params, model_state)

    def abstract(params: optax.Params, model_state: Any = None) -> TrainState:
        shapes, out = placed(params, model_state)
        return jax.tree.map(
            lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
            shapes,
            out,
        )

    local_workers, put_batch = batch_placer(mesh, num_workers)
    if donate_params:
        jitted = jax.jit(step, donate_argnums=0)
    else:
        by_parts = jax.jit(
            lambda opt_state, rest, batch: step(TrainState(rest[0], opt_state, *rest[1:]), batch),
            donate_argnums=0,
        )

        def jitted(state: TrainState, batch: Any) -> tuple[TrainState, Any]:
            return by_parts(state.opt_state, (state.params, *state[2:]), batch)

    return DataParallel(
        init,
        jitted,
        num_workers,
        mesh,
        backend,
        local_workers,
        put_batch,
        abstract,
    )


def split_model_state(extra: Any, old: Any, has_aux: bool) -> tuple[Any, Any]:
    """``(aux, new_model_state)`` from what ``loss_fn`` returned besides its loss; raises a
    ``ValueError`` naming the expected form unless the new state (leaves ``[L, ...]``) is
    shaped like ``old``."""
    form = "(loss, (aux, new_model_state))" if has_aux else "(loss, new_model_state)"
    pair = isinstance(extra, tuple) and len(extra) == 2
    aux, new = extra if has_aux and pair else (None, extra)
    shapes = [x.shape[1:] for x in jax.tree.leaves(new)]
    if (
        (has_aux and not pair)
        or jax.tree.structure(new) != jax.tree.structure(old)
        or shapes != [np.shape(x) for x in jax.tree.leaves(old)]
    ):
        raise ValueError(
            f"with a model_state, loss_fn must return {form}, the new state shaped like the "
            f"one given to init ({jax.tree.structure(old)}); got {jax.tree.structure(extra)}"
        )
    return aux, new


def average_over_workers(new: Any, old: Any, active: jax.Array | None) -> Any:
    """The mean of the workers' ``new`` values (leaves ``[L, ...]`` on each device) over
    the workers that are ``active`` (``None``: all), across every device; ``old`` where
    none is. Called inside the step's mapped context."""
    weight = jnp.ones(jax.tree.leaves(new)[0].shape[0]) if active is None else active
    weight = weight.astype(jnp.float32)
    count = jax.lax.psum(jnp.sum(weight), DEVICE_AXIS)

    def mean(x, before):
        total = jax.lax.psum(jnp.tensordot(weight, x.astype(jnp.float32), axes=1), DEVICE_AXIS)
        value = (total / jnp.maximum(count, 1)).astype(before.dtype)
        return jnp.where(count > 0, value, before)

    return jax.tree.map(mean, new, old)


__all__ = [
    "AXIS_NAME",
    "BACKENDS",
    "DEVICE_AXIS",
    "WORKER_AXIS",
    "DataParallel",
    "TrainState",
    "data_parallel",
    "evaluator",
    "fsdp",
    "make_mesh",
    "model_axes",
    "sharded_like",
    "per_device",
    "sums_workers",
    "vmap_workers",
    "worker_ids",
    "workers_step",
]
