"""workers: speed-up against the number of workers, in steps to a target test loss.

Each worker keeps its batch size, so ``W`` workers average ``W`` times more examples per
step; with linear speed-up the steps to reach the target fall as ``1 / W``. The test
loss is evaluated 50 times per run (for the quadratic it is exact). Per ``W``,
one program sweeps the learning rate (the best is taken per ``W``) for synchronous
training and for Flying Squirrel (defaults) with uniform delays up to ``W`` steps, the
staleness of an asynchronous cluster whose every other worker updates in between.
"""

from __future__ import annotations

from typing import NamedTuple

from experiments import records, tasks, training
from experiments.studies import base

NAME = "workers"
INNER = "sgd"
TEST_POINTS = 50


class Size(NamedTuple):
    """Per scale: ``{task: (steps, batch per worker, test-loss target, learning rates)}``,
    the worker counts and the seeds."""

    tasks: dict[str, tuple[int, int, float, int]]
    worker_counts: tuple[int, ...]
    seeds: int


SIZES = {
    "full": Size(
        {"quadratic": (3000, 1, 0.6, 7), "mlp": (1000, 4, 1.6, 5)}, (1, 2, 4, 8, 16, 32), 2
    ),
    "quick": Size({"quadratic": (2000, 1, 0.7, 5)}, (1, 2, 4, 8, 16), 2),
    "tiny": Size({"quadratic": (50, 4, 8.0, 2)}, (1, 2), 1),
}


def describe(values: dict) -> records.Run:
    """Synchronous without delays, else Flying Squirrel (with compensation's 3 channels)."""
    bound = values["max_delay"]
    return records.Run(
        base.SYNCHRONOUS_METHOD if bound == 0 else "flying squirrel",
        {"inner": INNER, **values},
        base.delay_label(bound),
        1 if bound == 0 else 3,
    )


def run(settings: base.Settings) -> list[records.Record]:
    """Runs the study at ``settings.scale``; returns one record per run."""
    size = SIZES[settings.scale]
    seeds = settings.seeds_or(size.seeds)
    out = []
    configs = [(t, w) for t in size.tasks for w in size.worker_counts]
    for task_name, workers in base.progress(configs, settings, NAME):
        steps, batch, target, rates = size.tasks[task_name]
        task = tasks.get(task_name)

        def make_tx(hp, seed, workers=workers):
            optimizer = base.catalogue_optimizer(INNER, hp["learning_rate"])
            delay = training.UniformUpTo(workers, bound=hp["max_delay"])
            # Flying Squirrel's defaults; with delay 0 they are exactly synchronous training.
            return training.flying_squirrel(optimizer, workers, seed, delay=delay)

        outcome = training.train(
            task,
            make_tx,
            grid={
                "learning_rate": base.learning_rates(base.CATALOGUE[INNER][1], rates),
                "max_delay": (0, workers),
            },
            seeds=seeds,
            steps=steps,
            num_workers=workers,
            batch_size=batch,
            num_devices=settings.num_devices,
            test_points=TEST_POINTS,
        )
        out += records.from_outcome(
            outcome, task, study=NAME, workers=workers, describe=describe, target_loss=target
        )
    return out
