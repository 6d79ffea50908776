"""One record per run, written as ``results.json`` (with the curves) and ``results.csv``.

A record is what a reader of a study needs about one run (one task, method,
hyperparameters, delay model and seed); :mod:`experiments.report` rebuilds every table
and plot from these records alone.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from experiments.tasks import Task
from experiments.training import Outcome

CURVE_POINTS = 100  # loss-curve points kept per run (means over equal windows of steps)
RESULTS_JSON, RESULTS_CSV = "results.json", "results.csv"


class Record(NamedTuple):
    """One run.

    Attributes:
      study: the study that ran it (``"classic"``, ``"staleness"``, ...).
      task: the task's name.
      method: the optimizer or technique (e.g. ``"adam"``, ``"plain async"``).
      hyperparameters: ``{name: value}``, the learning rate and the batch size per worker
        included.
      workers: ``W``.
      delay: the delay model, e.g. ``"none"`` (synchronous) or ``"uniform(16)"``.
      seed: the run's seed (initialization, data and delays).
      steps: logical steps; every worker computes one gradient per step.
      final_train_loss: mean training loss over the last 10% of steps.
      test_loss: the task's test loss at the end.
      test_accuracy: test accuracy at the end (classifiers; ``None`` otherwise).
      loss_floor: the exact minimum of the expected loss where known, else ``None``.
      diverged: the loss became non-finite or ended above where it started.
      bytes_per_step: bytes each worker sends per step (dense float32 channels, or the
        compressed message).
      wall_seconds: this run's share of its program's wall time (the runs of a program
        are computed together, compilation included).
      mean_staleness: mean delay of the delivered gradients, in steps.
      target_loss: the test-loss target of the workers study, else ``None``.
      steps_to_target: the first evaluation step whose test loss reaches ``target_loss``
        (``None`` if never or not measured).
      curve: the training loss, averaged over ``CURVE_POINTS`` equal windows of steps.
      test_curve: the test loss at evenly spaced steps (the last at the end), if measured.
    """

    study: str
    task: str
    method: str
    hyperparameters: dict[str, Any]
    workers: int
    delay: str
    seed: int
    steps: int
    final_train_loss: float
    test_loss: float
    test_accuracy: float | None
    loss_floor: float | None
    diverged: bool
    bytes_per_step: int
    wall_seconds: float
    mean_staleness: float
    target_loss: float | None
    steps_to_target: int | None
    curve: list[float]
    test_curve: list[float] | None


def _nanmean(x: np.ndarray, axis=None) -> np.ndarray:
    """The mean of what is not NaN (steps where no worker computed a loss); NaN if none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN window: NaN
        return np.nanmean(x, axis=axis)


