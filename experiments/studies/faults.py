"""faults: does training go on, and lose nothing, when workers crash, drop out or lie?

The measurement of fault tolerance: the MNIST-1D MLP, 8 workers, delays on (uniform up to
4 steps, and a constant 2 steps, where every worker delivers at every step), SGD-momentum
at the learning rate tuned for synchronous training (0.1, the coordination study), Flying
Squirrel's defaults otherwise. Runs: failure-free; 1 of 8 workers crash-stops mid-run;
20% Bernoulli drops; 1 and 2 Byzantine workers sending ``-4 g``, aggregated by the mean,
the coordinate-wise median, the trimmed mean and centered clipping. The robust rules run
with worker momentum ("learning from history", Karimireddy et al. 2021): the momentum
moves from the server to the workers, and ``sgd(lr / (1 - beta))`` with
``worker_momentum=beta`` is the same optimizer as ``momentum(lr, beta)`` (the
``failure-free, worker momentum`` row checks it).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import fsq
from experiments import records, tasks, training
from experiments.studies import base

NAME = "faults"
WORKERS = 8
LEARNING_RATE, MOMENTUM = 0.1, 0.9


class Method(NamedTuple):
    """A fault scenario and the defence against it."""

    faults: Any  # a function of the run's steps -> fault models (None: failure-free)
    aggregation: str = "mean"
    worker_momentum: bool = False


def _byzantine(count: int):
    return lambda steps: fsq.faults.byzantine(list(range(WORKERS - count, WORKERS)))


METHODS = {
    "failure-free": Method(None),
    "failure-free, worker momentum": Method(None, "mean", True),
    "1 of 8 crash-stops mid-run": Method(lambda steps: fsq.faults.crash([7], at=steps // 2)),
    "20% drops": Method(lambda steps: fsq.faults.drops(0.2)),
    "1 Byzantine, mean": Method(_byzantine(1)),
    "2 Byzantine, mean": Method(_byzantine(2)),
    "1 Byzantine, median": Method(_byzantine(1), "median", True),
    "2 Byzantine, median": Method(_byzantine(2), "median", True),
    "2 Byzantine, trimmed mean 0.4": Method(_byzantine(2), "trimmed_mean_0.4", True),
    "1 Byzantine, centered clipping": Method(_byzantine(1), "centered_clip", True),
    "2 Byzantine, centered clipping": Method(_byzantine(2), "centered_clip", True),
}
AGGREGATIONS = {"trimmed_mean_0.4": fsq.aggregation.trimmed_mean(0.4)}


class Size(NamedTuple):
    """Per scale: the task, steps, batch per worker, ``{delay: methods}`` and seeds."""

    task: str
    steps: int
    batch: int
    delays: dict[Any, tuple[str, ...]]
    seeds: int


# With a constant delay every worker delivers at every step, so every step has all 8
# votes; with random delays a step has fewer, and more of them may be Byzantine.
EVERY_VOTE = (
    "failure-free",
    "2 Byzantine, mean",
    "2 Byzantine, median",
    "2 Byzantine, trimmed mean 0.4",
    "2 Byzantine, centered clipping",
)
SIZES = {
    "full": Size("mlp", 2000, 32, {"uniform(4)": tuple(METHODS), 2: EVERY_VOTE}, 3),
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
    size = SIZES[settings.scale]
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
            aggregation = AGGREGATIONS.get(method.aggregation, method.aggregation)
            return training.flying_squirrel(
                inner,
                WORKERS,
                seed,
                delay=_delay_model(delay),
                faults=faults,
                aggregation=aggregation,
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
