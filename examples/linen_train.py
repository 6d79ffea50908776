"""Flax Linen: an MLP with BatchNorm and dropout trained by asynchronous workers.

:func:`fsq.parallel.data_parallel` takes a pure loss. Each worker's call gets its own
dropout key (``key=``, a function of the seed, the step and the worker) and the model's
batch statistics (``model_state=``), and returns the statistics its shard gave, which
the step averages over the workers. The optimizer, called per worker, clips the
gradient and sends it with a delay drawn from ``fsq.delays.uniform``; an Adam "server"
steps on whatever arrives::

    python examples/linen_train.py --steps 300 --workers 8 --max-delay 8 --logdir /tmp/run

Simulate several CPU devices with ``JAX_NUM_CPU_DEVICES=8``. The task is synthetic
(labels of a random linear teacher), so the example needs no download.
"""

from __future__ import annotations

import argparse
import contextlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fsq

DIM, CLASSES, HIDDEN = 16, 4, 64


class MLP(nn.Module):
    """One hidden layer with BatchNorm, a ReLU and dropout."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.BatchNorm(use_running_average=not train)(nn.Dense(HIDDEN)(x))
        x = nn.Dropout(0.1, deterministic=not train)(nn.relu(x))
        return nn.Dense(CLASSES)(x)


def make_task(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``size`` Gaussian inputs labelled by the argmax of a fixed random linear teacher."""
    teacher = np.random.default_rng(0).normal(size=(DIM, CLASSES))
    x = np.random.default_rng(seed).normal(size=(size, DIM)).astype(np.float32)
    return x, np.argmax(x @ teacher, axis=-1)


MODEL = MLP()


def loss_fn(params: dict, batch: dict, *, key: jax.Array, model_state: dict):
    """One worker's loss; its accuracy as aux, and its new batch statistics."""
    logits, updates = MODEL.apply(
        {"params": params, **model_state},
        batch["x"],
        train=True,
        rngs={"dropout": key},
        mutable=["batch_stats"],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
    return loss, ({"accuracy": accuracy}, updates)


def per_example(variables: dict, batch: dict) -> dict[str, jax.Array]:
    """Each example's loss and correctness, with the running statistics."""
    logits = MODEL.apply(variables, batch["x"], train=False)
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

    variables = MODEL.init(jax.random.key(args.seed), jnp.zeros((1, DIM)), train=False)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        fsq.flying_squirrel(
            fsq.adam(args.learning_rate),
            num_workers=args.workers,
            delay=fsq.delays.uniform(args.max_delay),
            axis_name=fsq.parallel.AXIS_NAME,  # the axes data_parallel binds
            seed=args.seed,
        ),
    )
    mesh = fsq.parallel.make_mesh(math.gcd(args.workers, jax.device_count()))
    dp = fsq.parallel.data_parallel(
        loss_fn, tx, num_workers=args.workers, mesh=mesh, has_aux=True, seed=args.seed
    )
    state = dp.init(variables["params"], {"batch_stats": variables["batch_stats"]})
    evaluate = fsq.parallel.evaluator(per_example, mesh=mesh)

    def test_metrics(state: fsq.parallel.TrainState) -> dict[str, jax.Array]:
        return evaluate({"params": state.params, **state.model_state}, test)

    x_train, y_train = make_task(args.seed + 1, 4096)
    test = dict(zip(("x", "y"), make_task(args.seed + 2, 1000), strict=True))
    first = test_metrics(state)
    rng = np.random.default_rng(args.seed)
    print(
        f"{args.workers} workers on {mesh.devices.size} device(s), "
        f"uniform delays 0..{args.max_delay}"
    )
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(fsq.MetricWriter(args.logdir)) if args.logdir else None
        for step in range(1, args.steps + 1):
            index = rng.integers(0, len(x_train), (args.workers, args.batch))  # [W, batch]
            state, (losses, aux) = dp.step(state, {"x": x_train[index], "y": y_train[index]})
            metrics = fsq.step_metrics(state.opt_state)
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

    last = test_metrics(state)
    print(f"eval loss {float(first['loss']):.4f} -> {float(last['loss']):.4f}")
    print(f"eval accuracy {float(last['accuracy']):.1%}")


if __name__ == "__main__":
    main()
