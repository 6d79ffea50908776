"""compression: accuracy against bytes sent, for sparsified and quantized exchange.

The measurement of communication efficiency: the MNIST-1D MLP, 8 workers, synchronous
(delay 0, every extra off, so compression is the only change), SGD-momentum at the
learning rate tuned for synchronous training (0.1, the coordination study), on i.i.d.
shards and on label-sorted shards (the training set sorted by label and cut into 8
contiguous shards: each worker sees 1-2 classes). Methods: dense; top-k at 1% and 0.1%
without and with error feedback; random-k 1% with error feedback; scaled sign with
error feedback; 8-bit stochastic quantization with error feedback. Bytes per step are
those of the compressed message (``bytes_sent``), dense float32 being the 1x reference.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax

import fsq
from experiments import mnist1d, records, tasks, training
from experiments.presentation import (
    batch,
    metric_name,
    percent_of,
    seed_count,
    summary,
    table_block,
)
from experiments.records import Record, group
from experiments.studies import base

NAME = "compression"
WORKERS = 8
LEARNING_RATE = 0.1
C = fsq.compression
METHODS = {
    "dense": None,
    "top-k 1%, no EF": C.top_k(0.01, error_feedback=False),
    "top-k 1% + EF": C.top_k(0.01),
    "top-k 0.1%, no EF": C.top_k(0.001, error_feedback=False),
    "top-k 0.1% + EF": C.top_k(0.001),
    "random-k 1% + EF": C.random_k(0.01),
    "sign + EF": C.sign(),
    "int8 + EF": C.quantize(8),
}


class Size(NamedTuple):
    """Per scale: the task, steps, batch per worker, shardings, methods and seeds."""

    task: str
    steps: int
    batch: int
    shardings: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: int


SIZES = {
    "full": Size("mlp", 2000, 32, ("iid", "label-sorted"), tuple(METHODS), 3),
    "quick": Size("mlp", 600, 32, ("iid",), ("dense", "top-k 1% + EF", "sign + EF"), 2),
    "tiny": Size("quadratic", 20, 4, ("iid",), ("dense", "top-k 1% + EF"), 1),
}


def leaf_sizes(task) -> list[int]:
    """The sizes of the model's parameter leaves, in flattening order."""
    shapes = jax.eval_shape(task.init, jax.random.key(0))
    return [math.prod(x.shape) for x in jax.tree.leaves(shapes)]


def run(settings: base.Settings) -> list[records.Record]:
    """Runs the study at ``settings.scale``; returns one record per run."""
    size = settings.size(NAME, SIZES)
    out = []
    configs = [(s, m) for s in size.shardings for m in size.methods]
    for sharding, name in base.progress(configs, settings, NAME):
        task = tasks.get(size.task)
        if sharding == "label-sorted":
            task = mnist1d.classifier(size.task, mnist1d.MLP(), label_sorted=True)
        operator = METHODS[name]

        def make_tx(hp, seed, operator=operator):
            del hp
            return training.flying_squirrel(
                fsq.momentum(LEARNING_RATE), WORKERS, seed, compression=operator, **base.OFF
            )

        sizes = leaf_sizes(task)
        bytes_sent = C.dense_bytes(sizes) if operator is None else operator.payload_bytes(sizes)
        out += base.seeds_only(
            task,
            make_tx,
            records.Run(
                name,
                {"inner": "momentum", "learning_rate": LEARNING_RATE, "shards": sharding},
                "none",
                bytes_per_step=bytes_sent,
            ),
            study=NAME,
            settings=settings,
            size=size,
            num_workers=WORKERS,
        )
    return out


def section(rows: list[Record]) -> list[str]:
    lines = [
        "## Compression",
        "",
        "Synchronous training with each worker's message compressed (EF: error feedback). "
        "Bytes per step are the compressed message's; dense float32 is the 1x reference.",
        "",
    ]
    for (task, shards), runs in group(rows, "task", "shards").items():
        by_method = group(runs, "method")
        dense = by_method["dense"]
        table = [
            {
                "method": m,
                metric_name(r[0]): summary(r),
                "of dense": percent_of(r, dense),
                "bytes / step": r[0].bytes_per_step,
                "fewer bytes": f"{dense[0].bytes_per_step / r[0].bytes_per_step:.1f}x",
            }
            for m, r in by_method.items()
        ]
        lines += table_block(
            f"**{task}, {shards} shards** ({dense[0].workers} workers x {batch(dense[0])}, "
            f"{dense[0].steps} steps, {seed_count(len(dense))}):",
            table,
        )
    return lines
