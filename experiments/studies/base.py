"""What every study shares: its settings, the catalogue, progress bars and labels."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import fsq
from experiments import records, training
from experiments.tasks.base import Task

SCALES = ("full", "quick", "tiny")
OFF = {"compensation": None, "staleness": None}  # plain asynchronous training
SYNCHRONOUS = "none"  # the delay label of synchronous training
SYNCHRONOUS_METHOD = "synchronous"  # the method label of synchronous runs beside delayed ones

# The classic catalogue: constructor keywords and the centre of each learning-rate grid.
CATALOGUE: dict[str, tuple[dict[str, Any], float]] = {
    "sgd": ({}, 0.3),
    "bgd": ({"num_microbatches": 4}, 1.0),
    "momentum": ({}, 0.03),
    "nesterov": ({}, 0.03),
    "adagrad": ({}, 0.1),
    "rmsprop": ({}, 0.01),
    "adam": ({}, 0.01),
}

T = TypeVar("T")


class Settings(NamedTuple):
    """How to run a study.

    Attributes:
      scale: ``"full"`` (the checked-in results), ``"quick"`` (a few minutes) or
        ``"tiny"`` (seconds, for tests).
      seeds: the seeds of every configuration (``None``: the study's default for the scale).
      num_devices: devices to spread the workers over (``gcd(W, num_devices)`` of them
        for ``W`` workers).
      progress: show progress bars.
      sizes: ``{study: Size}`` overriding the scale's sizes (``--set``, ``rerun``).
    """

    scale: str = "full"
    seeds: tuple[int, ...] | None = None
    num_devices: int = 1
    progress: bool = True
    sizes: Mapping[str, Any] | None = None

    def size(self, study: str, sizes: Mapping[str, Any]) -> Any:
        """The study's size (its config): the one given, else ``sizes[scale]``."""
        return (self.sizes or {}).get(study, sizes[self.scale])

    def seeds_or(self, default: int) -> tuple[int, ...]:
        """The seeds to run: those given, else ``0 .. default - 1``."""
        return tuple(range(default)) if self.seeds is None else self.seeds


_BAR: contextvars.ContextVar[Any] = contextvars.ContextVar("bar", default=None)


@contextlib.contextmanager
def step_bar(name: str, enabled: bool) -> Iterator[Any]:
    """A progress bar of the training steps (runs x steps) a study has finished, left on
    screen when it ends: every :func:`training.train` inside advances it."""
    bar = tqdm(desc=name, unit=" steps", unit_scale=True, leave=True, disable=not enabled)
    tokens = _BAR.set(bar), training.STEPS_DONE.set(bar.update)
    try:
        yield bar
        bar.total = bar.n  # done: the estimate gives way to the count
    finally:
        _BAR.reset(tokens[0])
        training.STEPS_DONE.reset(tokens[1])
        bar.close()


def label(item: Any) -> str:
    """A short readable name of a study's item: strings and numbers as they are; a
    tuple's strings and numbers joined by " / " (its other parts, such as the method
    its name names, left out); an object by its ``name`` (or its type)."""
    if isinstance(item, tuple):
        named = [x for x in item if isinstance(x, str | int | float)] or list(item)
        return " / ".join(label(x) for x in named)
    if isinstance(item, str | int | float):
        return f"{item:g}" if isinstance(item, float) else str(item)
    return str(getattr(item, "name", type(item).__name__))


def progress(items: Iterable[T], settings: Settings, desc: str) -> Iterator[T]:
    """``items``, each named beside the study's step bar while it runs, with its place
    among them (``k/n``). The outermost loop of a study also sets the bar's total (so
    that it shows an ETA): the steps done, scaled by the items left, an estimate that
    holds where the items are alike."""
    del settings, desc  # the bar is the study's (step_bar)
    bar = _BAR.get()
    items = list(items)
    outermost = bar is not None and not getattr(bar, "fsq_estimating", False)
    if outermost:
        bar.fsq_estimating = True
    try:
        for k, item in enumerate(items, 1):
            if bar is not None:
                bar.set_postfix_str(f"{label(item)} ({k}/{len(items)})", refresh=True)
            yield item
            if outermost and k < len(items) and bar.n:
                bar.total = max(bar.n + 1, round(bar.n * len(items) / k))
                bar.refresh()
    finally:
        if outermost:
            bar.fsq_estimating = False


def learning_rates(centre: float, count: int) -> tuple[float, ...]:
    """``count`` rates of the half-decade grid 1, 3, 10, 30, ... around ``centre``.

    An even count takes the extra rate below the centre.
    """
    grid = [m * 10.0**e for e in range(-6, 2) for m in (1, 3)]
    i = min(range(len(grid)), key=lambda k: abs(np.log(grid[k] / centre)))
    start = i - count // 2
    return tuple(float(f"{x:.3g}") for x in grid[start : start + count])


def catalogue_optimizer(
    name: str, learning_rate: Any, mean_staleness: Any = None
) -> optax.GradientTransformation:
    """``fsq.<name>`` with the catalogue's keywords (the learning rate may be traced); with
    ``mean_staleness``, its momentum lowered by ``fsq.hyperparameters_under_delay``."""
    hparams = {"learning_rate": learning_rate, **CATALOGUE[name][0]}
    if mean_staleness is not None:
        hparams = fsq.hyperparameters_under_delay(name, mean_staleness, **hparams)
    return fsq.get_optimizer(name, **hparams)


def one_of(
    transforms: Sequence[optax.GradientTransformation], index: jax.Array
) -> optax.GradientTransformation:
    """The transformation ``transforms[index]``, for a traced ``index``.

    Every member is updated and the chosen update returned, so runs of different
    optimizers share one program (``vmap`` over ``index``): the gradients, which cost
    the most, are computed once per run either way.
    """

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params=None):
        results = [t.update(updates, s, params) for t, s in zip(transforms, state, strict=True)]
        chosen = jax.tree.map(lambda *u: jnp.stack(u)[index], *(u for u, _ in results))
        return chosen, tuple(s for _, s in results)

    return optax.GradientTransformation(init, update)


def delay_label(bound: int) -> str:
    """``"none"`` for 0, else ``"uniform(bound)"``."""
    return SYNCHRONOUS if bound == 0 else f"uniform({bound})"


def seeds_only(
    task: Task,
    make_tx: training.MakeTx,
    describe: records.Run,
    *,
    study: str,
    settings: Settings,
    size: Any,
    num_workers: int,
) -> list[records.Record]:
    """Trains one configuration (no grid) for the seeds of ``settings``; its records.

    ``size`` is the study's size at this scale: its ``seeds``, ``steps`` and ``batch``.
    """
    outcome = training.train(
        task,
        make_tx,
        grid={},
        seeds=settings.seeds_or(size.seeds),
        steps=size.steps,
        num_workers=num_workers,
        batch_size=size.batch,
        num_devices=settings.num_devices,
    )
    return records.from_outcome(
        outcome, task, study=study, workers=num_workers, describe=lambda values: describe
    )
