"""The training loop of every study: runs x workers x steps in one compiled program.

A study compares many runs (a grid of hyperparameters x seeds) of one configuration.
Here they are all one program, laid out by :mod:`fsq.parallel`: once per device
(:func:`fsq.parallel.per_device`), ``jax.vmap`` over runs, ``jax.lax.scan`` over steps,
and per step the device's ``W / D`` workers (:func:`fsq.parallel.vmap_workers`), bound to
the axes of :data:`fsq.parallel.AXIS_NAME`, so a Flying Squirrel built with
``axis_name=fsq.parallel.AXIS_NAME`` exchanges its rows with one all-reduce per step, as
in a real data-parallel job. It compiles once per configuration and runs at the speed of
the hardware.

Every random choice is a pure function of the run's seed: the initial parameters, and
worker ``i``'s minibatch at step ``t`` from ``fold_in(fold_in(data_key, t), i)``, so a
run gives the same numbers however the workers are laid out on devices.
"""

from __future__ import annotations

import contextvars
import dataclasses
import itertools
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

import fsq
from experiments.tasks.base import Task

Hyperparameters = dict[str, jax.Array]
_SAID: set[tuple[int, int]] = set()  # (W, D) layouts whose unused devices were reported

# Told how many training steps (runs x steps) each finished program ran: the runner's
# progress bar.
STEPS_DONE: contextvars.ContextVar[Callable[[int], object] | None] = contextvars.ContextVar(
    "steps_done", default=None
)
# How Flying Squirrel's delay lines exchange messages: "dense" (an all-reduce) or
# "ordered" (added in worker order: the same records over any split into processes).
EXCHANGE: contextvars.ContextVar[str] = contextvars.ContextVar("exchange", default="dense")
# How many devices each worker's model is sharded over (the runner's --model-shards).
MODEL_SHARDS: contextvars.ContextVar[int] = contextvars.ContextVar("model_shards", default=1)
MakeTx = Callable[[Hyperparameters, jax.Array], optax.GradientTransformation]


class Outcome(NamedTuple):
    """What the runs of one :func:`train` call produced.

    Arrays are indexed ``[*grid, seed]``: one axis per hyperparameter of ``grid`` (in
    order), then the seed.

    Attributes:
      grid: the swept hyperparameters, ``{name: values}``.
      seeds: the seeds.
      losses: ``[*grid, seed, steps]`` mean training loss over the workers at each step
        (at the parameters before that step's update).
      metrics: ``{name: [*grid, seed]}``, the task's ``evaluate`` at the final parameters.
      test_curve: ``[*grid, seed, test_points]`` test loss after each ``steps /
        test_points`` steps, or ``None`` when not asked for.
      staleness: ``[*grid, seed]`` mean staleness of the delivered gradients, in steps.
      num_params: parameters of the model.
      batch_size: examples per worker and step (the largest, with per-worker sizes).
      wall_seconds: wall time of the whole program (compilation included).
    """

    grid: dict[str, tuple[float, ...]]
    seeds: tuple[int, ...]
    losses: np.ndarray
    metrics: dict[str, np.ndarray]
    test_curve: np.ndarray | None
    staleness: np.ndarray
    num_params: int
    batch_size: int
    wall_seconds: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class UniformUpTo(fsq.delays.DelayModel):
    """Delays uniform over ``0 .. bound`` with a traced ``bound <= max_delay``.

    Every run of a program shares the in-flight buffer of ``max_delay`` rows, so runs with
    different delay levels are one program. With ``bound == max_delay`` the delays are
    exactly those of ``fsq.delays.uniform(max_delay)`` (the same draws). It has no
    ``mean_delay`` (it would be traced): a rule that needs one at construction, such as
    ``staleness="delay_adaptive"``, needs a fixed model.
    """

    bound: jax.Array | int = 0

    def __call__(self, key, step, worker):
        del step, worker
        logits = jnp.where(jnp.arange(self.max_delay + 1) <= self.bound, 0.0, -jnp.inf)
        logits = logits.astype(jnp.float32)  # the same draws with x64 enabled
        return jax.random.categorical(key, logits).astype(jnp.int32)


