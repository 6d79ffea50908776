r"""time: wall-clock time to a target, with workers that compute at their own pace.

Every method trains in one simulator (:func:`fsq.transforms.clock`): worker :math:`i`'s
:math:`j`-th gradient takes :math:`c` ticks of a *compute profile*, its message
:math:`\ell` ticks on the link, and a coordination policy decides which gradients the
server steps on. Profiles (``W`` workers, each about 1 s per gradient unless slowed):

- ``homogeneous``: every worker the same, a median of 1 s with 10% log-normal spread;
- ``sqrt``: fixed heterogeneous times :math:`\tau_i = \sqrt{i}` s, :math:`i = 1..W`, as
  in Tyurin and Richtárik's experiments;
- ``exponential``: random times, memoryless with a mean of 1 s;
- ``straggler``: one worker 10x slower than the rest, for good;
- ``time-varying``: a quarter of the workers 10x slower for a while (preemption,
  throttling), from a quarter of synchronous training's rounds on.

Methods: synchronous SGD (a barrier per round), backup workers (Chen et al. 2016),
Rennala SGD (Tyurin and Richtárik 2023), Ringmaster ASGD (Maranjyan et al. 2025), plain
asynchronous SGD, delay-adaptive asynchronous SGD (Koloskova et al. 2022, Mishchenko et
al. 2022: :math:`\tau_C = W`) and Flying Squirrel with its defaults, all over SGD.

Protocol: per task, ``W`` and profile, synchronous training runs ``R`` rounds; its final
test loss (the mean over seeds, at its best learning rate, on a free link) is the
*target*, on a slow link too. The *budget* every method gets is the ticks of ``R``
synchronous rounds with the profile's durations drawn once (seed 0; exact for fixed
profiles, a typical draw for random ones), rounded up to 100 ticks. The test loss is
evaluated 100 times per run; a method's *time to target* is the first evaluation at which
its mean test loss over seeds is at or below the target, at its best learning rate (and
batch :math:`B` or threshold :math:`R` for Rennala and Ringmaster) of a small grid. A
bandwidth-limited link (``slow link``) takes 5 mean compute times to send one dense
float32 gradient, so compression pays off in time.
"""

from __future__ import annotations

import functools
import math
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fsq
from experiments import records, tasks, training
from experiments.presentation import (
    diverged_tag,
    figure,
    image,
    save,
    series,
    speedup_axes,
    style,
    table_block,
)
from experiments.records import Record, group
from experiments.studies import base, compression

NAME = "time"
INNER = "sgd"
TEST_POINTS = 100
SLOW = 10  # how many times slower a straggler (or a throttled worker) is
LINK_SLOWDOWN = 5  # mean compute times to send a dense gradient on the slow link
TOP_K = " + top-k 1% + EF"
TOP_K_COMPRESSOR = fsq.compression.top_k(0.01)

PROFILES = ("homogeneous", "sqrt", "exponential", "straggler", "time-varying")
METHODS = (
    "synchronous",
    "backup",
    "rennala",
    "ringmaster",
    "plain async",
    "delay-adaptive async",
    "flying squirrel",
)
BASELINES = ("backup", "rennala", "ringmaster")  # the methods with a size (b, B or R)


class Comparison(NamedTuple):
    """Methods against each other on one task, ``W`` and link, under several profiles.

    Attributes:
      task: the task's name.
      workers: ``W``.
      profiles: names of :data:`PROFILES`.
      methods: names of :data:`METHODS`, optionally with :data:`TOP_K`.
      link: ``"free"`` (no transit) or ``"slow"`` (:data:`LINK_SLOWDOWN`).
      fractions: Rennala's batch and Ringmaster's threshold tried, as fractions of ``W``.
    """

    task: str
    workers: int
    profiles: tuple[str, ...]
    methods: tuple[str, ...]
    link: str = "free"
    fractions: tuple[float, ...] = (0.5,)


class TaskSize(NamedTuple):
    """Synchronous training's rounds, the batch per worker, the centre and count of the
    learning-rate grid."""

    rounds: int
    batch: int
    centre: float
    rates: int


