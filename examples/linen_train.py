"""Flax Linen: a ``TrainState`` loop with Flying Squirrel, workers as a ``jax.vmap``.

The workers are the members of a ``jax.vmap(..., axis_name="workers")`` on one device:
each computes the gradient of its own shard and calls ``TrainState.apply_gradients``,
whose optimizer clips the gradient and sends it with a delay drawn from
``fsq.delays.uniform``. What comes out (parameters, optimizer state) is the same on
every worker, so the vmap returns one ``TrainState``::

    python examples/linen_train.py --steps 300 --workers 8 --max-delay 8

The task is synthetic (labels of a random linear teacher), so the example needs no
download. For workers spread over devices, see ``examples/nnx_train.py``.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

import fsq

DIM, CLASSES, HIDDEN = 16, 4, 64


class MLP(nn.Module):
    """One hidden layer with a ReLU."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(CLASSES)(nn.relu(nn.Dense(HIDDEN)(x)))


def make_task(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``size`` Gaussian inputs labelled by the argmax of a fixed random linear teacher."""
    teacher = np.random.default_rng(0).normal(size=(DIM, CLASSES))
    x = np.random.default_rng(seed).normal(size=(size, DIM)).astype(np.float32)
    return x, np.argmax(x @ teacher, axis=-1)


def loss_fn(params: dict, state: TrainState, batch: dict[str, jax.Array]) -> jax.Array:
    logits = state.apply_fn({"params": params}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


@jax.jit
def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, jax.Array]:
    """One logical step of every worker; ``batch`` leaves are ``[workers, batch, ...]``."""

    def worker(shard: dict[str, jax.Array]) -> tuple[TrainState, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(state.params, state, shard)
        return state.apply_gradients(grads=grads), loss

    # out_axes=None: the new state is identical on all workers, so it is returned once.
    return jax.vmap(worker, axis_name="workers", out_axes=(None, 0))(batch)


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

    model = MLP()
    params = model.init(jax.random.key(args.seed), jnp.zeros((1, DIM)))["params"]
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        fsq.flying_squirrel(
            fsq.adam(args.learning_rate),
            num_workers=args.workers,
            delay=fsq.delays.uniform(args.max_delay),
            axis_name="workers",  # the vmap axis of train_step
            seed=args.seed,
        ),
    )
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    x_train, y_train = make_task(args.seed + 1, 4096)
    x_test, y_test = make_task(args.seed + 2, 1024)
    evaluate = jax.jit(lambda state: loss_fn(state.params, state, {"x": x_test, "y": y_test}))
    first_loss = float(evaluate(state))
    rng = np.random.default_rng(args.seed)
    print(f"{args.workers} workers (vmap), uniform delays 0..{args.max_delay}")
    for step in range(1, args.steps + 1):
        index = rng.integers(0, len(x_train), (args.workers, args.batch))  # [W, batch]
        state, losses = train_step(state, {"x": x_train[index], "y": y_train[index]})
        if step % args.log_every == 0 or step == args.steps:
            delivered = int(optax.tree.get(state.opt_state, "delivered"))
            staleness = float(optax.tree.get(state.opt_state, "staleness"))
            print(
                f"step {step:5d}  train loss {float(losses.mean()):.4f}  "
                f"delivered {delivered}  mean staleness {staleness:.1f}"
            )

    logits = state.apply_fn({"params": state.params}, x_test)
    accuracy = float(jnp.mean(jnp.argmax(logits, axis=-1) == y_test))
    print(f"eval loss {first_loss:.4f} -> {float(evaluate(state)):.4f}")
    print(f"eval accuracy {accuracy:.1%}")


if __name__ == "__main__":
    main()
