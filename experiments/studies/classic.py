"""classic: the catalogue (SGD, BGD, momentum, Nesterov, AdaGrad, RMSProp, Adam) per task.

Per task, one program runs every optimizer at every learning rate of its half-decade
grid, synchronously and with plain asynchronous delays (uniform, no compensation, no
staleness rule), for every seed. The report takes each optimizer's best synchronous
learning rate by the task's headline metric and shows its curve (best curves), the
metric against the learning rate (sensitivity), and the metric once delays are added at
that rate, frozen: how each optimizer tolerates staleness as Flying Squirrel's inner
optimizer. Batch GD averages 4 deliveries per step, so it makes 4x fewer updates from
the same gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from experiments import records, tasks, training
from experiments.studies import base

NAME = "classic"
WORKERS = 8


class Size(NamedTuple):
    """Per scale: ``{task: (steps, batch per worker)}``, optimizers, rates, delays, seeds."""

    tasks: dict[str, tuple[int, int]]
    optimizers: tuple[str, ...]
    rates: int
    delays: tuple[int, ...]
    seeds: int


SIZES = {
    "full": Size(
        {
            "quadratic": (500, 4),
            "logistic": (600, 8),
            "mlp": (800, 8),
            "cnn": (500, 8),
            "transformer": (300, 4),
        },
        tuple(base.CATALOGUE),
        5,
        (0, 16),
        2,
    ),
    "quick": Size(
        {"quadratic": (300, 4), "logistic": (400, 8)}, tuple(base.CATALOGUE), 5, (0, 16), 2
    ),
    "tiny": Size({"quadratic": (20, 4)}, ("sgd", "adam"), 2, (0, 2), 1),
}


def run(settings: base.Settings) -> list[records.Record]:
    """Runs the study at ``settings.scale``; returns one record per run."""
    size = SIZES[settings.scale]
    names = size.optimizers
    rates = [base.learning_rates(base.CATALOGUE[n][1], size.rates) for n in names]

    def make_tx(hp, seed):
        learning_rate = jnp.asarray(rates)[hp["optimizer"], hp["rate"]]
        inner = base.one_of(
            [base.catalogue_optimizer(n, learning_rate) for n in names], hp["optimizer"]
        )
        delay = training.UniformUpTo(max(size.delays), bound=hp["max_delay"])
        return training.flying_squirrel(inner, WORKERS, seed, delay=delay, **base.OFF)

    def describe(values):
        name = names[values["optimizer"]]
        learning_rate = rates[values["optimizer"]][values["rate"]]
        return records.Run(
            name,
            {
                **base.CATALOGUE[name][0],
                "learning_rate": learning_rate,
                "max_delay": values["max_delay"],
            },
            base.delay_label(values["max_delay"]),
        )

    out = []
    for task_name in base.progress(size.tasks, settings, NAME):
        steps, batch = size.tasks[task_name]
        task = tasks.get(task_name)
        outcome = training.train(
            task,
            make_tx,
            grid={
                "optimizer": tuple(range(len(names))),
                "rate": tuple(range(size.rates)),
                "max_delay": size.delays,
            },
            seeds=settings.seeds_or(size.seeds),
            steps=steps,
            num_workers=WORKERS,
            batch_size=batch,
            num_devices=settings.num_devices,
        )
        out += records.from_outcome(outcome, task, study=NAME, workers=WORKERS, describe=describe)
    return out
