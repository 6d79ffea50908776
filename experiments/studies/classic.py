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

import pathlib
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from experiments import records, tasks, training
from experiments.presentation import (
    batch,
    figure,
    final_train_loss,
    image,
    loss_scale,
    metric_axis,
    metric_name,
    points,
    relative,
    save,
    seed_count,
    style,
    summary,
    table_block,
)
from experiments.records import Record, best_rate, group
from experiments.studies import base
from experiments.studies.base import SYNCHRONOUS

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
    size = settings.size(NAME, SIZES)
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


def section(rows: list[Record]) -> list[str]:
    lines = [
        "## Classic catalogue",
        "",
        "Per task and optimizer: the best synchronous learning rate (by the headline "
        "metric), its final training loss and metric, then the metric once uniform delays "
        "are added at that rate, frozen (plain asynchronous Flying Squirrel: no "
        "compensation, no staleness rule). Percentages in brackets are of synchronous. "
        "Plots: training curves at the best learning rate (loss above the floor where it "
        "is known), the metric against the learning rate, and against the delay.",
        "",
        image("classic_curves.png", "best curves"),
        image("classic_sensitivity.png", "learning-rate sensitivity"),
        image("classic_staleness.png", "staleness tolerance"),
        "",
    ]
    for task, by_task in group(rows, "task").items():
        first = by_task[0]
        delays = [d for d in group(by_task, "delay") if d != SYNCHRONOUS]
        table = []
        for method, runs in group(by_task, "method").items():
            sync = [r for r in runs if r.delay == SYNCHRONOUS]
            lr = best_rate(sync)
            at_lr = group(runs, "learning_rate")[lr]
            best = group(at_lr, "delay")
            row = {
                "optimizer": method,
                "best lr": lr,
                "final train loss": final_train_loss(best[SYNCHRONOUS]),
                metric_name(first): summary(best[SYNCHRONOUS]),
            }
            for delay in delays:
                row[delay] = summary(best[delay]) + relative(best[delay], best[SYNCHRONOUS])
            table.append(row)
        lines += table_block(
            f"**{task}** ({first.workers} workers x {batch(first)}, {first.steps} steps, "
            f"{seed_count(len(group(by_task, 'seed')))}; {metric_name(first)}):",
            table,
        )
    return lines


def plot(rows: list[Record], out: pathlib.Path) -> None:
    by_task = group(rows, "task")
    plt, fig, axes = figure(len(by_task))
    for ax, (task, runs) in zip(axes, by_task.items(), strict=True):
        shown = []
        for i, (method, by_method) in enumerate(group(runs, "method").items()):
            sync = [r for r in by_method if r.delay == SYNCHRONOUS]
            best = group(sync, "learning_rate")[best_rate(sync)]
            floor = best[0].loss_floor or 0.0
            # Smoothed over 5 points per seed: near a floor, noise alone crosses it.
            curves = np.asarray([np.convolve(r.curve, np.ones(5) / 5, "valid") for r in best])
            curves = curves - floor
            steps = np.linspace(0, best[0].steps, len(best[0].curve) + 1)[1:][-curves.shape[1] :]
            finite = np.isfinite(curves).all(axis=0)
            label = method + (" (div.)" if not finite.all() else "")
            mean, low, high = (f(curves[:, finite], axis=0) for f in (np.mean, np.min, np.max))
            ax.plot(steps[finite], mean, label=label, **style(i))
            ax.fill_between(steps[finite], low, high, color=style(i)["color"], alpha=0.15, lw=0)
            shown += [low, high]
        loss_scale(ax, np.concatenate(shown))
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss" + (" - floor" if runs[0].loss_floor is not None else ""))
    save(plt, fig, out / "classic_curves.png")

    plt, fig, axes = figure(len(by_task))
    for ax, (task, runs) in zip(axes, by_task.items(), strict=True):
        for i, (method, by_method) in enumerate(group(runs, "method").items()):
            sync = group([r for r in by_method if r.delay == SYNCHRONOUS], "learning_rate")
            rates = sorted(sync)
            points(ax, rates, [sync[lr] for lr in rates], index=i, label=method)
        metric_axis(ax, runs[0])
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (synchronous)")
        ax.set_title(task)
    save(plt, fig, out / "classic_sensitivity.png")

    plt, fig, axes = figure(len(by_task))
    for ax, (task, runs) in zip(axes, by_task.items(), strict=True):
        for i, (method, by_method) in enumerate(group(runs, "method").items()):
            sync = [r for r in by_method if r.delay == SYNCHRONOUS]
            at_lr = group(group(by_method, "learning_rate")[best_rate(sync)], "delay")
            bounds = [r.hyperparameters["max_delay"] for r in (v[0] for v in at_lr.values())]
            points(ax, bounds, list(at_lr.values()), index=i, label=method)
        metric_axis(ax, runs[0])
        ax.set_xlabel("max delay (uniform), lr frozen")
        ax.set_title(task)
    save(plt, fig, out / "classic_staleness.png")
