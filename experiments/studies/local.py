r"""local: local steps and outer optimizers against synchronous training, in loss, bytes, time.

The NNX transformer language model (:mod:`experiments.tasks.transformer`, on a Markov
chain whose entropy rate is the exact loss floor), 8 workers, every method at **equal
gradient computations**: ``T`` steps of a batch per worker. Methods:

- ``synchronous``: data-parallel AdamW on the mean of the 8 gradients, every step;
- ``DiLoCo H``: :func:`fsq.diloco`: each worker ``H`` local AdamW steps, then one outer
  Nesterov step (learning rate 0.7, momentum 0.9) on the mean pseudo-gradient;
- ``streaming DiLoCo``: :func:`fsq.streaming_diloco`, :math:`H = 50` in ``F`` fragments,
  each fragment's pseudo-gradient overlapped with training for its trip on the slow link
  (:math:`\tau = \ell(\text{fragment})`) and mixed with :math:`\alpha = 0.5`;
- ``async local SGD``: :func:`fsq.async_local_sgd`, :math:`H = 50`, delayed Nesterov;
  each worker sends and restarts from the global parameters it has at once, its
  pseudo-gradient landing :math:`\ell` ticks later (the slow link below);
- ``flying squirrel + top-k 1% + EF``: Flying Squirrel's defaults over AdamW, each step's
  gradient compressed to 1% with error feedback, on the slow link below.

AdamW's learning rate is the best of a small grid for each method (by test loss at ``T``
steps, mean over seeds). Every method but synchronous training runs on to ``EXTEND`` x
``T`` steps, for the time comparison; the loss table reads their test loss at ``T``.
**Bytes** are what a worker sends (dense float32 pseudo-gradients, the top-k message
with its indices); **peak bytes** the most a worker sends at one step.

**Time model** (bandwidth-limited link): one gradient takes one tick; a message of
:math:`b` bytes takes :math:`\ell(b) = 1 + \lceil b / \beta \rceil` ticks on the link
(:func:`fsq.delays.bandwidth` with latency 1), :math:`\beta` chosen so that the dense
gradient takes ``LINK_SLOWDOWN`` = 10 ticks to transmit. Synchronous training waits for
the all-reduce every step: :math:`1 + \ell(4P)` ticks per step; DiLoCo waits once per
round: :math:`H + \ell(4P)` per :math:`H` steps; streaming DiLoCo waits only for what
its overlap does not hide, :math:`\max(0, \ell(4P/F) - \tau)` per fragment sync; async
local SGD is blocked only by its transmission, :math:`\lceil 4P/\beta \rceil` per round
(the rest of the trip overlaps training); Flying Squirrel's messages travel the link as delays in
the simulation (a worker cannot send faster than its link: :math:`\max(1, x)` ticks per
step, :math:`x` the transmission). *Time to target*: the first of the evaluations (evenly
spaced) at which the mean test loss over seeds reaches synchronous training's final test
loss, in ticks.
"""

from __future__ import annotations

import math
import pathlib
from typing import NamedTuple

import jax
import numpy as np
import optax

import fsq
from experiments import records, training
from experiments.presentation import (
    diverged_tag,
    figure,
    image,
    loss_scale,
    save,
    seed_count,
    style,
    table_block,
)
from experiments.records import Record, group
from experiments.studies import base, compression
from experiments.tasks import transformer

NAME = "local"
WORKERS = 8
LINK_SLOWDOWN = 10  # ticks to transmit one dense float32 gradient on the slow link
LATENCY = 1
STREAM = {"steps": 50, "mixing": 0.5}  # overlap: the trip of a fragment on the slow link
ASYNC_STEPS = 50
EXTEND = 3  # every method but synchronous training runs EXTEND x T steps, for time
TOP_K = fsq.compression.top_k(0.01)
SYNCHRONOUS = "synchronous"
VARIANTS = ("streaming DiLoCo", "async local SGD")
# Runs of unequal lengths by design: the section reports the bytes, not the shared plot.
IN_BYTES_PLOT = False


class Size(NamedTuple):
    """Per scale: the model, ``T`` steps, batch per worker, seeds, evaluations per ``T``
    steps, learning rates, DiLoCo's round lengths, streaming's fragments, and which of
    the :data:`VARIANTS` run besides synchronous training, DiLoCo and Flying Squirrel."""

    width: int
    layers: int
    length: int
    steps: int
    batch: int
    seeds: int
    test_points: int
    rates: tuple[float, ...]
    rounds: tuple[int, ...]
    fragments: int
    variants: tuple[str, ...] = VARIANTS


SIZES = {
    "full": Size(32, 2, 32, 1000, 16, 2, 10, (1e-3, 3e-3, 1e-2, 3e-2), (10, 50, 200), 10),
    # A method's compilation is most of its run at this scale (20-40 s on 2 cores): the
    # main job leaves the variants out.
    "quick": Size(16, 2, 16, 200, 8, 1, 2, (1e-2,), (50,), 10, variants=()),
    # The variants' bytes and ticks are checked by hand, their training in tests/test_local.
    "tiny": Size(8, 1, 8, 20, 2, 1, 1, (1e-2,), (5,), 2, variants=()),
}


