"""anchors: the MNIST-1D paper's accuracies, reproduced with fsq's catalogue, synchronously.

Greydanus (2020) reports about 32% (logistic regression), 68% (MLP) and 94% (CNN) test
accuracy, training with Adam at learning rate 1e-2, batch 100, for 6000 steps. Here 4
workers of 25 examples run synchronous data-parallel training (Flying Squirrel, delay 0,
every extra off, which is exactly ``fsq.adam`` on the mean gradient) with that protocol.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from experiments import records, tasks, training
from experiments.presentation import markdown
from experiments.records import Record, group
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
    size = settings.size(NAME, SIZES)
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


def section(rows: list[Record]) -> list[str]:
    lines = [
        "## Sanity anchors: the MNIST-1D paper",
        "",
        "Synchronous data-parallel training with fsq's catalogue (Flying Squirrel with delay "
        f"0 and every extra off over `fsq.adam`, learning rate {LEARNING_RATE}, "
        f"{WORKERS} workers x {BATCH} examples = batch "
        f"{WORKERS * BATCH}), against the test accuracies of Greydanus "
        f"(2020), with a tolerance of {100 * TOLERANCE:.0f} points.",
        "",
    ]
    table, verdicts = [], []
    for task, runs in group(rows, "task").items():
        accuracy = np.asarray([r.test_accuracy for r in runs])
        paper = PAPER[task]
        within = bool(abs(accuracy.mean() - paper) <= TOLERANCE)
        verdicts.append(within)
        table.append(
            {
                "task": task,
                "steps": runs[0].steps,
                "seeds": len(runs),
                "paper (%)": f"{100 * paper:.0f}",
                "fsq (%)": f"{100 * accuracy.mean():.1f} +- {100 * accuracy.std():.1f}",
                "difference (points)": f"{100 * (accuracy.mean() - paper):+.1f}",
                "within 3 points": "yes" if within else "no",
            }
        )
    lines += [markdown(table), ""]
    if all(verdicts):
        lines.append("All anchors are reproduced within 3 points.")
    else:
        missed = [t["task"] for t, ok in zip(table, verdicts, strict=True) if not ok]
        lines.append(f"Not within 3 points: {', '.join(missed)} (see the steps column).")
    return [*lines, ""]
