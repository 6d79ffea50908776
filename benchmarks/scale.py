"""A GPT-style step of a billion parameters, compiled ahead of time for 8 devices.

The model is the studies' transformer (:class:`experiments.tasks.transformer.Transformer`:
token and position embeddings, pre-norm blocks of attention and a 4x MLP, a linear head)
at width 2048, 20 layers, 16 heads, a vocabulary of 32,768 and 256 tokens a sequence:
1.15 billion parameters. Its train step (:func:`fsq.parallel.data_parallel`, Flying
Squirrel's defaults with uniform delays, Adam) is lowered with abstract shapes and
compiled (``jax.jit(...).lower(...).compile()``): nothing is allocated, and XLA's
``memory_analysis`` gives each device's bytes (arguments, the state and a batch; and
temporaries). For each layout and storage of the messages in flight, the largest delay
whose step fits a 16 GiB device is found from the state formula of
:mod:`benchmarks.memory` and the temporaries of the compiled step (which do not depend on
the delay), and checked by compiling it; one more delay adds a row of the ring.

Run: ``python -m benchmarks.memory --scale`` (a few minutes a compile on 2 CPU cores).
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

VOCAB, LENGTH, WIDTH, HEADS, LAYERS = 32768, 256, 2048, 16, 20
DEVICE_BYTES = 16 * 2**30

# (label, model shards S, workers W, in-flight dtype)
LAYOUTS = (
    ("1 group x 8 shards, float32 in flight", 8, 2, None),
    ("1 group x 8 shards, bfloat16 in flight", 8, 2, jnp.bfloat16),
    ("2 groups x 4 shards, float32 in flight", 4, 2, None),
    ("2 groups x 4 shards, bfloat16 in flight", 4, 2, jnp.bfloat16),
)
TEMPORARIES = 2 * 2**30  # a first guess of the step's temporaries, per device


def model():
    """``(abstract params, loss)`` of the GPT-style transformer."""
    from experiments.tasks.transformer import Transformer, pure

    init, apply = pure(lambda rngs: Transformer(VOCAB, LENGTH, WIDTH, HEADS, LAYERS, rngs=rngs))

    def loss(params, tokens):
        logits = apply(params, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return jax.eval_shape(init, jax.random.key(0)), loss


def compiled_bytes(fsq, params, loss, shards, workers, dtype, max_delay):
    """``(argument bytes, temporary bytes)`` per device of the compiled step."""
    mesh = fsq.parallel.make_mesh(8, model_axes={"fsdp": shards})
    tx = fsq.flying_squirrel(
        fsq.adam(1e-4),
        num_workers=workers,
        axis_name=fsq.parallel.AXIS_NAME,
        delay=fsq.delays.uniform(max_delay),
        in_flight_dtype=dtype,
    )
    dp = fsq.parallel.data_parallel(loss, tx, num_workers=workers, mesh=mesh)
    state = dp.abstract(params)
    batch = jax.ShapeDtypeStruct(
        (workers, 1, LENGTH + 1), jnp.int32, sharding=NamedSharding(mesh, P("devices"))
    )
    memory = dp.step.lower(state, batch).compile().memory_analysis()
    return memory.argument_size_in_bytes, memory.temp_size_in_bytes


def main(fsq, timing) -> None:
    from benchmarks import memory as formulas

    params, loss = model()
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    print(f"GPT-style transformer: {num_params / 1e9:.3f}B parameters")
    rows = []
    for label, shards, workers, dtype in LAYOUTS:
        local = workers // (8 // shards)

        def state_bytes(max_delay, dtype=dtype, shards=shards, local=local, workers=workers):
            features = formulas.Features(
                "defaults", None, max_delay, 3, in_flight=2 if dtype else 4, adaptive=True
            )
            return formulas.formula(features, num_params, shards, local, workers)

        # The largest delay whose state and temporaries fit, the temporaries measured by
        # compiling (they hardly depend on the delay): from a guess, then from the step,
        # until the step compiled is the largest that its own temporaries allow.
        temp, largest, measured = TEMPORARIES, None, DEVICE_BYTES
        while True:
            fits = max(d for d in range(64) if state_bytes(d) + temp < DEVICE_BYTES)
            if fits == largest and measured < DEVICE_BYTES:
                break
            largest = fits
            start = time.perf_counter()
            arguments, temp = compiled_bytes(fsq, params, loss, shards, workers, dtype, largest)
            seconds = time.perf_counter() - start
            measured = arguments + temp
        one_more = measured + state_bytes(largest + 1) - state_bytes(largest)
        rows.append(
            {
                "layout": label,
                "workers": workers,
                "largest_delay": largest,
                "GiB": measured / 2**30,
                "state_GiB": arguments / 2**30,
                "formula_state_GiB": state_bytes(largest) / 2**30,
                "temp_GiB": temp / 2**30,
                "GiB_with_one_more_delay": one_more / 2**30,
                "compile_s": seconds,
            }
        )
        print(rows[-1], flush=True)
    timing.print_table(rows)
    path = timing.save("memory_scale", {"num_params": num_params, "rows": rows})
    print(f"results: {path}")