def num_params(task) -> int:
    return sum(compression.leaf_sizes(task))


def link(task) -> fsq.delays.Bandwidth:
    """The slow link: the dense gradient takes :data:`LINK_SLOWDOWN` ticks to transmit."""
    return fsq.delays.bandwidth(4 * num_params(task) / LINK_SLOWDOWN, latency=LATENCY)


def transit(task, num_bytes: float) -> int:
    return link(task).for_message(int(num_bytes)).max_delay


def fragment_bytes(task, fragments: int) -> list[int]:
    """The bytes of each fragment of :func:`fsq.fragment_labels` (float32)."""
    sizes = compression.leaf_sizes(task)
    labels = jax.tree.leaves(
        fsq.fragment_labels(jax.eval_shape(task.init, jax.random.key(0)), fragments)
    )
    return [
        4 * sum(s for s, lab in zip(sizes, labels, strict=True) if lab == f)
        for f in range(fragments)
    ]


class Method(NamedTuple):
    """A method: its transform, its bytes and its ticks per step on the slow link."""

    make_tx: training.MakeTx
    bytes_per_step: float  # mean over steps, per worker
    peak_bytes: float
    ticks_per_step: float


def methods(task, size: Size) -> dict[str, Method]:
    if unknown := [v for v in size.variants if v not in VARIANTS]:
        raise ValueError(f"local variants are {VARIANTS}, got {unknown}")
    dense = 4 * num_params(task)
    out = {
        SYNCHRONOUS: Method(
            lambda hp, seed: training.flying_squirrel(
                optax.adamw(hp["learning_rate"]), WORKERS, seed, **base.OFF
            ),
            dense,
            dense,
            1 + transit(task, dense),
        )
    }
    for h in size.rounds:
        out[f"DiLoCo H={h}"] = Method(
            lambda hp, seed, h=h: fsq.diloco(
                optax.adamw(hp["learning_rate"]),
                num_workers=WORKERS,
                steps=h,
                **training.on_trainer(seed),
            ),
            dense / h,
            dense,
            1 + transit(task, dense) / h,
        )
    if "streaming DiLoCo" in size.variants:
        h = min(STREAM["steps"], size.steps // 2)
        h -= h % size.fragments
        peak = max(fragment_bytes(task, size.fragments))
        overlap = min(transit(task, peak), h - 1)
        out[f"streaming DiLoCo H={h}, F={size.fragments}"] = Method(
            lambda hp, seed, h=h: fsq.streaming_diloco(
                optax.adamw(hp["learning_rate"]),
                num_workers=WORKERS,
                steps=h,
                fragments=size.fragments,
                overlap=overlap,
                mixing=STREAM["mixing"],
                **training.on_trainer(seed),
            ),
            dense / h,
            peak,
            1 + max(0, transit(task, peak) - overlap) / (h // size.fragments),
        )
    if "async local SGD" in size.variants:
        h = min(ASYNC_STEPS, size.steps // 2)
        out[f"async local SGD H={h}"] = Method(
            lambda hp, seed, h=h: fsq.async_local_sgd(
                optax.adamw(hp["learning_rate"]),
                num_workers=WORKERS,
                steps=h,
                delay=transit(task, dense),
                **training.on_trainer(seed),
            ),
            dense / h,
            dense,
            1 + (transit(task, dense) - LATENCY) / h,
        )
    top_k = TOP_K.payload_bytes(compression.leaf_sizes(task))
    out["flying squirrel + top-k 1% + EF"] = Method(
        lambda hp, seed: training.flying_squirrel(
            optax.adamw(hp["learning_rate"]), WORKERS, seed, compression=TOP_K, delay=link(task)
        ),
        top_k,
        top_k,
        max(1, transit(task, top_k) - LATENCY),
    )
    return out


def run(settings: base.Settings) -> list[records.Record]:
    """Runs the study at ``settings.scale``; returns one record per run."""
    size = settings.size(NAME, SIZES)
    task = transformer.task(width=size.width, layers=size.layers, length=size.length)
    out, params = [], num_params(task)
    for name, method in base.progress(methods(task, size).items(), settings, NAME):
        extend = 1 if name == SYNCHRONOUS else EXTEND
        outcome = training.train(
            task,
            method.make_tx,
            grid={"learning_rate": size.rates},
            seeds=settings.seeds_or(size.seeds),
            steps=extend * size.steps,
            num_workers=WORKERS,
            batch_size=size.batch,
            num_devices=settings.num_devices,
            test_points=extend * size.test_points,
        )
        out += records.from_outcome(
            outcome,
            task,
            study=NAME,
            workers=WORKERS,
            describe=lambda values, name=name, method=method: records.Run(
                name,
                {
                    "learning_rate": float(values["learning_rate"]),
                    "peak_bytes": method.peak_bytes,
                    "ticks_per_step": method.ticks_per_step,
                    "params": params,
                    "equal_compute_steps": size.steps,
                    "model": f"width {size.width}, {size.layers} layers, {size.length} tokens",
                },
                "none",
                bytes_per_step=method.bytes_per_step,
            ),
        )
    return out


def mean_curve(rows: list[Record]) -> np.ndarray:
    """The mean test loss above the floor over seeds, at each evaluation."""
    return np.mean([r.test_curve for r in rows], axis=0) - (rows[0].loss_floor or 0.0)


def at_equal_compute(rows: list[Record]) -> float:
    """The mean test loss above the floor after ``T`` steps (NaN if not finite)."""
    curve = mean_curve(rows)
    point = len(curve) * rows[0].hyperparameters["equal_compute_steps"] // rows[0].steps
    return float(curve[point - 1])


def best(rows: list[Record]) -> dict[str, list[Record]]:
    """Each method's runs at its best learning rate, by the loss after ``T`` steps."""
    out = {}
    for method, runs in group(rows, "method").items():
        by_rate = group(runs, "learning_rate")
        scores = {lr: at_equal_compute(r) for lr, r in by_rate.items()}
        out[method] = by_rate[min(scores, key=lambda lr: np.nan_to_num(scores[lr], nan=np.inf))]
    return out


def ticks_to_target(rows: list[Record], target: float) -> float:
    """Ticks until the mean test loss above the floor reaches ``target`` (inf if never)."""
    curve = mean_curve(rows)
    hits = np.flatnonzero(curve <= target * (1 + 1e-9))
    if not hits.size:
        return math.inf
    steps = (hits[0] + 1) * rows[0].steps / len(curve)
    return steps * rows[0].hyperparameters["ticks_per_step"]


def time_ratio(ratio: float) -> str:
    return f"{ratio:.3f}x" if math.isfinite(ratio) else "not reached"


def section(rows: list[Record]) -> list[str]:
    runs = best(rows)
    sync = runs[SYNCHRONOUS]
    first = sync[0]
    sync_loss = at_equal_compute(sync)
    sync_time = ticks_to_target(sync, sync_loss)
    table = []
    for name, r in runs.items():
        loss = at_equal_compute(r)
        table.append(
            {
                "method": name,
                "lr": r[0].hyperparameters["learning_rate"],
                "test loss - floor": " ".join(filter(None, (f"{loss:.4f}", diverged_tag(r)))),
                "of synchronous": f"{100 * loss / sync_loss:.1f}%",
                "- synchronous": f"{loss - sync_loss:+.4f}",
                "bytes / step": f"{r[0].bytes_per_step:.4g}",
                "fewer bytes": f"{first.bytes_per_step / r[0].bytes_per_step:.1f}x",
                "peak bytes": f"{r[0].hyperparameters['peak_bytes']:.4g}",
                "time to target": time_ratio(ticks_to_target(r, sync_loss) / sync_time),
            }
        )
    return [
        "## Local steps: DiLoCo, streaming DiLoCo, async local SGD",
        "",
        f"The transformer ({first.hyperparameters['model']}, {first.hyperparameters['params']} "
        f"parameters), {first.workers} workers x {first.hyperparameters['batch_size']} "
        f"sequences, test loss above the chain's entropy rate after {first.steps} steps of "
        f"every worker (equal gradient computations), {seed_count(len(sync))}, each method at its "
        "best AdamW learning rate; bytes per worker. *Time to target*: simulated time "
        "until the test loss reaches synchronous training's final loss on the slow link, "
        f"relative to synchronous training (the others run on to {EXTEND} x "
        f"{first.steps} steps; the dense gradient takes {LINK_SLOWDOWN} compute steps to "
        "transmit; the time model is in the module docstring of `experiments.studies.local`). "
        "The entropy rate is the expected floor; a finite test set's own optimum (the true "
        "chain's loss on it) differs from it by about the test loss's sampling noise, so "
        "read the differences between methods (`- synchronous`) before ratios of small "
        "numbers.",
        "",
        *table_block("", table)[1:],
        image("local.png", "test loss above the floor against steps and simulated time"),
        "",
    ]


def plot(rows: list[Record], out: pathlib.Path) -> None:
    runs = best(rows)
    plt, fig, (by_steps, by_time) = figure(2, width=5.5)
    shown = []
    for i, (name, r) in enumerate(runs.items()):
        curve = mean_curve(r)
        steps = np.arange(1, len(curve) + 1) * r[0].steps / len(curve)
        finite = np.isfinite(curve)
        label = name + (" (div.)" if not finite.all() else "")
        ticks = steps * r[0].hyperparameters["ticks_per_step"]
        by_steps.plot(steps[finite], curve[finite], label=label, **style(i))
        by_time.plot(ticks[finite], curve[finite], label=label, **style(i))
        shown.append(curve[finite])
    for ax, label in (
        (by_steps, "steps (gradients per worker)"),
        (by_time, "simulated ticks, slow link"),
    ):
        loss_scale(ax, np.concatenate(shown))
        ax.set_xlabel(label)
        ax.set_ylabel("test loss - entropy floor")
        ax.grid(alpha=0.3)
    by_time.set_xscale("log")
    save(plt, fig, out / "local.png")
