"""MNIST-1D (Greydanus 2020), generated offline, and a Flax Linen MLP trained per worker.

The data set is made locally with ``mnist1d.data.make_dataset`` (its ``get_dataset``
downloads, which this project never does). Training runs ``W`` workers under one
``jax.vmap`` per seed and all seeds under another ``jax.vmap``, the whole run inside one
``jax.lax.scan``: a study of many seeds and configurations compiles once per
configuration and runs at the speed of the hardware.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class Dataset(NamedTuple):
    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@functools.cache
def load(seed: int = 42) -> Dataset:
    """The standard MNIST-1D split (4000 train, 1000 test), generated from ``seed``."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    data = make_dataset(args)
    return Dataset(
        np.asarray(data["x"], np.float32),
        np.asarray(data["y"], np.int32),
        np.asarray(data["x_test"], np.float32),
        np.asarray(data["y_test"], np.int32),
    )


class MLP(nn.Module):
    """The MNIST-1D paper's MLP: 40 -> 100 -> 100 -> 10 with ReLU."""

    hidden: Sequence[int] = (100, 100)
    classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.classes)(x)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, -1) == labels)


class Result(NamedTuple):
    """Per seed: mean train loss of the last 10% of steps, and final test accuracy."""

    train_loss: jax.Array
    test_accuracy: jax.Array
    staleness: jax.Array


def train(
    make_tx: Callable[[jax.Array], optax.GradientTransformation],
    seeds: Sequence[int],
    *,
    steps: int,
    num_workers: int,
    batch_per_worker: int,
    data: Dataset,
    worker_batch_sizes: Sequence[int] | None = None,
) -> Result:
    """Trains the MLP with Flying Squirrel ``make_tx(seed)``, for every seed in one program.

    ``make_tx`` receives the seed as a traced int, so one compilation serves all seeds.
    Worker ``i`` draws ``worker_batch_sizes[i]`` (default ``batch_per_worker``) examples
    per step with replacement from a key of ``(seed, step, worker)``; smaller batches are
    masked to a common shape.
    """
    model = MLP()
    x, y = jnp.asarray(data.x), jnp.asarray(data.y)
    sizes = jnp.asarray(
        worker_batch_sizes if worker_batch_sizes is not None else [batch_per_worker] * num_workers
    )
    width = int(max(worker_batch_sizes or [batch_per_worker]))

    def loss_fn(params, xb, yb, mask):
        losses = optax.softmax_cross_entropy_with_integer_labels(model.apply(params, xb), yb)
        return jnp.sum(losses * mask) / jnp.sum(mask)

    def one_seed(seed):
        tx = make_tx(seed)
        init_key, data_key = jax.random.split(jax.random.key(seed))
        params = model.init(init_key, x[:1])

        def worker(params, state, step):
            index = jax.lax.axis_index("workers")
            batch_key = jax.random.fold_in(jax.random.fold_in(data_key, step), index)
            rows = jax.random.randint(batch_key, (width,), 0, x.shape[0])
            mask = (jnp.arange(width) < sizes[index]).astype(jnp.float32)
            loss, grads = jax.value_and_grad(loss_fn)(params, x[rows], y[rows], mask)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        step_all = jax.vmap(
            worker,
            in_axes=(None, None, None),
            out_axes=(None, None, 0),
            axis_size=num_workers,
            axis_name="workers",
        )
        init = jax.vmap(
            tx.init, in_axes=None, out_axes=None, axis_size=num_workers, axis_name="workers"
        )

        def body(carry, step):
            params, state, losses = step_all(*carry, step)
            return (params, state), (
                losses.mean(),
                state.staleness * state.delivered,
                state.delivered,
            )

        (params, _), (losses, stale, delivered) = jax.lax.scan(
            body, (params, init(params)), jnp.arange(steps)
        )
        tail = max(1, steps // 10)
        logits = model.apply(params, jnp.asarray(data.x_test))
        return Result(
            jnp.mean(losses[-tail:]),
            accuracy(logits, jnp.asarray(data.y_test)),
            jnp.sum(stale) / jnp.maximum(jnp.sum(delivered), 1),
        )

    return jax.jit(jax.vmap(one_seed))(jnp.asarray(seeds, jnp.int32))
