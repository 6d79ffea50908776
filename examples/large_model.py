"""A GPT-style transformer of 105M parameters, trained by asynchronous worker groups.

Each worker is a *group of devices*, its copy of the model sharded over them: on 8
devices (simulated on a CPU: ``JAX_NUM_CPU_DEVICES=8``), 2 worker groups x 4 model
shards, a mesh with the worker axis ``"devices"`` and a model axis ``"fsdp"``
(:func:`fsq.parallel.make_mesh`). :class:`fsq.nnx.DataParallel` shards every weight's
largest dimension over the group (:func:`fsq.parallel.fsdp`), and every per-parameter
buffer of the optimizer like its weight: Adam's moments, the messages in flight and
their delay-compensation channels, DC-ASGD-a's mean square. The two workers are
asynchronous: Flying Squirrel's defaults, delays uniform in 0..2 steps.

The model is the studies' transformer (token and position embeddings, pre-norm blocks of
attention and a 4x MLP, a linear head; :mod:`experiments.tasks.transformer`) at width 768
and 14 layers, on sequences of a random Markov chain over 4,096 tokens. The script prints
the bytes of state one device holds next to the whole state's, then the training loss::

    JAX_NUM_CPU_DEVICES=8 python examples/large_model.py --steps 3

``--tiny`` trains a 2-layer, width-64 model instead, in seconds.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import numpy as np
import optax
from flax import nnx

import fsq
from experiments.tasks import markov
from experiments.tasks.transformer import Transformer

LARGE = {"vocab": 4096, "length": 64, "width": 768, "heads": 12, "layers": 14}
TINY = {"vocab": 64, "length": 16, "width": 64, "heads": 4, "layers": 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--groups", type=int, default=2, help="worker groups (one worker each)")
    parser.add_argument("--shards", type=int, default=4, help="devices a worker's model spans")
    parser.add_argument("--batch", type=int, default=2, help="sequences per worker and step")
    parser.add_argument("--max-delay", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, in seconds")
    args = parser.parse_args()
    size = TINY if args.tiny else LARGE

    mesh = fsq.parallel.make_mesh(args.groups * args.shards, model_axes={"fsdp": args.shards})
    model = Transformer(
        size["vocab"], size["length"], size["width"], size["heads"], size["layers"],
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    chain = markov.random_chain(size["vocab"], 0.5, 0)

    def loss_fn(model, tokens):
        logits = model(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    workers = args.groups  # one worker per group
    tx = fsq.flying_squirrel(
        fsq.adam(3e-4),
        num_workers=workers,
        delay=fsq.delays.uniform(args.max_delay),
        axis_name=fsq.parallel.AXIS_NAME,
    )
    trainer = fsq.nnx.DataParallel(model, tx, loss_fn, num_workers=workers, mesh=mesh)

    def per_device(tree):
        return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree)) / 2**20

    state = trainer.state
    whole = 4 * num_params / 2**20
    print(
        f"{num_params / 1e6:.1f}M parameters ({whole:.1f} MiB); {workers} workers x "
        f"{args.shards} shards on {mesh.devices.size} devices; a device holds "
        f"{per_device(state.params):.1f} MiB of the parameters "
        f"({whole / per_device(state.params):.0f}x less than a copy) and "
        f"{per_device(state):.1f} MiB of state in all"
    )
    for step in range(args.steps):
        tokens = markov.sample(chain, jax.random.key(step), workers * args.batch, size["length"])
        start = time.perf_counter()
        losses = trainer.step(np.asarray(tokens).reshape(workers, args.batch, -1))
        jax.block_until_ready(losses)
        seconds, delivered = time.perf_counter() - start, int(trainer.metrics()["delivered"])
        print(f"step {step}: loss {float(np.mean(losses)):.4f} ({seconds:.1f} s; {delivered=})")


if __name__ == "__main__":
    main()
