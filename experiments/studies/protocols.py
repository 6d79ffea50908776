"""protocols: the coordination claim over a grid of protocols, with a held-out half.

The coordination protocol of the staleness study (learning rate tuned for synchronous
training over a few rates and frozen, then delays added without retuning), repeated on
*cells* (task, steps, batch per worker, inner optimizer) sampled from the grid
:data:`TASKS` x :data:`BUDGETS` x :data:`BATCHES` x :data:`INNERS`, under every kind of
:data:`ASYNCHRONY`. The sample is drawn with an explicit seed among the cells whose cost
(steps x batch x the task's relative cost per example) fits a budget, and split in two:
methods are chosen on the *tuning* cells with the tuning seeds, and reported on the
*held-out* cells with other seeds.

Asynchrony comes in two kinds: delays (:data:`DELAYS`, every worker sends every step and
its gradient arrives after a random number of steps), and workers computing in time at
the time study's compute profiles (:data:`PROFILES`: a worker sends when its job ends,
the server steps on whatever arrived, and staleness counts its steps). A run in time gets
as many gradients as synchronous training computes in the cell: ``steps x W`` over the
jobs the cluster starts per tick, rounded up, in ticks.

The score of a method in a cell is its headline metric in % of synchronous training's
(accuracy ratio for classifiers; for a loss with a known floor, synchronous training's
loss above the floor over the method's, so that 50% means twice as far from the floor).
A diverged seed fails its cell.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import fsq
from experiments import records, tasks, training
from experiments.presentation import converged, figure, save, table_block
from experiments.records import Record, group, higher_is_better, mean
from experiments.studies import base, wallclock
from experiments.studies.base import SYNCHRONOUS, SYNCHRONOUS_METHOD

NAME = "protocols"
WORKERS = 8
IN_BYTES_PLOT = False

TASKS = ("mlp", "cnn", "transformer", "logistic")
BUDGETS = (600, 2000, 6000)
BATCHES = (8, 32, 100)
INNERS = ("momentum", "nesterov", "adam", "rmsprop")
# Relative cost of one example's gradient (measured on a 2-core CPU, rounded).
COST = {"logistic": 0.5, "mlp": 1.0, "cnn": 5.0, "transformer": 60.0, "quadratic": 0.1}

DELAYS = {
    "uniform(4)": fsq.delays.uniform(4),
    "uniform(16)": fsq.delays.uniform(16),
    "uniform(64)": fsq.delays.uniform(64),
    "heavy-tailed(64)": fsq.delays.heavy_tailed(64),
}
# Workers computing in time, with the time study's compute profiles (wallclock.profile):
# a worker sends when its job ends, and staleness counts the server's inner steps.
PROFILES = {"profile sqrt": "sqrt", "profile straggler": "straggler"}
TICKS_PER_SECOND = 1  # the simulator steps every tick: finer ticks cost as many more steps
ASYNCHRONY = (*DELAYS, *PROFILES)
LOOK_AHEAD = 8.0  # fsq.look_ahead's horizon, steps
MOMENTUM_INNERS = frozenset({"momentum", "nesterov", "adam"})  # their last update is smooth
EVERY_INNER = frozenset(base.CATALOGUE)
GRADIENT_SCOPE_AHEAD = "flying squirrel + look-ahead, gradient scope (momentum inners)"


class Method(NamedTuple):
    """A method of the study: ``fsq.flying_squirrel``'s keywords, the inners it wraps in
    ``fsq.look_ahead``, whether the inner's momentum is lowered by what asynchrony adds
    (``fsq.momentum_under_delay``, at the mean staleness of the delays or profile), and
    the keywords for the inners it wraps, where they differ."""

    keywords: dict[str, Any]
    ahead: frozenset[str] = frozenset()
    momentum_under_delay: bool = False
    ahead_keywords: dict[str, Any] | None = None  # replace ``keywords`` for ``ahead``

    def keywords_for(self, inner: str) -> dict[str, Any]:
        """``fsq.flying_squirrel``'s keywords for the catalogue's ``inner``."""
        if inner in self.ahead and self.ahead_keywords is not None:
            return self.ahead_keywords
        return self.keywords


METHODS: dict[str, Method] = {
    "plain async": Method(base.OFF),
    "DC-ASGD-a": Method({**base.OFF, "compensation": "adaptive"}),  # Zheng et al. 2017
    "inverse": Method({**base.OFF, "staleness": "inverse"}),  # Zhang et al. 2016
    "look-ahead": Method(base.OFF, EVERY_INNER),  # DANA's idea, Hakimi et al. 2019
    "flying squirrel": Method({}),  # the defaults: weighted step + DC-ASGD-a
    "flying squirrel + look-ahead": Method({}, EVERY_INNER),
    # Chosen on the tuning half: look-ahead hurts RMSProp there, whose last update is noise.
    "flying squirrel + look-ahead (momentum inners)": Method({}, MOMENTUM_INNERS),
    # Mitliagkas et al. 2016: asynchrony begets momentum. Probed on held-out cells first.
    "flying squirrel, momentum less asynchrony's": Method({}, momentum_under_delay=True),
    # Chosen on the tuning half: the step scope scales each update by the weight delivered,
    # which varies from step to step, and look-ahead extrapolates that noise; RMSProp keeps
    # the defaults (in the gradient scope it loses CNN 600 x 32 at uniform(16) and (64)).
    GRADIENT_SCOPE_AHEAD: Method(
        {},
        MOMENTUM_INNERS,
        ahead_keywords={"staleness": fsq.staleness.delay_adaptive(3.0)},
    ),
}
PUBLISHED = ("DC-ASGD-a", "inverse", "look-ahead")  # single published techniques
# A method "retuned" also runs at rates around the frozen one (half-decade steps of the
# grid 1, 3, 10, ...: -3 is a thirtieth, +2 ten times) under every delay and scores its
# best rate per cell and delay: an oracle (the rate is chosen on the runs it is scored
# on), the most any rule that only scales the step could reach.
RETUNED_STEPS = (-3, -2, -1, 0, 1, 2)


# Synchronous training stopped at the share of its steps that a delayed run can chain
# (fresh_chain): what a delayed method could keep if the task were the worst case.
BOUND = "synchronous for the delays' fresh chain (worst-case bound)"


def fresh_chain(model: fsq.delays.Categorical, workers: int) -> float:
    r"""The share of synchronous training's sequential gradient rounds that ``workers``
    workers, each sending every step with independent delays drawn from ``model``, can
    chain per step.

    A gradient sent at step :math:`s` with delay :math:`d` first moves the parameters of
    step :math:`s + d + 1`. A chain of gradients, each computed at parameters the
    previous one moved, grows by a link from the first step :math:`t` whose parameters
    hold it to the earliest delivery of the gradients sent from then on: every
    :math:`1 + A` steps, :math:`A = \min_{j \ge 0} (j + \min_i d_{t+j,i})`, so that

    .. math::

      \text{share} = \frac{1}{1 + \mathbb{E}[A]}, \qquad
      \mathbb{E}[A] = \sum_{a \ge 0} \prod_{k=0}^{a} P(d > k)^W.

    On the worst-case functions of Nesterov's lower bound (*Introductory Lectures on
    Convex Optimization*, 2004, section 2.1.2) a first-order method's progress is bounded
    by the length of this chain (a gradient reveals one coordinate more than the point it
    was computed at), so no delayed method can do better there than synchronous training
    with this share of its steps; on easier functions it can. (Arjevani, Shamir and
    Srebro, *A Tight Convergence Analysis for Stochastic Gradient Descent with Delayed
    Updates*, ALT 2020, show delayed gradient descent without noise as bad as gradient
    descent on a :math:`1/\tau` share of the gradients.)
    """
    p = np.asarray(model.probabilities, np.float64)
    later = np.clip(1.0 - np.cumsum(p / p.sum()), 0.0, 1.0) ** workers  # P(min_i d_i > k)
    return 1.0 / (1.0 + float(np.sum(np.cumprod(later))))


def retuned(method: str) -> str:
    """The name of ``method`` with its learning rate tuned under each delay (an oracle)."""
    return f"{method}, rate tuned under delay (oracle)"


class Cell(NamedTuple):
    """A protocol: a task trained for ``steps`` with ``batch`` examples per worker and
    step, by ``inner`` at its synchronously tuned learning rate."""

    task: str
    steps: int
    batch: int
    inner: str

    def __str__(self) -> str:
        return f"{self.task} {self.steps}x{self.batch} {self.inner}"


def cells_within(cost: float) -> list[Cell]:
    """Every cell of the grid whose cost, steps x batch x COST[task], is at most ``cost``."""
    grid = itertools.product(TASKS, BUDGETS, BATCHES, INNERS)
    return [Cell(*c) for c in grid if c[1] * c[2] * COST[c[0]] <= cost]


def sample(per_task: int, cost: float, seed: int) -> tuple[tuple[Cell, ...], tuple[Cell, ...]]:
    """``2 * per_task`` cells of each task drawn without replacement among
    :func:`cells_within` ``cost``, with ``seed``: (tuning half, held-out half), each with
    ``per_task`` cells of every task."""
    rng = np.random.default_rng(seed)
    halves: tuple[list[Cell], list[Cell]] = ([], [])
    for task in TASKS:
        pool = [c for c in cells_within(cost) if c.task == task]
        if len(pool) < 2 * per_task:
            raise ValueError(
                f"{task} has {len(pool)} cells within cost {cost}, fewer than 2 x {per_task}"
            )
        chosen = [pool[i] for i in rng.permutation(len(pool))[: 2 * per_task]]
        halves[0].extend(chosen[:per_task])
        halves[1].extend(chosen[per_task:])
    return tuple(halves[0]), tuple(halves[1])


@dataclasses.dataclass(frozen=True)
class OneOf(fsq.delays.DelayModel):
    """The delays of ``models[index]`` (Categorical models) for a traced ``index``: every
    kind of asynchrony is one program."""

    table: tuple[tuple[float, ...], ...] = ((1.0,),)
    index: jax.Array | int = 0

    def __call__(self, key, step, worker):
        del step, worker
        with np.errstate(divide="ignore"):
            logits = np.log(np.asarray(self.table, np.float64))
        row = jnp.asarray(logits, jnp.float32)[self.index]
        return jax.random.categorical(key, row).astype(jnp.int32)

    @property
    def mean_delay(self) -> jax.Array:
        """The mean delay of ``models[index]`` (traced with ``index``)."""
        table = np.asarray(self.table, np.float64)
        means = table @ np.arange(table.shape[1]) / table.sum(axis=1)
        return jnp.asarray(means, jnp.float32)[self.index]


def one_of(models: list[fsq.delays.Categorical], index: jax.Array) -> OneOf:
    """The delays of ``models[index]``, their tables padded to the longest."""
    width = max(m.max_delay for m in models) + 1
    table = tuple(tuple(m.probabilities) + (0.0,) * (width - m.max_delay - 1) for m in models)
    return OneOf(max_delay=width - 1, table=table, index=index)


HALVES = ("tuning", "held-out")


class Size(NamedTuple):
    """Per scale: the tuning and held-out cells, their seeds, methods, asynchrony, rates,
    the halves whose cells also run the compute profiles of ``asynchrony`` (the simulator
    steps every tick: they cost several times a kind of delay), and the methods whose
    rate is also tuned under each delay on the held-out cells (:func:`retuned`)."""

    tuning: tuple[Cell, ...]
    held_out: tuple[Cell, ...]
    tuning_seeds: tuple[int, ...]
    held_out_seeds: tuple[int, ...]
    methods: tuple[str, ...]
    asynchrony: tuple[str, ...]
    rates: int
    in_time: tuple[str, ...] = ("held-out",)
    retuned: tuple[str, ...] = ()
    retuned_steps: tuple[int, ...] = RETUNED_STEPS
    bound: bool = False


_FULL = sample(2, 600_000, seed=0)
SIZES = {
    "full": Size(
        *_FULL,
        (0, 1),
        (2, 3),
        tuple(METHODS),
        tuple(ASYNCHRONY),
        3,
        retuned=("flying squirrel",),
        bound=True,
    ),
    "quick": Size(
        (Cell("mlp", 600, 32, "momentum"),),  # a tuning cell of the full scale
        (Cell("logistic", 600, 32, "nesterov"),),  # a held-out one
        (0,),
        (2,),
        (
            "plain async",
            "inverse",
            "flying squirrel",
            "flying squirrel + look-ahead",
            "flying squirrel, momentum less asynchrony's",
        ),
        ("uniform(16)", "uniform(64)", "profile sqrt"),
        3,
    ),
    "tiny": Size(
        (Cell("quadratic", 20, 4, "momentum"),),
        (Cell("quadratic", 40, 8, "nesterov"),),
        (0,),
        (1,),
        ("plain async", "flying squirrel + look-ahead"),
        ("uniform(4)", "heavy-tailed(64)"),
        2,
        retuned=("flying squirrel",),
        retuned_steps=(-1, 0, 1),
    ),
}


def run(settings: base.Settings) -> list[records.Record]:
    """Runs the study at ``settings.scale``; returns one record per run."""
    size = settings.size(NAME, SIZES)
    for name, known, given in (
        ("methods", METHODS, size.methods),
        ("retuned methods", METHODS, size.retuned),
        ("asynchrony", ASYNCHRONY, size.asynchrony),
        ("in_time halves", HALVES, size.in_time),
    ):
        if unknown := [m for m in given if m not in known]:
            raise ValueError(f"protocols {name} are {tuple(known)}, got {unknown}")
    delays = [k for k in size.asynchrony if k in DELAYS]
    halves = {
        f"{Cell(*c)} ({h})": (h, Cell(*c), s)  # --set gives cells as plain tuples
        for h, cells, s in (
            ("tuning", size.tuning, size.tuning_seeds),
            ("held-out", size.held_out, size.held_out_seeds),
        )
        for c in cells
    }
    out = []
    for label in base.progress(halves, settings, NAME):
        half, cell, seeds = halves[label]
        seeds = settings.seeds or seeds
        tuning = synchronous(cell, half, seeds, size, settings)
        out += tuning
        learning_rate = records.best_rate(tuning)
        kinds = [a for a in size.asynchrony if a in DELAYS or half in size.in_time]
        for method in size.methods:
            out += delayed(cell, half, seeds, learning_rate, method, kinds, settings)
        for method in size.retuned if half == "held-out" and delays else ():
            rates = rates_around(learning_rate, size.retuned_steps)
            fields = {"inner": cell.inner, "half": half}
            out += _delays(cell, seeds, method, delays, fields, settings, rates)
        if size.bound and half == "held-out":
            out += bound(cell, seeds, learning_rate, delays, settings)
    return out


def bound(cell: Cell, seeds, learning_rate, kinds, settings) -> list[records.Record]:
    """Synchronous training at the frozen ``learning_rate`` for the :func:`fresh_chain`
    share of ``cell``'s steps under each delay of ``kinds`` (:data:`BOUND`, scored in
    ``cell`` by its ``budget``)."""

    def make_tx(hp, seed):
        del hp
        return _synchronous_tx(cell.inner, learning_rate, seed)

    out = []
    for kind in kinds:
        steps = max(1, round(cell.steps * fresh_chain(DELAYS[kind], WORKERS)))
        outcome = _train(cell, make_tx, {}, seeds, settings, steps=steps)
        fields = {
            "inner": cell.inner,
            "half": "held-out",
            "learning_rate": learning_rate,
            "budget": cell.steps,
        }
        out += _records(outcome, cell, lambda values, f=fields, k=kind: records.Run(BOUND, f, k))
    return out


def rates_around(learning_rate: float, steps: tuple[int, ...]) -> tuple[float, ...]:
    """The rates ``steps`` half-decades from ``learning_rate`` on the grid 1, 3, 10, ...
    (1e-6 to 30)."""
    if not steps:
        raise ValueError("retuned_steps must name at least one half-decade step, got ()")
    reach = max(abs(k) for k in steps)
    grid = base.learning_rates(learning_rate, 2 * reach + 1)
    if len(grid) < 2 * reach + 1 or grid[reach] != learning_rate:
        raise ValueError(
            f"retuned_steps {steps} from learning rate {learning_rate} need a rate of the grid"
            " whose steps stay within 1e-6 to 30"
        )
    return tuple(grid[reach + k] for k in steps)


def _train(cell: Cell, make_tx, grid, seeds, settings: base.Settings, **kwargs) -> training.Outcome:
    kwargs = {"steps": cell.steps, "num_devices": settings.num_devices, **kwargs}
    return training.train(
        tasks.get(cell.task),
        make_tx,
        grid=grid,
        seeds=seeds,
        num_workers=WORKERS,
        batch_size=cell.batch,
        **kwargs,
    )


def _records(outcome, cell: Cell, describe) -> list[records.Record]:
    task = tasks.get(cell.task)
    return records.from_outcome(outcome, task, study=NAME, workers=WORKERS, describe=describe)


def _synchronous_tx(inner: str, learning_rate, seed) -> Any:
    """Synchronous training's per-worker transformation of the catalogue's ``inner``."""
    optimizer = base.catalogue_optimizer(inner, learning_rate)
    return training.flying_squirrel(optimizer, WORKERS, seed, **base.OFF)


def synchronous(cell: Cell, half: str, seeds, size: Size, settings) -> list[records.Record]:
    """The learning-rate sweep of synchronous training in ``cell``."""

    def make_tx(hp, seed):
        return _synchronous_tx(cell.inner, hp["learning_rate"], seed)

    rates = base.learning_rates(base.CATALOGUE[cell.inner][1], size.rates)
    outcome = _train(cell, make_tx, {"learning_rate": rates}, seeds, settings)
    cell_fields = {"inner": cell.inner, "half": half}
    return _records(
        outcome,
        cell,
        lambda values: records.Run(SYNCHRONOUS_METHOD, {**cell_fields, **values}, SYNCHRONOUS),
    )


def transform(inner: str, learning_rate, method: str, delay, seed, **timing) -> Any:
    """``method``'s per-worker transformation of the catalogue's ``inner`` under ``delay``
    (and ``timing``: ``compute=`` a compute profile)."""
    spec = METHODS[method]
    staleness = None
    if spec.momentum_under_delay:
        staleness = (
            timing["compute"].mean_staleness(WORKERS)
            if timing
            else fsq.delays.as_delay_model(delay).mean_delay
        )
    optimizer = base.catalogue_optimizer(inner, learning_rate, staleness)
    keywords = spec.keywords_for(inner)
    tx = training.flying_squirrel(optimizer, WORKERS, seed, delay=delay, **timing, **keywords)
    return fsq.look_ahead(tx, LOOK_AHEAD) if inner in spec.ahead else tx


def _channels(method: str, inner: str) -> int:
    """The dense channels ``method``'s workers send with ``inner`` (compensation sends
    three)."""
    compensation = METHODS[method].keywords_for(inner).get("compensation", "adaptive")
    return 1 if compensation is None else 3


def delayed(cell, half, seeds, learning_rate, method, kinds, settings) -> list[records.Record]:
    """``method`` at the frozen ``learning_rate`` under ``kinds`` of asynchrony: every kind
    of delay in one program, each compute profile in one of its own."""
    delays = [k for k in kinds if k in DELAYS]
    cell_fields = {"inner": cell.inner, "half": half, "learning_rate": learning_rate}
    out = [] if not delays else _delays(cell, seeds, method, delays, cell_fields, settings)
    for kind in (k for k in kinds if k in PROFILES):
        out += _profile(cell, seeds, method, kind, cell_fields, settings)
    return out


def _delays(cell, seeds, method, kinds, cell_fields, settings, rates=()) -> list[records.Record]:
    """``method`` under every kind of delay of ``kinds`` in one program: at
    ``cell_fields["learning_rate"]``, or when ``rates`` are given at each of them (and
    named :func:`retuned`)."""
    models = [DELAYS[k] for k in kinds]
    grid = {"asynchrony": tuple(range(len(models)))} | ({"learning_rate": rates} if rates else {})

    def make_tx(hp, seed):
        delay = one_of(models, hp["asynchrony"].astype(jnp.int32))
        rate = hp["learning_rate"] if rates else cell_fields["learning_rate"]
        return transform(cell.inner, rate, method, delay, seed)

    def describe(values):
        kind = kinds[int(values["asynchrony"])]
        if not rates:
            return records.Run(method, cell_fields, kind, _channels(method, cell.inner))
        fields = {**cell_fields, "learning_rate": values["learning_rate"]}
        return records.Run(retuned(method), fields, kind, _channels(method, cell.inner))

    outcome = _train(cell, make_tx, grid, seeds, settings)
    return _records(outcome, cell, describe)


def _profile(cell, seeds, method, kind, cell_fields, settings) -> list[records.Record]:
    """``method`` with workers in time under the compute profile ``kind``, for as many
    gradients as synchronous training computes in ``cell`` (ticks: ``cell.steps`` x
    ``WORKERS`` over the jobs started per tick)."""
    timing = wallclock.profile(PROFILES[kind], WORKERS, cell.steps, TICKS_PER_SECOND)
    per_tick = wallclock.starts_per_tick(timing.compute)

    def make_tx(hp, seed):
        del hp
        return transform(
            cell.inner, cell_fields["learning_rate"], method, 0, seed, compute=timing.compute
        )

    outcome = _train(
        cell,
        make_tx,
        {},
        seeds,
        settings,
        steps=math.ceil(cell.steps * WORKERS / per_tick),
        # The cheapest layout of a clock: one device, only the workers that start a job.
        num_devices=1,
        gradient_slots=math.ceil(per_tick),
    )
    fields = {**cell_fields, "profile": PROFILES[kind], "budget": cell.steps}
    return _records(
        outcome,
        cell,
        lambda values: records.Run(method, fields, kind, _channels(method, cell.inner)),
    )


# --- Report ----------------------------------------------------------------------------


def percent(rows: list[Record], sync: list[Record]) -> float | None:
    """``rows``' headline metric in % of ``sync``'s (see the module docstring); ``None``
    when a seed diverged."""
    if len(converged(rows)) < len(rows) or not converged(sync):
        return None
    ratio = mean(rows) / mean(sync)
    return 100 * (ratio if higher_is_better(rows[0]) else 1 / ratio)


def cell_of(record: Record) -> Cell:
    """The cell of one of the study's runs (a run in time counts ticks: its cell's steps are
    its ``budget``)."""
    h = record.hyperparameters
    return Cell(record.task, h.get("budget", record.steps), h["batch_size"], h["inner"])


def _pairs(rows: list[Record], half: str) -> dict[tuple[str, str], tuple[list[Record], dict]]:
    """``{(cell, asynchrony): (synchronous runs, {method: runs})}`` for the cells of
    ``half``: synchronous training at its tuned rate, each method at its best rate."""
    out: dict[tuple[str, str], tuple[list[Record], dict]] = {}
    cells: dict[Cell, list[Record]] = {}
    for r in rows:
        if r.hyperparameters["half"] == half:
            cells.setdefault(cell_of(r), []).append(r)
    for cell, runs in cells.items():
        sync_runs = [r for r in runs if r.method == SYNCHRONOUS_METHOD]
        sync = group(sync_runs, "learning_rate")[records.best_rate(sync_runs)]
        delayed = [r for r in runs if r.method != SYNCHRONOUS_METHOD]
        for delay, pair in group(delayed, "delay").items():
            out[(str(cell), delay)] = (
                sync,
                {
                    m: group(v, "learning_rate")[records.best_rate(v)]
                    for m, v in group(pair, "method").items()
                },
            )
    return out


def scores(rows: list[Record], half: str) -> dict[tuple[str, str], dict[str, float | None]]:
    """``{(cell, asynchrony): {method: % of synchronous}}`` for the cells of ``half``; a
    method run at several rates (:func:`retuned`) scores its best."""
    return {
        pair: {m: percent(runs, sync) for m, runs in methods.items()}
        for pair, (sync, methods) in _pairs(rows, half).items()
    }


def seed_scores(rows: list[Record], half: str) -> dict[tuple[str, str], dict[str, list]]:
    """As :func:`scores`, each seed scored on its own against synchronous training's mean:
    ``{(cell, asynchrony): {method: [% of synchronous or None (diverged), per seed]}}``,
    synchronous training's own seeds included (under ``SYNCHRONOUS_METHOD``)."""
    return {
        pair: {
            m: [percent([r], sync) for r in runs]
            for m, runs in {SYNCHRONOUS_METHOD: sync, **methods}.items()
        }
        for pair, (sync, methods) in _pairs(rows, half).items()
    }


