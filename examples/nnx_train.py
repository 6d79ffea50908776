"""Flax NNX: an MLP trained by asynchronous workers with Flying Squirrel.

The model is an ``nnx.Module``. Its parameters are split off as a pytree so that
:func:`fsq.parallel.data_parallel` can lay the workers out over every device
(``shard_map``, ``W / D`` workers per device), each worker computing the gradient of its
own shard of the batch. The optimizer, called per worker, clips that gradient and sends
it with a delay drawn from ``fsq.delays.uniform``; an Adam "server" steps on whatever
arrives::

    python examples/nnx_train.py --steps 300 --workers 8 --max-delay 8

Simulate several CPU devices with ``JAX_NUM_CPU_DEVICES=8``. The task is synthetic
(labels of a random linear teacher), so the example needs no download.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import fsq

DIM, CLASSES, HIDDEN = 16, 4, 64


class MLP(nnx.Module):
    """One hidden layer with a ReLU."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(DIM, HIDDEN, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nnx.relu(self.hidden(x)))


def make_task(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``size`` Gaussian inputs labelled by the argmax of a fixed random linear teacher."""
    teacher = np.random.default_rng(0).normal(size=(DIM, CLASSES))
    x = np.random.default_rng(seed).normal(size=(size, DIM)).astype(np.float32)
    return x, np.argmax(x @ teacher, axis=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32, help="examples per worker and step")
    parser.add_argument("--max-delay", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = MLP(nnx.Rngs(args.seed))
    graphdef, params = nnx.split(model)

    def loss_fn(params: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
        logits = nnx.merge(graphdef, params)(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

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
    # As many devices as divide the number of workers (all of them, usually).
    mesh = fsq.parallel.make_mesh(math.gcd(args.workers, jax.device_count()))
    dp = fsq.parallel.data_parallel(loss_fn, tx, num_workers=args.workers, mesh=mesh)
    state = dp.init(params)

    x_train, y_train = make_task(args.seed + 1, 4096)
    x_test, y_test = make_task(args.seed + 2, 1024)
    evaluate = jax.jit(lambda params: loss_fn(params, {"x": x_test, "y": y_test}))
    first_loss = float(evaluate(state.params))
    rng = np.random.default_rng(args.seed)
    devices = mesh.devices.size
    print(f"{args.workers} workers on {devices} device(s), uniform delays 0..{args.max_delay}")
    for step in range(1, args.steps + 1):
        index = rng.integers(0, len(x_train), (args.workers, args.batch))  # [W, batch]
        state, losses = dp.step(state, {"x": x_train[index], "y": y_train[index]})
        if step % args.log_every == 0 or step == args.steps:
            delivered = int(optax.tree.get(state.opt_state, "delivered"))
            staleness = float(optax.tree.get(state.opt_state, "staleness"))
            print(
                f"step {step:5d}  train loss {float(losses.mean()):.4f}  "
                f"delivered {delivered}  mean staleness {staleness:.1f}"
            )

    nnx.update(model, state.params)  # the trained parameters back into the module
    accuracy = float(jnp.mean(jnp.argmax(model(x_test), axis=-1) == y_test))
    print(f"eval loss {first_loss:.4f} -> {float(evaluate(state.params)):.4f}")
    print(f"eval accuracy {accuracy:.1%}")


if __name__ == "__main__":
    main()
