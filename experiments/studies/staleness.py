"""staleness: test metric against the delay, for plain asynchronous training and fsq's techniques.

The coordination protocol: per task and inner optimizer, tune the learning rate for
synchronous training, freeze it, then add uniform delays without retuning. Methods: plain
asynchronous training (every extra off), delay compensation alone (DC-ASGD-a), the
weighted-step staleness rule alone, and Flying Squirrel's default (both); on request
(``--set "methods=(...)"``) the published staleness rules ``inverse`` (Zhang et al. 2016)
and ``delay-adaptive`` (Koloskova et al. 2022, threshold the mean delay), and two
variants of the default: a threshold of 1, and weights divided by their mean (the total
weight of a step preserved on average). All delay levels of a method are one program
(one in-flight buffer sized for the largest).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.ticker import NullLocator

import fsq
from experiments import records, tasks, training
from experiments.presentation import (
    batch,
    figure,
    image,
    metric_axis,
    metric_name,
    plotted,
    points,
    relative,
    save,
    seed_count,
    summary,
    table_block,
)
from experiments.records import Record, best_rate, group
from experiments.studies import base
from experiments.studies.base import SYNCHRONOUS, SYNCHRONOUS_METHOD

NAME = "staleness"
WORKERS = 8
FIXED: dict[str, dict[str, Any]] = {
    "plain async": base.OFF,
    "DC-ASGD-a": {**base.OFF, "compensation": "adaptive"},
    "weighted step": {**base.OFF, "staleness": "weighted_step"},
    "flying squirrel": {},  # the defaults: weighted step + DC-ASGD-a
    "inverse": {**base.OFF, "staleness": "inverse"},  # Zhang et al. 2016
    "weighted step tau_C 1 + DC-a": {"staleness": fsq.staleness.weighted_step(1.0)},
}


def _delay_adaptive(bound: jax.Array, max_delay: int) -> dict[str, Any]:
    """Koloskova et al. 2022's rule, min(1, tau_C / tau), with their threshold, the mean
    delay (of uniform 0..bound: traced, which fsq.staleness.delay_adaptive does not take)."""
    del max_delay
    threshold = jnp.maximum(1.0, bound / 2)
    rule = fsq.staleness.StalenessRule(
        lambda tau: jnp.minimum(1.0, threshold / jnp.maximum(1.0, tau))
    )
    return {**base.OFF, "staleness": rule}


def _weight_preserving(bound: jax.Array, max_delay: int) -> dict[str, Any]:
    """The default's weights divided by their mean under uniform 0..bound delays, so that
    the step's total weight is W on average: progress per step kept, stale steps smaller."""
    default = fsq.staleness.weighted_step()
    taus = jnp.arange(max_delay + 1, dtype=jnp.float32)
    drawn = (taus <= bound).astype(jnp.float32)
    mean = jnp.sum(default.scale(taus) * drawn) / jnp.sum(drawn)
    rule = fsq.staleness.StalenessRule(lambda tau: default.scale(tau) / mean, default.scope)
    return {"staleness": rule}


# Rules that depend on the delay level, which is traced (every level is one program).
TRACED: dict[str, Callable[[jax.Array, int], dict[str, Any]]] = {
    "delay-adaptive": _delay_adaptive,
    "weight-preserving weighted step + DC-a": _weight_preserving,
}
METHODS = (*FIXED, *TRACED)


def options(method: str, bound: jax.Array, max_delay: int) -> dict[str, Any]:
    """The keywords of ``fsq.flying_squirrel`` for ``method`` at delays uniform in
    ``0..bound`` (``bound <= max_delay``)."""
    return FIXED[method] if method in FIXED else TRACED[method](bound, max_delay)


class Size(NamedTuple):
    """Per scale: ``{task: (steps, batch per worker)}``, inners, methods, delays, rates, seeds."""

    tasks: dict[str, tuple[int, int]]
    inners: tuple[str, ...]
    methods: tuple[str, ...]
    delays: tuple[int, ...]
    rates: int
    seeds: int


SIZES = {
    "full": Size(
        {"mlp": (800, 16), "transformer": (300, 4)},
        ("momentum", "adam"),
        ("plain async", "DC-ASGD-a", "weighted step", "flying squirrel"),
        (4, 16, 64),
        5,
        2,
    ),
    "quick": Size(
        {"mlp": (600, 16)}, ("momentum",), ("plain async", "flying squirrel"), (4, 16, 64), 3, 2
    ),
    "tiny": Size(
        {"quadratic": (20, 4)}, ("momentum",), ("plain async", "flying squirrel"), (2,), 2, 1
    ),
}


def run(settings: base.Settings) -> list[records.Record]:
    """Runs the study at ``settings.scale``; returns one record per run."""
    size = settings.size(NAME, SIZES)
    if unknown := [m for m in size.methods if m not in METHODS]:
        raise ValueError(f"staleness methods are {METHODS}, got {unknown}")
    out = []
    configs = [(t, i) for t in size.tasks for i in size.inners]
    for task_name, inner in base.progress(configs, settings, NAME):
        task = tasks.get(task_name)
        tuning = synchronous(task, inner, size, settings)
        out += tuning
        learning_rate = records.best_rate(tuning)
        for method in size.methods:
            out += delayed(task, inner, learning_rate, method, size, settings)
    return out


