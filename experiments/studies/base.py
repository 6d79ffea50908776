"""What every study shares: its settings, the catalogue, progress bars and labels."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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
      num_devices: devices to spread the workers over.
      progress: show progress bars.
    """

    scale: str = "full"
    seeds: tuple[int, ...] | None = None
    num_devices: int = 1
    progress: bool = True

    def seeds_or(self, default: int) -> tuple[int, ...]:
        """The seeds to run: those given, else ``0 .. default - 1``."""
        return tuple(range(default)) if self.seeds is None else self.seeds


def progress(items: Iterable[T], settings: Settings, desc: str) -> Iterable[T]:
    """``items`` with a tqdm bar (when ``settings.progress``)."""
    return tqdm(items, desc=desc, leave=False, disable=not settings.progress)


def learning_rates(centre: float, count: int) -> tuple[float, ...]:
    """``count`` rates of the half-decade grid 1, 3, 10, 30, ... around ``centre``.

    An even count takes the extra rate below the centre.
    """
    grid = [m * 10.0**e for e in range(-6, 2) for m in (1, 3)]
    i = min(range(len(grid)), key=lambda k: abs(np.log(grid[k] / centre)))
    start = i - count // 2
    return tuple(float(f"{x:.3g}") for x in grid[start : start + count])


def catalogue_optimizer(name: str, learning_rate: Any) -> optax.GradientTransformation:
    """``fsq.<name>`` with the catalogue's keywords (the learning rate may be traced)."""
    return fsq.get_optimizer(name, learning_rate=learning_rate, **CATALOGUE[name][0])


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