def _halves(rows: list[Record]) -> list[str]:
    """The halves ``rows`` hold, held-out first."""
    return [h for h in ("held-out", "tuning") if any(r.hyperparameters["half"] == h for r in rows)]


def _methods(table: dict[tuple[str, str], dict[str, float | None]]) -> list[str]:
    """The methods of a :func:`scores` table, in order of first appearance."""
    return list(dict.fromkeys(m for v in table.values() for m in v))


def _text(value: float | None) -> str:
    return "div." if value is None else f"{value:.0f}"


def verdict(
    table: dict[tuple[str, str], dict[str, float | None]],
    method: str,
    seeds: dict[tuple[str, str], dict[str, list]] | None = None,
) -> dict[str, Any]:
    """How ``method`` fares over ``table``'s cells: median, worst cell, the share of cells
    at or above 95% (up to uniform(16)) and 90% (every kind), and against the best single
    published technique of each cell; with ``seeds`` (:func:`seed_scores`), also the
    share of those cells where a published technique is better beyond seed noise (its
    every seed above the method's every seed, or the method diverged and it did not), and
    the shares at 95% and 90% with seed noise allowed (no seed diverged and the method's
    best seed reaches the level or synchronous training's lowest seed, whichever is
    lower)."""
    values = {k: v.get(method) for k, v in table.items() if method in v}
    finite = [x for x in values.values() if x is not None]
    worst = min(values, key=lambda k: -np.inf if values[k] is None else values[k])
    mild = [k for k in values if k[1] in ("uniform(4)", "uniform(16)")]
    published = [p for p in PUBLISHED if p != method]
    paired = [k for k in values if any(p in table[k] for p in published)]
    wins = [
        k
        for k in paired
        if values[k] is not None
        and all(table[k].get(p) is None or values[k] >= table[k][p] for p in published)
    ]

    def beyond_noise(k: tuple[str, str]) -> bool:
        ours = seeds[k][method]
        return any(
            None not in theirs and (None in ours or min(theirs) > max(ours))
            for theirs in (seeds[k][p] for p in published if p in seeds[k])
        )

    def within_noise(k: tuple[str, str], level: float) -> bool:
        ours = seeds[k][method]
        theirs = [x for x in seeds[k][SYNCHRONOUS_METHOD] if x is not None]
        return None not in ours and max(ours) >= min([level, *theirs])

    def share(keys: list, passes) -> float | None:
        return None if seeds is None else sum(map(passes, keys)) / max(1, len(keys))

    return {
        "median": float(np.median(finite)) if finite else None,
        "worst": (worst, values[worst]),
        "mild_95": sum(values[k] is not None and values[k] >= 95 for k in mild) / max(1, len(mild)),
        "all_90": sum(x is not None and x >= 90 for x in values.values()) / len(values),
        "mild_95_noise": share(mild, lambda k: within_noise(k, 95)),
        "all_90_noise": share(list(values), lambda k: within_noise(k, 90)),
        "beats_published": len(wins) / len(paired) if paired else None,
        "beaten_beyond_noise": share(paired, beyond_noise) if paired else None,
        "diverged": sum(x is None for x in values.values()),
    }