def final_loss(losses: np.ndarray) -> float:
    """Mean of the last 10% of a run's per-step losses."""
    return float(_nanmean(losses[-max(1, len(losses) // 10) :]))


def curve(losses: np.ndarray, points: int = CURVE_POINTS) -> np.ndarray:
    """Means over ``min(points, steps)`` equal windows (the last window takes the rest)."""
    window = max(1, len(losses) // points)
    usable = (len(losses) // window) * window
    return _nanmean(losses[:usable].reshape(-1, window), axis=-1)


def has_diverged(losses: np.ndarray) -> bool:
    """Non-finite, or the last window's loss above the first's."""
    windows = curve(losses)
    return bool(not np.all(np.isfinite(windows)) or windows[-1] > windows[0])


def steps_to(curve: np.ndarray, steps: int, target: float) -> int | None:
    """The step ending the first of ``len(curve)`` equal spans of ``steps`` where ``curve``
    is at or below ``target`` (``None`` if never)."""
    hits = np.flatnonzero(curve <= target)
    return None if not hits.size else int((hits[0] + 1) * steps // len(curve))


def _clean(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


class Run(NamedTuple):
    """How the records name a run of a program, given its grid values.

    Attributes:
      method: the optimizer or technique.
      hyperparameters: ``{name: value}``, the learning rate included.
      delay: the delay model's label (``"none"`` when synchronous).
      channels: parameter-sized float32 channels each worker sends per step (3 with delay
        compensation, else 1).
      bytes_per_step: the bytes each worker sends per step, when compressed (``None``:
        ``4 * num_params * channels``, dense float32).
    """

    method: str
    hyperparameters: dict[str, Any]
    delay: str
    channels: int = 1
    bytes_per_step: int | None = None


def from_outcome(
    outcome: Outcome,
    task: Task,
    *,
    study: str,
    workers: int,
    describe: Callable[[dict[str, Any]], Run],
    target_loss: float | None = None,
) -> list[Record]:
    """The records of every run of ``outcome``.

    Args:
      outcome: what :func:`experiments.training.train` returned.
      task: the task it trained.
      study: the study's name.
      workers: ``W``.
      describe: names a run from its grid values ``{name: value}``.
      target_loss: the test-loss target whose ``steps_to_target`` to record (needs the
        outcome's test curve).
    """
    records = []
    share = outcome.wall_seconds / outcome.staleness.size
    accuracy = outcome.metrics.get("test_accuracy")
    for index in np.ndindex(outcome.staleness.shape):
        values = {
            name: grid_values[i]
            for (name, grid_values), i in zip(outcome.grid.items(), index[:-1], strict=True)
        }
        run = describe(values)
        losses = outcome.losses[index]
        tests = None if outcome.test_curve is None else outcome.test_curve[index]
        records.append(
            Record(
                study=study,
                task=task.name,
                method=run.method,
                hyperparameters={**run.hyperparameters, "batch_size": outcome.batch_size},
                workers=workers,
                delay=run.delay,
                seed=int(outcome.seeds[index[-1]]),
                steps=len(losses),
                final_train_loss=_clean(final_loss(losses)),
                test_loss=_clean(outcome.metrics["test_loss"][index]),
                test_accuracy=None if accuracy is None else float(accuracy[index]),
                loss_floor=task.loss_floor,
                diverged=has_diverged(losses),
                bytes_per_step=(
                    4 * outcome.num_params * run.channels
                    if run.bytes_per_step is None
                    else run.bytes_per_step
                ),
                wall_seconds=share,
                mean_staleness=float(outcome.staleness[index]),
                target_loss=target_loss,
                steps_to_target=(
                    None if target_loss is None else steps_to(tests, len(losses), target_loss)
                ),
                curve=[_clean(x) for x in curve(losses)],
                test_curve=None if tests is None else [_clean(x) for x in tests],
            )
        )
    return records


# --- Selecting among records --------------------------------------------------------------


def group(rows: Iterable[Record], *fields: str) -> dict[Any, list[Record]]:
    """Records by the values of ``fields``, keys in order of first appearance."""
    groups: dict[Any, list[Record]] = {}
    for r in rows:
        key = tuple(_field(r, f) for f in fields)
        groups.setdefault(key[0] if len(fields) == 1 else key, []).append(r)
    return groups


def _field(record: Record, name: str) -> Any:
    if name in Record._fields:
        return getattr(record, name)
    return record.hyperparameters.get(name)


def timed(record: Record) -> bool:
    """Whether the run's workers computed in time (a compute profile, :mod:`fsq.timing`):
    its steps are ticks, and a worker sends only when a job ends."""
    return "profile" in record.hyperparameters


def higher_is_better(record: Record) -> bool:
    return record.test_accuracy is not None


def headline(record: Record) -> float:
    """Test accuracy for classifiers, else the test loss above the floor (or the test loss)."""
    if record.test_accuracy is not None:
        return record.test_accuracy
    if record.test_loss is None:
        return float("nan")
    return record.test_loss - (record.loss_floor or 0.0)


def mean(rows: Sequence[Record]) -> float:
    """Mean headline metric over ``rows`` (NaN if any is not finite)."""
    return float(np.mean([headline(r) for r in rows]))


def score(rows: Sequence[Record]) -> float:
    """Mean headline metric, signed so that larger is better; non-finite is worst."""
    value = mean(rows) * (1 if higher_is_better(rows[0]) else -1)
    return value if np.isfinite(value) else -np.inf


def best_rate(rows: Sequence[Record]) -> float:
    """The learning rate whose runs have the best mean headline metric."""
    by_rate = group(rows, "learning_rate")
    return max(by_rate, key=lambda lr: score(by_rate[lr]))


# --- Files ---------------------------------------------------------------------------------


def write(records: Iterable[Record], meta: Mapping[str, Any], out: pathlib.Path) -> None:
    """Writes ``results.json`` (``{"meta": ..., "records": [...]}``, one record a line)
    and ``results.csv`` (every field but the curves)."""
    rows = [r._asdict() for r in records]
    out.mkdir(parents=True, exist_ok=True)
    lines = ",\n".join(json.dumps(row) for row in rows)
    (out / RESULTS_JSON).write_text(
        f'{{"meta": {json.dumps(dict(meta))},\n"records": [\n{lines}\n]}}\n'
    )
    columns = [c for c in Record._fields if c not in ("curve", "test_curve")]
    with (out / RESULTS_CSV).open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "hyperparameters": json.dumps(row["hyperparameters"])})


CURVES = "curves"  # the per-step metrics' folder: TensorBoard event files and CSVs


def write_curves(records: Iterable[Record], out: pathlib.Path) -> None:
    """Writes every run's training-loss curve as per-step metrics with
    :class:`fsq.MetricWriter` (TensorBoard event files and a CSV), one writer per study,
    task, method and length under ``out / curves``, one scalar per run
    (``DELAY/lr=LR/seed=SEED``) at the last step of each curve window:
    ``tensorboard --logdir out/curves`` shows them."""
    import fsq

    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault((r.study, r.task, r.method, r.steps, len(r.curve)), []).append(r)
    for (study, task, method, steps, points), runs in groups.items():
        name = f"{study}/{task}/{method}/{steps} steps".replace(" ", "_")
        tags = [f"{r.delay}/lr={_field(r, 'learning_rate')}/seed={r.seed}" for r in runs]
        tags = [f"{t}/{i}" for i, t in enumerate(tags)] if len(set(tags)) < len(tags) else tags
        with fsq.MetricWriter(out / CURVES / name) as writer:
            for j in range(points):
                step = round((j + 1) * steps / points)
                values = {t: r.curve[j] for t, r in zip(tags, runs, strict=True)}
                # A non-finite loss is stored as None (JSON): NaN on the curve.
                writer.write(step, {t: math.nan if v is None else v for t, v in values.items()})


def read(out: pathlib.Path) -> tuple[dict[str, Any], list[Record]]:
    """The ``meta`` and the records of ``out / results.json``."""
    payload = json.loads((out / RESULTS_JSON).read_text())
    return payload["meta"], [Record(**row) for row in payload["records"]]