def _device_mean(losses: np.ndarray) -> np.ndarray:
    """The mean over the devices' workers (axis 0); a diverged run's inf stays inf."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.mean(np.asarray(losses), axis=0)


def flying_squirrel(
    inner: optax.GradientTransformation, num_workers: int, seed: jax.Array, **kwargs
) -> optax.GradientTransformationExtraArgs:
    """:func:`fsq.flying_squirrel` :func:`on_trainer` (``kwargs`` may say otherwise)."""
    return fsq.flying_squirrel(inner, num_workers=num_workers, **{**on_trainer(seed), **kwargs})


def on_trainer(seed: jax.Array) -> dict[str, object]:
    """The keywords that put a Flying Squirrel preset on the trainer's worker axes (the
    layout of ``fsq.parallel``), exchanging as the runner says (:data:`EXCHANGE`)."""
    return {"axis_name": fsq.parallel.AXIS_NAME, "seed": seed, "exchange": EXCHANGE.get()}


def train(
    task: Task,
    make_tx: MakeTx,
    *,
    grid: Mapping[str, Sequence[float]],
    seeds: Sequence[int],
    steps: int,
    num_workers: int,
    batch_size: int,
    worker_batch_sizes: Sequence[int] | None = None,
    num_devices: int = 1,
    test_points: int = 0,
    gradient_slots: int | None = None,
) -> Outcome:
    """Trains ``task`` with ``make_tx(hyperparameters, seed)`` at every grid point and seed.

    Args:
      task: the task.
      make_tx: builds the per-worker transformation, a Flying Squirrel over
        :data:`fsq.parallel.AXIS_NAME` (see :func:`flying_squirrel`; over the inner
        ``"workers"`` axis alone works too when one device is used), from the run's
        hyperparameters ``{name: traced scalar}`` and its traced seed, so that one
        compilation serves every run.
      grid: ``{name: values}``; every combination is run (``{}``: one run per seed).
      seeds: the seeds of the runs (initialization, data, delays).
      steps: logical steps (every worker computes one gradient per step).
      num_workers: ``W``.
      batch_size: examples per worker and step.
      worker_batch_sizes: per-worker batch sizes instead (load balancing); smaller batches
        are masked to the largest.
      num_devices: devices to spread the workers over: ``gcd(W, num_devices)`` are used.
      test_points: evaluate the test loss this many times, evenly (``steps`` must be a
        multiple); 0 for only at the end. Every device evaluates every run: worth it for
        small test sets (the quadratic's is closed form).
      gradient_slots: with a clock (workers in time), compute at most this many gradients
        per device and step, of the workers that start a job (see
        :func:`fsq.parallel.workers_step`); the training loss is then the mean over them
        (NaN at a step where nobody starts).

    Returns:
      An :class:`Outcome`.
    """
    shards = MODEL_SHARDS.get()
    if num_devices % shards:
        raise ValueError(f"--model-shards {shards} must divide the devices ({num_devices})")
    groups = math.gcd(num_workers, num_devices // shards)
    model_axes = {"fsdp": shards} if shards > 1 else None
    mesh = fsq.parallel.make_mesh(groups * shards, model_axes=model_axes)
    if mesh.devices.size < num_devices and (num_workers, num_devices) not in _SAID:
        _SAID.add((num_workers, num_devices))
        print(
            f"note: {num_workers} workers run on {mesh.devices.size} of the {num_devices} "
            f"devices (the workers must split evenly over the worker groups used)",
            file=sys.stderr,
        )
    local = num_workers // groups
    # With model shards, each model's parameters (and every buffer shaped like them) are
    # sharded over its group by fsq.parallel.fsdp's rule.
    specs = (
        fsq.parallel.fsdp(jax.eval_shape(task.init, jax.random.key(0)), mesh)
        if model_axes
        else None
    )
    sizes = [batch_size] * num_workers if worker_batch_sizes is None else list(worker_batch_sizes)
    width, sizes = max(sizes), jnp.asarray(sizes)
    names = tuple(grid)

    def mean_loss(params, batch, mask):
        return jnp.sum(task.loss(params, batch) * mask) / jnp.sum(mask)

    def one_run(values, seed):
        tx = make_tx(dict(zip(names, values, strict=True)), seed)
        workers = fsq.parallel.vmap_workers(tx, num_workers=local)
        init_key, data_key = jax.random.split(jax.random.key(seed))
        params = task.init(init_key)
        if model_axes:
            params = jax.lax.with_sharding_constraint(params, specs)
        ids = fsq.parallel.worker_ids(local)

        def loss(params, worker):
            """A worker's loss at a step, on its own minibatch (``worker``: its step and id)."""
            step, index = worker["step"], worker["index"]
            key = jax.random.fold_in(jax.random.fold_in(data_key, step), index)
            mask = (jnp.arange(width) < sizes[index]).astype(jnp.float32)
            if task.sample_shard is None:
                batch = task.sample(key, width)
            else:
                batch = task.sample_shard(key, width, index, num_workers)
            return mean_loss(params, batch, mask)

        def body(carry, step):
            params, state = carry
            worker = {"step": jnp.full(local, step), "index": ids}
            updates, state, losses = fsq.parallel.workers_step(
                loss, workers, params, state, worker, ids=ids, slots=gradient_slots
            )
            # Summed over the assemblies of a state (one per fragment in streaming DiLoCo).
            counts = [v for _, v in optax.tree.get_all_with_path(state, "delivered")]
            ages = [v for _, v in optax.tree.get_all_with_path(state, "staleness")]
            delivered = sum(counts)
            stale = sum(a * c for a, c in zip(ages, counts, strict=True))
            # Workers busy with an earlier job (a clock) computed nothing: NaN losses.
            mean = jnp.nanmean(losses)
            return (optax.apply_updates(params, updates), state), (mean, stale, delivered)

        def chunk(carry, chunk_steps):
            carry, outputs = jax.lax.scan(body, carry, chunk_steps)
            test_loss = task.evaluate(carry[0])["test_loss"] if test_points else jnp.zeros(())
            return carry, (outputs, test_loss)

        chunks = jnp.arange(steps).reshape(max(test_points, 1), -1)
        with fsq.parallel.sharded_like(specs):
            (params, _), ((losses, stale, delivered), test_curve) = jax.lax.scan(
                chunk, (params, workers.init(params)), chunks
            )
        staleness = jnp.sum(stale) / jnp.maximum(jnp.sum(delivered), 1)
        return params, losses.reshape(-1), test_curve, staleness

    @jax.jit
    def program(values, seeds):
        # Every device returns every run; all but the losses (of its own workers) are the
        # same on all devices.
        params, losses, test_curve, staleness = fsq.parallel.per_device(
            jax.vmap(one_run), mesh=mesh
        )(values, seeds)
        params, test_curve, staleness = jax.tree.map(
            lambda x: x[0], (params, test_curve, staleness)
        )
        # One run at a time: a test set evaluated by every run at once can take gigabytes.
        # The devices' losses are averaged on the host, in one order whatever the layout
        # (a mean across processes sums in the collective's order).
        return losses, jax.lax.map(task.evaluate, params), test_curve, staleness

    points = list(itertools.product(*grid.values(), seeds))
    values = [jnp.asarray([p[i] for p in points]) for i in range(len(names))]
    run_seeds = jnp.asarray([p[-1] for p in points], jnp.int32)
    start = time.perf_counter()
    if test_points and steps % test_points:
        raise ValueError(f"steps={steps} must be a multiple of test_points={test_points}")
    outputs = program(values, run_seeds)
    if jax.process_count() > 1:  # every process reads every output, all devices' parts
        outputs = multihost_utils.process_allgather(outputs, tiled=True)
    losses, metrics, test_curve, staleness = jax.device_get(outputs)
    wall = time.perf_counter() - start
    if (done := STEPS_DONE.get()) is not None:
        done(len(points) * steps)
    shape = (*(len(v) for v in grid.values()), len(seeds))
    params = jax.eval_shape(task.init, jax.random.key(0))
    return Outcome(
        {name: tuple(v) for name, v in grid.items()},
        tuple(seeds),
        _device_mean(losses).reshape(*shape, steps),
        {name: np.asarray(v).reshape(shape) for name, v in metrics.items()},
        np.asarray(test_curve).reshape(*shape, -1) if test_points else None,
        np.asarray(staleness).reshape(shape),
        sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
        width,
        wall,
    )