TIMED_TEXT = (
    " `profile sqrt` and `profile straggler`: workers computing in time at the time study's "
    f"compute profiles ({TICKS_PER_SECOND} tick a second: a job of worker i = 1..W takes "
    "round(sqrt(i)) ticks; or one worker 10 ticks, the others 1), each sending when its job "
    "ends, for as many gradients as synchronous training computes (ticks: steps x W over "
    "the jobs started per tick); staleness counts the server's steps."
)


RETUNED_TEXT = (
    f" `{retuned('...')}`: the method run under each delay at the frozen rate and at "
    f"{len(RETUNED_STEPS) - 1} rates around it ({', '.join(f'{k:+d}' for k in RETUNED_STEPS if k)}"
    " half-decades; held-out cells), scored at its best: an oracle for any rule that only "
    "scales the step, not a method."
)


BOUND_TEXT = (
    f" `{BOUND}`: synchronous training at the frozen rate stopped at the share of its steps "
    "that a delayed run can chain (a chain of gradients, each computed where the last one "
    "moved the parameters, grows a link per 1 + min over j >= 0 of j + the freshest delay "
    "of step t + j; held-out cells): what a delayed method could keep if the task were a "
    "worst case for delays, not a method."
)


def section(rows: list[Record]) -> list[str]:
    halves = _halves(rows)
    lines = [
        "## Protocols",
        "",
        "The coordination protocol (learning rate tuned for synchronous training, frozen, "
        f"then delays) on cells sampled from the grid tasks {TASKS} x steps {BUDGETS} x "
        f"batch per worker {BATCHES} x inners {INNERS}, {WORKERS} workers. Methods were "
        "chosen on the tuning cells; the held-out cells, with other seeds, are the result. "
        "Scores: % of synchronous (accuracy ratio; for a loss with a floor, synchronous "
        "loss above the floor over the method's); `div.` = a seed diverged. `as good as "
        "each published`: cells where the method's mean is at least that of each of "
        f"{', '.join(PUBLISHED)}; "
        "`a published one better beyond seed noise`: cells where one of them scores above "
        "the method on every seed (each seed scored against synchronous training's mean), "
        "or the method diverged and it did not. `the same, seed noise allowed`: the two "
        "shares before it, a cell passing when no seed diverged and the method's best seed "
        "reaches 95% (90%) or synchronous training's lowest seed, whichever is lower."
        + (TIMED_TEXT if any(records.timed(r) for r in rows) else "")
        + (RETUNED_TEXT if any(r.method.endswith(retuned("")) for r in rows) else "")
        + (BOUND_TEXT if any(r.method == BOUND for r in rows) else ""),
        "",
        "![% of synchronous per cell and method](protocols.png)",
        "",
    ]
    for half in halves:
        table, seeds = scores(rows, half), seed_scores(rows, half)
        methods = _methods(table)
        lines += table_block(
            f"**{half} cells** (% of synchronous):",
            [
                {"cell": c, "asynchrony": a} | {m: _text(v[m]) if m in v else "-" for m in methods}
                for (c, a), v in table.items()
            ],
        )
        summary = []
        for m in methods:
            v = verdict(table, m, seeds)
            (cell, kind), value = v["worst"]
            summary.append(
                {
                    "method": m,
                    "median %": _text(v["median"]),
                    "worst cell": f"{cell}, {kind}: {_text(value)}",
                    ">= 95% (up to uniform(16))": f"{100 * v['mild_95']:.0f}% of cells",
                    ">= 90% (all)": f"{100 * v['all_90']:.0f}% of cells",
                    "the same, seed noise allowed": f"{100 * v['mild_95_noise']:.0f}%, "
                    f"{100 * v['all_90_noise']:.0f}% of cells",
                    "as good as each published": "-"
                    if v["beats_published"] is None
                    else f"{100 * v['beats_published']:.0f}% of cells",
                    "a published one better beyond seed noise": "-"
                    if v["beaten_beyond_noise"] is None
                    else f"{100 * v['beaten_beyond_noise']:.0f}% of cells",
                    "diverged cells": v["diverged"],
                }
            )
        lines += table_block(f"**{half} cells, per method:**", summary)
    return lines


