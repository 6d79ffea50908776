"""Flax NNX: a CNN with dropout and BatchNorm trained by asynchronous workers.

:class:`fsq.nnx.DataParallel` lays ``W`` workers out over every device (``shard_map``,
``W / D`` per device); each computes the gradient of its own shard of the batch on its
own copy of the model (its own dropout masks, its own batch statistics, averaged after
the step). The optimizer, called per worker, clips that gradient and sends it with a
delay drawn from ``fsq.delays.uniform``; an Adam "server" steps on whatever arrives. The
evaluation runs sharded over the same devices, and ``--logdir`` writes every step's
metrics as TensorBoard event files and a CSV::

    python examples/nnx_train.py --steps 300 --workers 8 --max-delay 8 --logdir /tmp/run

Simulate several CPU devices with ``JAX_NUM_CPU_DEVICES=8``. The task is synthetic
(8 x 8 images labelled by a random linear teacher), so the example needs no download.
"""

from __future__ import annotations

import argparse
import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import fsq

SIDE, CLASSES, CHANNELS = 8, 4, 8


class CNN(nnx.Module):
    """A 3 x 3 convolution, BatchNorm, ReLU, dropout and a linear read-out."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, CHANNELS, kernel_size=(3, 3), use_bias=False, rngs=rngs)
        self.norm = nnx.BatchNorm(CHANNELS, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.out = nnx.Linear(SIDE * SIDE * CHANNELS, CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.dropout(nnx.relu(self.norm(self.conv(x))))
        return self.out(h.reshape(h.shape[0], -1))


def make_task(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``size`` Gaussian images labelled by the argmax of a fixed random linear teacher."""
    teacher = np.random.default_rng(0).normal(size=(SIDE * SIDE, CLASSES))
    x = np.random.default_rng(seed).normal(size=(size, SIDE, SIDE, 1)).astype(np.float32)
    return x, np.argmax(x.reshape(size, -1) @ teacher, axis=-1)


def loss_fn(model: CNN, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
    """One worker's loss, and its accuracy as aux."""
    logits = model(batch["x"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"])}


def per_example(model: CNN, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Each example's loss and correctness, for the evaluation to average."""
    logits = model(batch["x"])
    return {
        "loss": optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]),
        "accuracy": (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32, help="examples per worker and step")
    parser.add_argument("--max-delay", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--logdir", default=None, help="write per-step metrics here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = CNN(nnx.Rngs(params=args.seed, dropout=args.seed + 1))
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        fsq.flying_squirrel(
            fsq.adam(args.learning_rate),
            num_workers=args.workers,
            delay=fsq.delays.uniform(args.max_delay),
            axis_name=fsq.parallel.AXIS_NAME,  # the axes the trainer binds
            seed=args.seed,
        ),
    )
    # As many devices as divide the number of workers (all of them, usually).
    mesh = fsq.parallel.make_mesh(math.gcd(args.workers, jax.device_count()))
    trainer = fsq.nnx.DataParallel(
        model, tx, loss_fn, num_workers=args.workers, mesh=mesh, has_aux=True, seed=args.seed
    )

    x_train, y_train = make_task(args.seed + 1, 4096)
    test = dict(zip(("x", "y"), make_task(args.seed + 2, 1000), strict=True))
    first = trainer.evaluate(per_example, test)
    rng = np.random.default_rng(args.seed)
    print(
        f"{args.workers} workers on {mesh.devices.size} device(s), "
        f"uniform delays 0..{args.max_delay}"
    )
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(fsq.MetricWriter(args.logdir)) if args.logdir else None
        for step in range(1, args.steps + 1):
            index = rng.integers(0, len(x_train), (args.workers, args.batch))  # [W, batch]
            losses, aux = trainer.step({"x": x_train[index], "y": y_train[index]})
            metrics = trainer.metrics()
            if writer:
                loss, accuracy = losses.mean(), aux["accuracy"].mean()
                writer.write(step, {**metrics, "loss": loss, "accuracy": accuracy})
            if step % args.log_every == 0 or step == args.steps:
                print(
                    f"step {step:5d}  train loss {float(losses.mean()):.4f}  "
                    f"accuracy {float(aux['accuracy'].mean()):.1%}  "
                    f"delivered {int(metrics['delivered'])}  "
                    f"mean staleness {float(metrics['staleness']):.1f}"
                )

    last = trainer.evaluate(per_example, test)
    print(f"eval loss {float(first['loss']):.4f} -> {float(last['loss']):.4f}")
    print(f"eval accuracy {float(last['accuracy']):.1%}")
    if args.logdir:
        print(f"metrics in {args.logdir} (tensorboard --logdir {args.logdir}, metrics.csv)")


if __name__ == "__main__":
    main()
