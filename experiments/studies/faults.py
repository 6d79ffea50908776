"""faults: does training go on, and lose nothing, when workers crash, drop out or lie?

The measurement of fault tolerance: the MNIST-1D MLP, 8 workers, delays uniform up to 4
steps, SGD-momentum at the learning rate tuned for synchronous training (0.1, the
coordination study), Flying Squirrel's defaults otherwise. Runs: failure-free; 1 of 8
workers crash-stops mid-run; 20% Bernoulli drops; 1 and 2 Byzantine workers sending
``-4 g``, aggregated by the mean, the coordinate-wise median, the trimmed mean (trim
0.25: 2 of 8 votes cut at each end) and centered clipping. The robust rules run with
worker momentum ("learning from history", Karimireddy et al. 2021): the momentum moves
from the server to the workers, and ``sgd(lr / (1 - beta))`` with
``worker_momentum=beta`` is the same optimizer as ``momentum(lr, beta)`` (the
``failure-free, worker momentum`` row checks it), vote with every worker's latest
message, and mix each vote with its nearest neighbours first (``mixing=2``: for up to 2
bad votes of 8; see :mod:`fsq.aggregation`); two rows show the median and the trimmed
mean without mixing.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import fsq
from experiments import records, tasks, training
from experiments.presentation import (
    batch,
    metric_name,
    percent_of,
    seed_count,
    summary,
    table_block,
)
from experiments.records import Record, group
from experiments.studies import base

NAME = "faults"
WORKERS = 8
LEARNING_RATE, MOMENTUM = 0.1, 0.9


class Method(NamedTuple):
    """A fault scenario and the defence against it."""

    faults: Any  # a function of the run's steps -> fault models (None: failure-free)
    aggregation: Any = "mean"  # a name or a fsq.aggregation rule
    worker_momentum: bool = False


def _byzantine(count: int):
    return lambda steps: fsq.faults.byzantine(list(range(WORKERS - count, WORKERS)))


# The robust rules with nearest-neighbour mixing for up to 2 bad votes of 8.
MIXING = 2
MEDIAN = fsq.aggregation.median(mixing=MIXING)
TRIMMED_MEAN = fsq.aggregation.trimmed_mean(0.25, mixing=MIXING)
CENTERED_CLIP = fsq.aggregation.centered_clip(mixing=MIXING)
METHODS = {
    "failure-free": Method(None),
    "failure-free, worker momentum": Method(None, "mean", True),
    "1 of 8 crash-stops mid-run": Method(lambda steps: fsq.faults.crash([7], at=steps // 2)),
    "20% drops": Method(lambda steps: fsq.faults.drops(0.2)),
    "1 Byzantine, mean": Method(_byzantine(1)),
    "2 Byzantine, mean": Method(_byzantine(2)),
    "1 Byzantine, median": Method(_byzantine(1), MEDIAN, True),
    "2 Byzantine, median": Method(_byzantine(2), MEDIAN, True),
    "1 Byzantine, trimmed mean": Method(_byzantine(1), TRIMMED_MEAN, True),
    "2 Byzantine, trimmed mean": Method(_byzantine(2), TRIMMED_MEAN, True),
    "1 Byzantine, centered clipping": Method(_byzantine(1), CENTERED_CLIP, True),
    "2 Byzantine, centered clipping": Method(_byzantine(2), CENTERED_CLIP, True),
    "2 Byzantine, median, no mixing": Method(_byzantine(2), "median", True),
    "2 Byzantine, trimmed mean, no mixing": Method(_byzantine(2), "trimmed_mean", True),
}


class Size(NamedTuple):
    """Per scale: the task, steps, batch per worker, ``{delay: methods}`` and seeds."""

    task: str
    steps: int
    batch: int
    delays: dict[Any, tuple[str, ...]]
    seeds: int


SIZES = {
    "full": Size("mlp", 2000, 32, {"uniform(4)": tuple(METHODS)}, 3),
    "quick": Size(
        "mlp",
        600,
        32,
        {"uniform(4)": ("failure-free", "1 of 8 crash-stops mid-run", "2 Byzantine, mean")},
        2,
    ),
    "tiny": Size("quadratic", 20, 4, {2: ("failure-free", "1 Byzantine, median")}, 1),
}


def _delay_model(delay: Any) -> fsq.delays.DelayModel:
    return fsq.delays.uniform(4) if delay == "uniform(4)" else fsq.delays.constant(delay)


def _label(delay: Any) -> str:
    return delay if isinstance(delay, str) else f"constant({delay})"


def run(settings: base.Settings) -> list[records.Record]:
    """Runs the study at ``settings.scale``; returns one record per run."""
    size = settings.size(NAME, SIZES)
    task = tasks.get(size.task)
    out = []
    configs = [(d, m) for d, methods in size.delays.items() for m in methods]
    for delay, name in base.progress(configs, settings, NAME):
        method = METHODS[name]

        def make_tx(hp, seed, method=method, delay=delay):
            del hp
            faults = None if method.faults is None else method.faults(size.steps)
            if method.worker_momentum:  # momentum(lr, beta) == sgd(lr / (1 - beta)) + workers'
                inner = fsq.sgd(LEARNING_RATE / (1 - MOMENTUM))
                extra = {"worker_momentum": MOMENTUM}
            else:
                inner, extra = fsq.momentum(LEARNING_RATE, MOMENTUM), {}
            return training.flying_squirrel(
                inner,
                WORKERS,
                seed,
                delay=_delay_model(delay),
                faults=faults,
                aggregation=method.aggregation,
                **extra,
            )

        out += base.seeds_only(
            task,
            make_tx,
            records.Run(
                name,
                {"inner": "momentum", "learning_rate": LEARNING_RATE},
                _label(delay),
                3,  # the default's delay compensation sends 3 channels
            ),
            study=NAME,
            settings=settings,
            size=size,
            num_workers=WORKERS,
        )
    return out


def section(rows: list[Record]) -> list[str]:
    lines = [
        "## Faults",
        "",
        "Training with failing, dropping and Byzantine workers (Flying Squirrel's defaults, "
        "SGD-momentum at the synchronously tuned learning rate; the robust rules with worker "
        "momentum). The last column is the share of the failure-free accuracy kept.",
        "",
    ]
    for (task, delay), runs in group(rows, "task", "delay").items():
        by_method = group(runs, "method")
        clean = by_method["failure-free"]
        table = [
            {"scenario": m, metric_name(r[0]): summary(r), "of failure-free": percent_of(r, clean)}
            for m, r in by_method.items()
        ]
        lines += table_block(
            f"**{task}, delays {delay}** ({clean[0].workers} workers x {batch(clean[0])}, "
            f"{clean[0].steps} steps, {seed_count(len(clean))}):",
            table,
        )
    return lines