def plot(rows: list[Record], out: pathlib.Path) -> None:
    halves = _halves(rows)
    tables = [scores(rows, h) for h in halves]
    height = max(len(t) for t in tables)
    plt, fig, axes = figure(len(halves), width=6.4)
    fig.set_size_inches(6.4 * len(halves), 1.6 + 0.32 * height)
    for ax, half, table in zip(axes, halves, tables, strict=True):
        methods = _methods(table)
        values = np.array(
            [[np.nan if v.get(m) is None else v[m] for m in methods] for v in table.values()]
        )
        ran = np.array([[m in v for m in methods] for v in table.values()])
        colours = plt.get_cmap("RdYlGn").with_extremes(bad="black")
        image = ax.imshow(
            np.ma.masked_invalid(values), cmap=colours, vmin=50, vmax=105, aspect="auto"
        )
        for (i, j), value in np.ndenumerate(values):
            if not ran[i, j]:  # not run: blank, not the black of a diverged seed
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, color="white"))
                continue
            diverged = np.isnan(value)
            text = "div." if diverged else f"{value:.0f}"
            colour = "white" if diverged else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(table)), [f"{c}, {a}" for c, a in table], fontsize=7)
        ax.set_title(f"{half} cells: % of synchronous")
        fig.colorbar(image, ax=ax, fraction=0.04)
    save(plt, fig, out / "protocols.png")