class Size(NamedTuple):
    """Per scale: the comparisons, per task its size, and the seeds."""

    comparisons: tuple[Comparison, ...]
    tasks: dict[str, TaskSize]
    seeds: int


_ALL = tuple(METHODS)
_MAIN = ("synchronous", "rennala", "ringmaster", "flying squirrel")
# On the quadratic (one noisy example per gradient) compensation's g*g curvature estimate is
# mostly noise: the default without compensation too.
_QUADRATIC = (*_ALL, "flying squirrel, no DC")
_LINK = (
    "synchronous",
    "flying squirrel, no DC",
    "flying squirrel, no DC" + TOP_K,
    "synchronous" + TOP_K,
)
SIZES = {
    "full": Size(
        (
            Comparison("mlp", 16, PROFILES, _ALL, fractions=(0.25, 1.0)),
            Comparison("mlp", 16, ("homogeneous",), _LINK, link="slow"),
            *(
                Comparison("quadratic", w, ("sqrt",), _QUADRATIC, fractions=(0.5, 1.0))
                for w in (4, 16, 64)
            ),
            Comparison("cnn", 16, ("sqrt", "straggler"), _MAIN),
            Comparison("transformer", 16, ("sqrt", "straggler"), _MAIN),
        ),
        {
            "quadratic": TaskSize(300, 1, 0.3, 4),
            "mlp": TaskSize(100, 8, 1.0, 3),
            "cnn": TaskSize(100, 8, 0.3, 3),
            "transformer": TaskSize(100, 4, 0.3, 3),
        },
        3,
    ),
    "quick": Size(
        (
            Comparison(
                "quadratic",
                16,
                ("sqrt", "straggler"),
                ("synchronous", "plain async", "flying squirrel"),
            ),
        ),
        {"quadratic": TaskSize(100, 1, 0.3, 2)},
        2,
    ),
    "tiny": Size(
        (Comparison("quadratic", 4, ("straggler",), ("synchronous", "flying squirrel")),),
        {"quadratic": TaskSize(10, 2, 0.1, 2)},
        1,
    ),
}


# --- Profiles, links and methods -----------------------------------------------------------


class Profile(NamedTuple):
    """A compute profile: its model and the seconds of one tick."""

    compute: fsq.timing.ComputeModel
    tick_seconds: float


