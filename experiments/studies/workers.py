"""workers: speed-up against the number of workers, in steps to a target test loss.

Each worker keeps its batch size, so ``W`` workers average ``W`` times more examples per
step; with linear speed-up the steps to reach the target fall as ``1 / W``. The test
loss is evaluated 50 times per run (for the quadratic it is exact). Per ``W``,
one program sweeps the learning rate (the best is taken per ``W``) for synchronous
training and for Flying Squirrel (defaults) with uniform delays up to ``W`` steps, the
staleness of an asynchronous cluster whose every other worker updates in between.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from experiments import records, tasks, training
from experiments.presentation import (
    batch,
    figure,
    image,
    save,
    series,
    speedup_axes,
    table_block,
)
from experiments.records import Record, group
from experiments.studies import base, wallclock

NAME = "workers"
INNER = "sgd"
TEST_POINTS = 50


class Size(NamedTuple):
    """Per scale: ``{task: (steps, batch per worker, test-loss target, learning rates)}``,
    the worker counts, the seeds, and per task the size of the runs in time."""

    tasks: dict[str, tuple[int, int, float, int]]
    worker_counts: tuple[int, ...]
    seeds: int
    in_time: dict[str, wallclock.TaskSize]


SIZES = {
    "full": Size(
        {"quadratic": (3000, 1, 0.6, 7), "mlp": (1000, 4, 1.6, 5)},
        (1, 2, 4, 8, 16, 32),
        2,
        {
            "quadratic": wallclock.TaskSize(300, 1, 0.3, 4),
            "mlp": wallclock.TaskSize(100, 4, 1.0, 3),
        },
    ),
    "quick": Size(
        {"quadratic": (2000, 1, 0.7, 5)},
        (1, 2, 8),
        2,
        {"quadratic": wallclock.TaskSize(100, 1, 0.3, 3)},
    ),
    "tiny": Size(
        {"quadratic": (50, 4, 8.0, 2)}, (1, 2), 1, {"quadratic": wallclock.TaskSize(10, 2, 0.1, 1)}
    ),
}
IN_TIME = ("synchronous", "flying squirrel")  # the methods run in time
PROFILE = "exponential"  # their workers' compute times: random, a mean of 1 s


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
    size = settings.size(NAME, SIZES)
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
        # The same workers in time: random compute times, to a target in seconds.
        comparison = wallclock.Comparison(task_name, workers, (PROFILE,), IN_TIME)
        timed = wallclock.Size((comparison,), size.in_time, size.seeds)
        out += wallclock.compare(comparison, PROFILE, timed, settings, study=NAME)
    return out


def split(rows: list[Record]) -> tuple[list[Record], list[Record]]:
    """The runs counted in steps, and those in time."""
    return [r for r in rows if not records.timed(r)], [r for r in rows if records.timed(r)]


def steps_to_target(rows: Sequence[Record]) -> float:
    """Mean steps to the target over seeds; infinite if any seed missed it."""
    steps = [r.steps_to_target for r in rows]
    return float("inf") if None in steps else float(np.mean(steps))


def speedups(rows: list[Record]) -> dict[tuple[str, str], dict[int, tuple[float, float]]]:
    """Per (task, method): ``{W: (best lr, steps to target)}``, best lr per ``W``."""
    out: dict[tuple[str, str], dict[int, tuple[float, float]]] = {}
    for key, runs in group(rows, "task", "method").items():
        out[key] = {}
        for w, by_w in group(runs, "workers").items():
            by_rate = group(by_w, "learning_rate")
            lr = min(by_rate, key=lambda x: steps_to_target(by_rate[x]))
            out[key][w] = (lr, steps_to_target(by_rate[lr]))
    return out


def section(rows: list[Record]) -> list[str]:
    rows, timed = split(rows)
    lines = [
        "## Workers: speed-up",
        "",
        "Steps until the test loss (evaluated 50 times per run) reaches the target, at the "
        "best learning rate per `W` (mean over seeds; `-` if a seed never reached it), for "
        "synchronous training and for Flying Squirrel with uniform delays up to `W` steps. "
        "Each worker keeps its batch, so linear speed-up is `speed-up = W`. The learning "
        "rates are half a decade apart and a test loss near the target can cross it early "
        "or late by chance, so single speed-ups carry noise of tens of percent: read the "
        "trend.",
        "",
        image("workers.png", "speed-up against workers"),
        "",
    ]
    for (task, method), by_w in speedups(rows).items():
        base = by_w[min(by_w)][1]
        table = [
            {
                "W": w,
                "best lr": lr,
                "steps to target": "-" if np.isinf(s) else f"{s:.0f}",
                "speed-up": "-" if np.isinf(s) else f"{base / s:.2f}",
                "efficiency": "-" if np.isinf(s) else f"{base / s / (w / min(by_w)):.2f}",
            }
            for w, (lr, s) in by_w.items()
        ]
        sample = next(r for r in rows if r.task == task)
        lines += table_block(
            f"**{task}, {method}** ({batch(sample)} per worker, target test loss "
            f"{sample.target_loss}, {sample.steps} steps):",
            table,
        )
    curves = wallclock.speedups(timed)
    if curves:
        lines += [
            "**In wall-clock time.** Above, every worker computes one gradient per step, so "
            "a step is the same time for both methods and asynchrony can only lose: it pays "
            "staleness and gains no speed. Below, the same workers take random times "
            "(exponential, a mean of 1 s; `fsq.timing`): synchronous training waits for the "
            "slowest worker of each round, Flying Squirrel for none. Speed-up: seconds for "
            "synchronous training at the smallest `W` to reach its own final test loss, over "
            "each method's seconds to reach it (best learning rate per `W`, mean test loss "
            "over seeds; the time study has the protocol).",
            "",
            image("workers_time.png", "wall-clock speed-up against workers"),
            "",
        ]
        for (task, _), by_method in curves.items():
            lines += table_block(
                f"**{task}**, wall-clock speed-up:", wallclock.speedup_table(by_method)
            )
    return lines


def plot(rows: list[Record], out: pathlib.Path) -> None:
    rows, timed = split(rows)
    by_task: dict[str, dict] = {}
    for (task, method), by_w in speedups(rows).items():
        by_task.setdefault(task, {})[method] = by_w
    plt, fig, axes = figure(len(by_task))
    for ax, (task, methods) in zip(axes, by_task.items(), strict=True):
        for i, (method, by_w) in enumerate(methods.items()):
            base = by_w[min(by_w)][1]
            ws = sorted(by_w)  # a W that never reached the target: marked, not dropped
            speedup = [base / by_w[w][1] for w in ws]
            series(ax, ws, speedup, index=i, label=method, higher_is_better=True, marker="o")
        ws = sorted({w for by_w in methods.values() for w in by_w})
        ax.plot(ws, [w / ws[0] for w in ws], color="gray", linestyle=":", label="linear")
        speedup_axes(ax)
        ax.set_ylabel("speed-up in steps to target")
        ax.set_title(task)
    save(plt, fig, out / "workers.png")
    curves = wallclock.speedups(timed)
    if curves:
        wallclock.plot_speedups(curves, out / "workers_time.png")