def train(task, make_tx, grid, size: Size, settings: base.Settings) -> training.Outcome:
    steps, batch = size.tasks[task.name]
    return training.train(
        task,
        make_tx,
        grid=grid,
        seeds=settings.seeds_or(size.seeds),
        steps=steps,
        num_workers=WORKERS,
        batch_size=batch,
        num_devices=settings.num_devices,
    )


def _records(outcome, task, describe) -> list[records.Record]:
    return records.from_outcome(outcome, task, study=NAME, workers=WORKERS, describe=describe)


def synchronous(task, inner: str, size: Size, settings: base.Settings) -> list[records.Record]:
    """The learning-rate sweep of synchronous training."""

    def make_tx(hp, seed):
        optimizer = base.catalogue_optimizer(inner, hp["learning_rate"])
        return training.flying_squirrel(optimizer, WORKERS, seed, **base.OFF)

    rates = base.learning_rates(base.CATALOGUE[inner][1], size.rates)
    outcome = train(task, make_tx, {"learning_rate": rates}, size, settings)
    return _records(
        outcome,
        task,
        lambda values: records.Run(
            base.SYNCHRONOUS_METHOD, {"inner": inner, **values}, base.SYNCHRONOUS
        ),
    )


def delayed(
    task, inner: str, learning_rate: float, method: str, size: Size, settings: base.Settings
) -> list[records.Record]:
    """``method`` at the frozen ``learning_rate``, every delay level in one program."""
    max_delay = max(size.delays)

    def make_tx(hp, seed):
        optimizer = base.catalogue_optimizer(inner, learning_rate)
        delay = training.UniformUpTo(max_delay, bound=hp["max_delay"])
        chosen = options(method, hp["max_delay"], max_delay)
        return training.flying_squirrel(optimizer, WORKERS, seed, delay=delay, **chosen)

    compensated = options(method, max_delay, max_delay).get("compensation", "adaptive")
    channels = 1 if compensated is None else 3
    outcome = train(task, make_tx, {"max_delay": size.delays}, size, settings)
    return _records(
        outcome,
        task,
        lambda values: records.Run(
            method,
            {"inner": inner, "learning_rate": learning_rate, **values},
            base.delay_label(values["max_delay"]),
            channels,
        ),
    )


def section(rows: list[Record]) -> list[str]:
    lines = [
        "## Staleness",
        "",
        "Learning rate tuned for synchronous training, frozen, then uniform delays up to "
        "`max_delay` (columns). Percentages in brackets are of synchronous.",
        "",
        image("staleness.png", "metric against delay"),
        "",
    ]
    for (task, inner), runs in group(rows, "task", "inner").items():
        sync = [r for r in runs if r.method == SYNCHRONOUS_METHOD]
        lr = best_rate(sync)
        sync = group(sync, "learning_rate")[lr]
        delayed = [r for r in runs if r.method != SYNCHRONOUS_METHOD]
        delays = list(group(delayed, "delay"))
        table = []
        for method, by_method in group(delayed, "method").items():
            cells = group(by_method, "delay")
            row = {"method": method, SYNCHRONOUS: summary(sync)}
            row |= {d: summary(cells[d]) + relative(cells[d], sync) for d in delays}
            table.append(row)
        lines += table_block(
            f"**{task}, {inner} inner** (lr {lr}, {sync[0].workers} workers x {batch(sync[0])}, "
            f"{sync[0].steps} steps, {seed_count(len(sync))}; {metric_name(sync[0])}):",
            table,
        )
    return lines


def plot(rows: list[Record], out: pathlib.Path) -> None:
    panels = group(rows, "task", "inner")
    plt, fig, axes = figure(len(panels))
    for ax, ((task, inner), runs) in zip(axes, panels.items(), strict=True):
        sync_runs = [r for r in runs if r.method == SYNCHRONOUS_METHOD]
        sync = group(sync_runs, "learning_rate")[best_rate(sync_runs)]
        methods = [m for m in group(runs, "method") if m != SYNCHRONOUS_METHOD]
        for i, method in enumerate(methods):
            cells = group(group(runs, "method")[method], "delay")
            bounds = [0] + [v[0].hyperparameters["max_delay"] for v in cells.values()]
            points(ax, bounds, [sync, *cells.values()], index=i, label=method)
        if np.isfinite(plotted(sync)):
            ax.axhline(
                plotted(sync), color="gray", linestyle="--", linewidth=0.8, label="synchronous"
            )
        ax.set_xscale("symlog", linthresh=4)
        ticks = sorted({0} | {r.hyperparameters.get("max_delay", 0) for r in runs})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        metric_axis(ax, runs[0])
        ax.set_xlabel("max delay (uniform)")
        ax.set_title(f"{task}, {inner} inner")
    save(plt, fig, out / "staleness.png")