def profile(name: str, workers: int, rounds: int, ticks_per_second: int = 4) -> Profile:
    """The profile ``name`` for ``workers`` (``rounds``: synchronous training's, which
    place the time-varying slowdown). ``ticks_per_second`` resolves the profiles of about
    1 s per gradient (the straggler's and the time-varying one count whole seconds)."""
    tick = 1 / ticks_per_second
    if name == "homogeneous":
        return Profile(
            fsq.timing.lognormal([ticks_per_second] * workers, 0.1, 4 * ticks_per_second), tick
        )
    if name == "sqrt":
        ticks = [round(ticks_per_second * math.sqrt(i + 1)) for i in range(workers)]
        return Profile(fsq.timing.fixed(ticks), tick)
    if name == "exponential":
        return Profile(
            fsq.timing.exponential([ticks_per_second] * workers, 16 * ticks_per_second), tick
        )
    if name == "straggler":
        return Profile(fsq.timing.stragglers(workers, [workers - 1], SLOW), 1.0)
    if name == "time-varying":
        # Synchronous training takes rounds / 4 one-tick rounds, then SLOW-tick rounds for
        # as long as the slow window lasts (rounds ticks: rounds / SLOW rounds).
        every = fsq.timing.fixed([1] * workers)
        throttled = range(max(1, workers // 4))
        return Profile(
            fsq.timing.slowdown(every, throttled, SLOW, rounds // 4, rounds // 4 + rounds), 1.0
        )
    raise ValueError(f"profile must be one of {PROFILES}, got {name!r}")


def link(name: str, task_name: str, compute: fsq.timing.ComputeModel) -> fsq.delays.DelayModel:
    """No transit (``"free"``), or a link that sends a dense float32 gradient of the task's
    model in :data:`LINK_SLOWDOWN` mean compute times (``"slow"``)."""
    if name == "free":
        return fsq.delays.constant(0)
    mean = np.mean([compute.mean_ticks(i) for i in range(compute.num_workers)])
    return fsq.delays.bandwidth(dense_bytes(task_name) / (LINK_SLOWDOWN * mean))


@functools.cache
def leaf_sizes(task_name: str) -> tuple[int, ...]:
    return tuple(compression.leaf_sizes(tasks.get(task_name)))


def dense_bytes(task_name: str) -> int:
    return fsq.compression.dense_bytes(leaf_sizes(task_name))


def starts_per_tick(compute: fsq.timing.ComputeModel) -> float:
    """Jobs the cluster starts per tick with every worker busy: the sum of 1 / mean ticks."""
    return sum(1 / compute.mean_ticks(i) for i in range(compute.num_workers))


def sizes(method: str, workers: int, fractions: Sequence[float]) -> tuple[int, ...]:
    """The sizes a method is tuned over: ``b = W / 8`` backup workers, Rennala's batch or
    Ringmaster's threshold a fraction of ``W``; 0 for the others."""
    if method == "backup":
        return (max(1, workers // 8),)
    if method in BASELINES:
        return tuple(sorted({max(1, round(f * workers)) for f in fractions}))
    return (0,)


def transform(
    method: str,
    size: int,
    learning_rate: jax.Array,
    seed: jax.Array,
    workers: int,
    timing: Profile,
    delay: fsq.delays.DelayModel,
) -> optax.GradientTransformationExtraArgs:
    """The Flying Squirrel assembly of ``method`` (a name of :data:`METHODS`, ``"flying
    squirrel, no DC"``, optionally with :data:`TOP_K`)."""
    name, compressed, _ = method.partition(TOP_K)
    policies = {
        "synchronous": fsq.timing.synchronous(),
        "backup": fsq.timing.backup(size) if size else None,
        "rennala": fsq.timing.rennala(size) if size else None,
        "ringmaster": fsq.timing.ringmaster(size) if size else None,
    }
    pieces = {  # the asynchronous methods: which staleness rule, and compensation
        "plain async": base.OFF,
        "delay-adaptive async": {
            "staleness": fsq.staleness.delay_adaptive(float(workers)),
            "compensation": None,
        },
        "flying squirrel": {},
        "flying squirrel, no DC": {"compensation": None},
    }
    kwargs = pieces.get(name, base.OFF)
    return training.flying_squirrel(
        base.catalogue_optimizer(INNER, learning_rate),
        workers,
        seed,
        delay=delay,
        compute=timing.compute,
        policy=policies.get(name) or "asynchronous",
        tick_seconds=timing.tick_seconds,
        compression=TOP_K_COMPRESSOR if compressed else None,
        **kwargs,
    )


def synchronous_ticks(compute: fsq.timing.ComputeModel, rounds: int, transit: int) -> int:
    """The ticks synchronous training takes for ``rounds`` rounds (durations drawn with
    seed 0): each round lasts its slowest job plus the transit."""
    workers = jnp.arange(compute.num_workers)
    key = jax.random.key(0)

    @jax.jit
    def slowest(job, tick):
        keys = jax.vmap(lambda w: jax.random.fold_in(jax.random.fold_in(key, w), job))(workers)
        return jnp.max(jax.vmap(compute, in_axes=(0, 0, None, None))(keys, workers, job, tick))

    tick = 0
    for job in range(rounds):
        tick += int(slowest(job, tick)) + transit
    return tick


# --- Running ------------------------------------------------------------------------------


def run(settings: base.Settings) -> list[records.Record]:
    """Runs the study at ``settings.scale``; returns one record per run."""
    size = settings.size(NAME, SIZES)
    jobs = [(c, p) for c in size.comparisons for p in c.profiles]
    out = []
    for comparison, profile_name in base.progress(jobs, settings, NAME):
        out += compare(comparison, profile_name, size, settings)
    return out


def compare(
    comparison: Comparison,
    profile_name: str,
    size: Size,
    settings: base.Settings,
    study: str = NAME,
) -> list[records.Record]:
    """Every method of ``comparison`` under one profile, for the same simulated seconds
    (the records carry ``study``'s name)."""
    task = tasks.get(comparison.task)
    task_size = size.tasks[comparison.task]
    workers = comparison.workers
    timing = profile(profile_name, workers, task_size.rounds)
    delay = link(comparison.link, comparison.task, timing.compute)
    dense = dense_bytes(comparison.task)
    transit = delay.for_message(dense).max_delay if comparison.link != "free" else 0
    ticks = synchronous_ticks(timing.compute, task_size.rounds, transit)
    ticks = -(-ticks // TEST_POINTS) * TEST_POINTS
    # Compute only the workers that start a job.
    slots = math.ceil(starts_per_tick(timing.compute))
    label = profile_name if comparison.link == "free" else f"{profile_name}, slow link"
    out = []
    for method in comparison.methods:
        for method_size in sizes(method.partition(TOP_K)[0], workers, comparison.fractions):

            def make_tx(hp, seed, method=method, method_size=method_size):
                lr = hp["learning_rate"]
                return transform(method, method_size, lr, seed, workers, timing, delay)

            outcome = training.train(
                task,
                make_tx,
                grid={"learning_rate": base.learning_rates(task_size.centre, task_size.rates)},
                seeds=settings.seeds_or(size.seeds),
                steps=ticks,
                num_workers=workers,
                batch_size=task_size.batch,
                # The cheapest layout of a clock: every worker on one device, only the
                # workers that start a job computed (the numbers are the same on any).
                num_devices=1,
                test_points=TEST_POINTS,
                gradient_slots=slots,
            )
            sent = TOP_K_COMPRESSOR.payload_bytes(leaf_sizes(comparison.task))
            compressed = sent if TOP_K in method else None
            channels = 3 if method == "flying squirrel" else 1  # compensation's channels

            def describe(
                values, method=method, method_size=method_size, sent=(channels, compressed)
            ):
                return records.Run(
                    method,
                    {
                        "inner": INNER,
                        **values,
                        "size": method_size,
                        "profile": profile_name,
                        "link": comparison.link,
                        "tick_seconds": timing.tick_seconds,
                        "rounds": task_size.rounds,
                    },
                    label,
                    *sent,
                )

            out += records.from_outcome(
                outcome, task, study=study, workers=workers, describe=describe
            )
    return out


# --- Reading the records --------------------------------------------------------------------


class Result(NamedTuple):
    """A method's best run in one setting: its grid point, time to target (``inf`` if never
    within the budget) and mean test-loss curve over seeds against seconds."""

    learning_rate: float
    size: int
    seconds: float
    final: float
    times: np.ndarray
    curve: np.ndarray
    diverged: str = ""  # "div. (k/n)" when some of its seeds diverged


def seconds(rows: Sequence[Record]) -> np.ndarray:
    """The simulated seconds of the test-loss evaluations of ``rows``' runs."""
    r = rows[0]
    points = len(r.test_curve)
    return np.arange(1, points + 1) * (r.steps // points) * r.hyperparameters["tick_seconds"]


def mean_curve(rows: Sequence[Record]) -> np.ndarray:
    return np.mean([[np.inf if x is None else x for x in r.test_curve] for r in rows], axis=0)


def time_to(rows: Sequence[Record], target: float) -> float:
    """The first evaluation's seconds at which the seed-mean test loss reaches ``target``."""
    hits = np.flatnonzero(mean_curve(rows) <= target)
    return float(seconds(rows)[hits[0]]) if hits.size else math.inf


def best(rows: Sequence[Record], target: float | None) -> Result:
    """The grid point of ``rows`` (one method, one setting) that reaches ``target`` first;
    ties, or no target, by the lowest final mean test loss."""
    options = []
    for (lr, size), runs in group(rows, "learning_rate", "size").items():
        curve = mean_curve(runs)
        final = float(curve[-1]) if np.isfinite(curve[-1]) else math.inf
        at = math.inf if target is None else time_to(runs, target)
        options.append(Result(lr, size, at, final, seconds(runs), curve, diverged_tag(runs)))
    return min(options, key=lambda o: (o.seconds, o.final))


def target_of(rows: Sequence[Record]) -> float:
    """Synchronous training's final test loss: the mean over seeds at its best rate."""
    return best(rows, None).final


def settings_of(rows: list[Record]) -> dict[tuple, dict[str, list[Record]]]:
    """``{(task, W, profile, link): {method: records}}``."""
    return {
        key: group(runs, "method")
        for key, runs in group(rows, "task", "workers", "profile", "link").items()
    }


def results(rows: list[Record]) -> dict[tuple, tuple[float, dict[str, Result]]]:
    """Per setting, its target and each method's :class:`Result`. A slow link's target is
    synchronous training's on a free link (when it ran)."""
    by_setting = settings_of(rows)
    out = {}
    for (task, w, prof, link_name), methods in by_setting.items():
        free = by_setting.get((task, w, prof, "free"), methods)
        target = target_of(free["synchronous"])
        out[(task, w, prof, link_name)] = (
            target,
            {m: best(runs, target) for m, runs in methods.items()},
        )
    return out


# --- Theory: time complexities for fixed compute times -------------------------------------


def bounds(taus: Sequence[float], smoothness: float, gap: float, variance: float, eps: float):
    r"""The time complexities of the methods for fixed compute times ``taus`` (seconds),
    to :math:`\mathbb E \|\nabla f\|^2 \le \varepsilon`, up to a common constant
    (Tyurin and Richtárik 2023, Table 1; Maranjyan et al. 2025):

    .. math::

      t_\text{sync} = \tau_{\max} \Big(\frac{L\Delta}{\varepsilon}
        + \frac{\sigma^2 L\Delta}{W\varepsilon^2}\Big), \quad
      t_\text{ASGD} = \Big(\frac1W \sum_i \frac1{\tau_i}\Big)^{-1}
        \Big(\frac{L\Delta}{\varepsilon} + \frac{\sigma^2 L\Delta}{W\varepsilon^2}\Big),

    .. math::

      t_\text{Rennala} = t_\text{Ringmaster} = \min_{m \le W}
        \Big(\frac1m \sum_{i \le m} \frac1{\tau_{(i)}}\Big)^{-1}
        \Big(\frac{L\Delta}{\varepsilon} + \frac{\sigma^2 L\Delta}{m\varepsilon^2}\Big),

    :math:`\tau_{(i)}` sorted ascending. Returns ``({method: time}, m*)``.
    """
    taus = sorted(taus)

    def time(tau, m):
        return tau * (smoothness * gap / eps + variance * smoothness * gap / (m * eps**2))

    workers = len(taus)
    optimal = [time(m / sum(1 / t for t in taus[:m]), m) for m in range(1, workers + 1)]
    best_m = int(np.argmin(optimal)) + 1
    asgd = time(workers / sum(1 / t for t in taus), workers)
    return {
        "synchronous": time(taus[-1], workers),
        "plain async": asgd,
        "delay-adaptive async": asgd,
        "flying squirrel": asgd,
        "flying squirrel, no DC": asgd,
        "rennala": min(optimal),
        "ringmaster": min(optimal),
    }, best_m


def theory(rows: list[Record]) -> list[dict]:
    """Predicted against measured time-to-target ratios on the quadratic, profile sqrt."""
    from experiments.tasks import quadratic

    c = quadratic.curvatures()
    table = []
    for (task, w, prof, link_name), (target, res) in results(rows).items():
        if (task, prof, link_name) != ("quadratic", "sqrt", "free") or "synchronous" not in res:
            continue
        sample = next(r for r in rows if r.task == task and r.workers == w)
        timing = profile(prof, w, 1)
        taus = [t * timing.tick_seconds for t in timing.compute.ticks]
        excess = target - sample.loss_floor
        batch = sample.hyperparameters["batch_size"]
        # L: the largest curvature; Delta: the initial excess loss; sigma^2: a worker's
        # gradient variance at the optimum; eps: the squared gradient norm an excess loss
        # allows (2 L (f - f*)).
        predicted, best_m = bounds(
            taus,
            float(c.max()),
            0.5 * len(c),
            quadratic.NOISE**2 * float(c.sum()) / batch,
            2 * float(c.max()) * excess,
        )
        sync = res["synchronous"].seconds
        for m, r in res.items():
            if m not in predicted or m == "synchronous":
                continue
            want = predicted[m] / predicted["synchronous"]
            got = r.seconds / sync
            table.append(
                {
                    "W": w,
                    "method": m,
                    "predicted t / t_sync": f"{want:.2f}",
                    "measured": "-" if math.isinf(got) else f"{got:.2f}",
                    "measured / predicted": "-" if math.isinf(got) else f"{got / want:.2f}",
                    "m*": best_m if m in ("rennala", "ringmaster") else "",
                }
            )
    return table


def throughput_ratio(workers: int, prof: str, rounds: int) -> float:
    """Synchronous training's gradients per second over the asynchronous cluster's (every
    worker busy): the time ratio if every gradient were worth the same."""
    timing = profile(prof, workers, rounds)
    sync = workers * rounds / synchronous_ticks(timing.compute, rounds, 0)
    return sync / starts_per_tick(timing.compute)


def _ratio(result: Result, reference: Result) -> float:
    return result.seconds / reference.seconds


def _cell(result: Result, reference: Result) -> str:
    if math.isinf(result.seconds):
        return "-"
    return f"{result.seconds:.0f} s ({_ratio(result, reference):.2f}x)"


def _grid_point(method: str, result: Result) -> str:
    names = {"backup": "b", "rennala": "B", "ringmaster": "R"}
    size = f", {names[method]} {result.size}" if method in names else ""
    return f"lr {result.learning_rate:g}{size}"


def speedups(rows: list[Record]) -> dict[tuple[str, str], dict[str, dict[int, float]]]:
    """Per (task, profile) run at several ``W`` on a free link: each method's wall-clock
    speed-up over synchronous training at the smallest ``W``, to that run's target."""
    free = {k: v for k, v in settings_of(rows).items() if k[3] == "free"}
    by_curve: dict[tuple[str, str], list[int]] = {}
    for task, w, prof, _ in free:
        by_curve.setdefault((task, prof), []).append(w)
    out: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
    for (task, prof), ws in by_curve.items():
        if len(ws) < 2:
            continue
        reference = free[(task, min(ws), prof, "free")]["synchronous"]
        target = target_of(reference)
        base_time = best(reference, target).seconds
        curves: dict[str, dict[int, float]] = {}
        for w in sorted(ws):
            for m, runs in free[(task, w, prof, "free")].items():
                curves.setdefault(m, {})[w] = base_time / best(runs, target).seconds
        out[(task, prof)] = curves
    return out


def section(rows: list[Record]) -> list[str]:
    lines = [
        "## Time: wall-clock to a target",
        "",
        "Workers compute at their own pace and every method runs in one simulator "
        "(`fsq.transforms.clock`). Per task, `W` and profile, synchronous training runs its "
        "rounds; its final test loss (mean over seeds, best learning rate, free link) is the "
        "target, on a slow link too; the budget of every method is those rounds' ticks "
        "(durations drawn once: exact for fixed profiles), rounded up to 100. Cells: "
        "seconds until "
        "the seed-mean test loss (evaluated 100 times per run) reaches the target, at the "
        "method's best grid point, and the ratio to synchronous training (below 1: "
        "faster); `-`: not within the budget. Profiles: homogeneous (1 s, 10% spread), "
        "sqrt (worker i takes sqrt(i) s), exponential (mean 1 s), straggler (one worker 10x "
        "slower), time-varying (a quarter of the workers 10x slower for a while). The "
        "learning rates are half a decade apart and a curve near the target crosses it "
        "early or late by chance: ratios within about 10% are ties.",
        "",
    ]
    found = results(rows)
    by_table: dict[tuple, dict] = {}
    for (task, w, prof, link_name), value in found.items():
        by_table.setdefault((task, w, link_name), {})[prof] = value
    for (task, w, link_name), profiles in by_table.items():
        methods = list(dict.fromkeys(m for _, res in profiles.values() for m in res))
        sample = next(r for r in rows if r.task == task and r.workers == w)
        examples = sample.hyperparameters["batch_size"]
        caption = (
            f"**{task}, W = {w}{', slow link' if link_name == 'slow' else ''}** "
            f"({examples} example{'s' if examples > 1 else ''} per gradient, "
            f"{sample.hyperparameters['rounds']} synchronous rounds; target test loss: "
            + ", ".join(f"{p} {t:.4g}" for p, (t, _) in profiles.items())
            + "):"
        )
        table = [
            {"method": m}
            | {p: _cell(res[m], res["synchronous"]) for p, (_, res) in profiles.items() if m in res}
            for m in methods
        ]
        lines += table_block(caption, table)
        points = [
            {"method": m}
            | {p: _grid_point(m, res[m]) for p, (_, res) in profiles.items() if m in res}
            for m in methods
        ]
        lines += table_block("Best grid points:", points)
        compressed = [m for m in methods if m.endswith(TOP_K) and m.removesuffix(TOP_K) in methods]
        if compressed:
            lines += table_block(
                "Top-k 1% + error feedback against the same method sending dense gradients "
                "(time to target, ratio; below 1: compression pays):",
                [
                    {"method": m.removesuffix(TOP_K)}
                    | {
                        p: _compression_cell(res[m], res[m.removesuffix(TOP_K)])
                        for p, (_, res) in profiles.items()
                    }
                    for m in compressed
                ],
            )
        if link_name == "free" and "flying squirrel" in methods:
            lines += table_block(
                "Flying Squirrel (defaults) against synchronous training and against the best "
                "of backup workers, Rennala and Ringmaster; the throughput ratio is "
                "synchronous training's gradients per second over the cluster's, the time "
                "ratio if every gradient were worth the same:",
                [
                    _summary(p, res, w, sample.hyperparameters["rounds"])
                    for p, (_, res) in profiles.items()
                ],
            )
    curves = speedups(rows)
    if curves:
        lines += [
            "**Speed-up against W** (wall-clock, to the target of synchronous training at the "
            "smallest W; `-`: not reached):",
            "",
            image("time_workers.png", "wall-clock speed-up against workers"),
            "",
        ]
        for (task, prof), by_method in curves.items():
            lines += table_block(f"{task}, {prof}:", speedup_table(by_method))
    theory_rows = theory(rows)
    if theory_rows:
        lines += table_block(
            "**Theory on the quadratic** (profile sqrt): each method's time-complexity bound "
            "for fixed compute times (Tyurin and Richtárik 2023; Maranjyan et al. 2025), "
            "evaluated with the quadratic's constants (L the largest curvature, Delta the "
            "initial excess loss, sigma^2 a worker's gradient variance at the optimum, "
            "epsilon = 2 L times the target's excess loss), as a ratio to synchronous "
            "training's, against the measured ratio; m*: the number of fastest workers the "
            "optimal methods' bound uses:",
            theory_rows,
        )
    lines += [image("time.png", "test loss against simulated seconds"), ""]
    return lines


def speedup_table(by_method: dict[str, dict[int, float]]) -> list[dict]:
    """Rows per ``W`` of :func:`speedups`' curves, a column per method (``-``: not
    reached)."""
    ws = sorted({w for c in by_method.values() for w in c})
    return [
        {"W": w} | {m: f"{c[w]:.2f}" if c.get(w) else "-" for m, c in by_method.items()} for w in ws
    ]


def _times(ratio: float) -> str:
    return "-" if not math.isfinite(ratio) else f"{ratio:.2f}x"


def _compression_cell(compressed: Result, dense: Result) -> str:
    if math.isinf(dense.seconds):
        return "dense: -" if math.isinf(compressed.seconds) else "only compressed reaches it"
    return _times(_ratio(compressed, dense))


def _summary(prof: str, res: dict[str, Result], workers: int, rounds: int) -> dict:
    baselines = [res[m] for m in BASELINES if m in res]
    ours = res["flying squirrel"]
    fastest = min((r.seconds for r in baselines), default=math.inf)
    return {
        "profile": prof,
        "vs synchronous": _times(_ratio(ours, res["synchronous"])),
        "throughput ratio": _times(throughput_ratio(workers, prof, rounds)),
        "vs best baseline": _times(ours.seconds / fastest),
    }


METHOD_COLORS = dict(
    zip(
        (
            *METHODS,
            "flying squirrel, no DC",
            "flying squirrel, no DC" + TOP_K,
            "synchronous" + TOP_K,
        ),
        (
            "#333333",
            "#8172B3",
            "#DD8452",
            "#937860",
            "#8C8C8C",
            "#64B5CD",
            "#C44E52",
            "#55A868",
            "#4C72B0",
            "#DA8BC3",
        ),
        strict=True,
    )
)


def plot(rows: list[Record], out: pathlib.Path) -> None:
    found = results(rows)
    # Test loss against seconds: every profile of the first task and W with most profiles.
    by_table: dict[tuple, list] = {}
    for key, value in found.items():
        if key[3] == "free":
            by_table.setdefault(key[:2], []).append((key, value))
    chosen = max(by_table.values(), key=len)
    plt, fig, axes = figure(len(chosen), width=3.8)
    for ax, ((task, w, prof, _), (target, res)) in zip(axes, chosen, strict=True):
        finite = np.concatenate([r.curve[np.isfinite(r.curve)] for r in res.values()])
        low, top = 0.95 * finite.min(), min(finite.max(), 1.6 * target)
        for i, (m, r) in enumerate(res.items()):
            # Clipped at the top: the early losses would squash the end, where they differ.
            ok = np.isfinite(r.curve)
            label = m + (f" ({r.diverged})" if r.diverged else "")
            kwargs = {**style(i), "color": METHOD_COLORS.get(m, style(i)["color"])}
            ax.plot(r.times[ok], np.minimum(r.curve[ok], top), label=label, lw=1.2, **kwargs)
        ax.axhline(
            target, color="gray", linestyle=":", linewidth=1, label="target (synchronous, final)"
        )
        ax.set_ylim(low, top * 1.02)
        ax.set_xlabel("simulated seconds")
        ax.set_title(f"{task}, W={w}: {prof}", fontsize=9)
    axes[0].set_ylabel("test loss (mean over seeds, clipped)")
    save(plt, fig, out / "time.png")

    curves = speedups(rows)
    if curves:
        plot_speedups(curves, out / "time_workers.png")


def plot_speedups(curves: dict[tuple[str, str], dict[str, dict[int, float]]], path) -> None:
    """Wall-clock speed-up against ``W`` (:func:`speedups`), a panel per task and profile."""
    plt, fig, axes = figure(len(curves), width=4.0)
    for ax, ((task, prof), by_method) in zip(axes, curves.items(), strict=True):
        ws = sorted({w for c in by_method.values() for w in c})
        for i, (m, c) in enumerate(by_method.items()):
            x = [w for w in ws if w in c]  # a W that never reached the target is marked
            values = [c[w] if np.isfinite(c[w]) and c[w] > 0 else np.nan for w in x]
            kwargs = {"marker": "o", "color": METHOD_COLORS.get(m, style(i)["color"])}
            series(ax, x, values, index=i, label=m, higher_is_better=True, **kwargs)
        ax.plot(ws, [w / ws[0] for w in ws], color="gray", linestyle=":", label="linear")
        speedup_axes(ax)
        ax.set_ylabel("wall-clock speed-up")
        ax.set_title(f"{task}: {prof}", fontsize=9)
    save(plt, fig, path)
