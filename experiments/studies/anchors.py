"""anchors: the MNIST-1D paper's accuracies, reproduced with fsq's catalogue, synchronously.

Greydanus (2020) reports about 32% (logistic regression), 68% (MLP) and 94% (CNN) test
accuracy, training with Adam at learning rate 1e-2, batch 100, for 6000 steps. Here 4
workers of 25 examples run synchronous data-parallel training (Flying Squirrel, delay 0,
every extra off, which is exactly ``fsq.adam`` on the mean gradient) with that protocol.
"""

from __future__ import annotations

from typing import NamedTuple

from experiments import records, tasks, training
from experiments.studies import base

NAME = "anchors"
PAPER = {"logistic": 0.32, "mlp": 0.68, "cnn": 0.94}
TOLERANCE = 0.03
WORKERS, BATCH, LEARNING_RATE = 4, 25, 1e-2


class Size(NamedTuple):
    """Per scale: the tasks, steps and seeds."""

    tasks: tuple[str, ...]
    steps: int
    seeds: int


SIZES = {
    "full": Size(tuple(PAPER), 6000, 3),
    "quick": Size(tuple(PAPER), 1500, 1),
    "tiny": Size(("logistic",), 20, 1),
}


def run(settings: base.Settings) -> list[records.Record]:
    """Runs the study at ``settings.scale``; returns one record per run."""
    size = SIZES[settings.scale]
    out = []
    for task_name in base.progress(size.tasks, settings, NAME):
        task = tasks.get(task_name)

        def make_tx(hp, seed):
            inner = base.catalogue_optimizer("adam", hp["learning_rate"])
            return training.flying_squirrel(inner, WORKERS, seed, **base.OFF)

        outcome = training.train(
            task,
            make_tx,
            grid={"learning_rate": (LEARNING_RATE,)},
            seeds=settings.seeds_or(size.seeds),
            steps=size.steps,
            num_workers=WORKERS,
            batch_size=BATCH,
            num_devices=settings.num_devices,
        )
        out += records.from_outcome(
            outcome,
            task,
            study=NAME,
            workers=WORKERS,
            describe=lambda values: records.Run("adam", values, base.SYNCHRONOUS),
        )
    return out
