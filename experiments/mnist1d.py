"""MNIST-1D (Greydanus 2020), generated offline: data, the paper's MLP, the classifier task.

The data set is made locally with ``mnist1d.data.make_dataset`` (its ``get_dataset``
downloads, which this project never does). :func:`classifier` turns any Flax Linen model
into a :class:`experiments.tasks.Task` on it; :func:`train` trains the MLP with a Flying
Squirrel for several seeds in one program (:func:`experiments.training.train`).
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

from experiments import training
from experiments.tasks.base import Task


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


def classifier(
    name: str, model: nn.Module, data: Dataset | None = None, label_sorted: bool = False
) -> Task:
    """Softmax cross-entropy of a Linen ``model`` on MNIST-1D (:func:`load` by default).

    Minibatches are drawn uniformly with replacement from the 4000 training examples; the
    metrics are on the 1000 test examples. With ``label_sorted``, the training set is
    sorted by label and cut into ``num_workers`` contiguous shards, one per worker (so
    with 8 workers each sees 1-2 classes), the classic non-i.i.d. split.
    """
    data = load() if data is None else data
    x, y = jnp.asarray(data.x), jnp.asarray(data.y)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)

    def init(key):
        return model.init(key, x[:1])

    def sample(key, size):
        rows = jax.random.randint(key, (size,), 0, x.shape[0])
        return x[rows], y[rows]

    by_label = jnp.argsort(y, stable=True)

    def sample_shard(key, size, worker, num_workers):
        start = worker * x.shape[0] // num_workers
        stop = (worker + 1) * x.shape[0] // num_workers
        rows = by_label[jax.random.randint(key, (size,), start, stop)]
        return x[rows], y[rows]

    def loss(params, batch):
        inputs, labels = batch
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, inputs), labels)

    def evaluate(params):
        logits = model.apply(params, x_test)
        return {
            "test_loss": cross_entropy(logits, y_test),
            "test_accuracy": accuracy(logits, y_test),
        }

    return Task(
        name,
        init,
        loss,
        sample,
        evaluate,
        "test_accuracy",
        sample_shard=sample_shard if label_sorted else None,
    )


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
    outcome = training.train(
        classifier("mlp", MLP(), data),
        lambda hyperparameters, seed: make_tx(seed),
        grid={},
        seeds=seeds,
        steps=steps,
        num_workers=num_workers,
        batch_size=batch_per_worker,
        worker_batch_sizes=worker_batch_sizes,
    )
    tail = max(1, steps // 10)
    return Result(
        outcome.losses[..., -tail:].mean(-1),
        outcome.metrics["test_accuracy"],
        outcome.staleness,
    )
