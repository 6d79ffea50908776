"""The coordination problem: does asynchronous training keep synchronous accuracy?

Protocol: MNIST-1D MLP, 8 workers, 32 examples per worker and step. Tune the
learning rate of synchronous training (delay 0), freeze it, then add delay without
retuning. Columns: uniform delays with max_delay 4, 16, 64 and a heavy-tailed straggler
model truncated at 64. Rows: plain asynchronous SGD (every extra off), each technique on
its own, and Flying Squirrel's default. Three seeds each, all seeds in one program.

Run: ``python -m experiments coordination [--quick] [--out DIR]``. Writes
``coordination.json``, ``coordination.md`` and ``coordination.png`` to ``--out``.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
from tqdm import tqdm

import fsq
from experiments import mnist1d, training
from experiments.presentation import figure, save, series

WORKERS, BATCH = 8, 32
SEEDS = (0, 1, 2)
INNERS = {
    "momentum": (fsq.momentum, (0.03, 0.1, 0.3)),
    "adam": (fsq.adam, (3e-3, 1e-2, 3e-2)),
}
DELAYS = {
    "uniform(4)": fsq.delays.uniform(4),
    "uniform(16)": fsq.delays.uniform(16),
    "uniform(64)": fsq.delays.uniform(64),
    "stragglers(64)": fsq.delays.heavy_tailed(64),
}
OFF = {"compensation": None, "staleness": None}
METHODS = {
    "plain async": OFF,
    "DC-c (lam 0.04)": {**OFF, "compensation": 0.04},
    "DC-a (lam0 2)": {**OFF, "compensation": fsq.compensation.adaptive(2.0)},
    "inverse": {**OFF, "staleness": "inverse"},
    "delay-adaptive": {**OFF, "staleness": "delay_adaptive"},
    # Candidates for the default, kept in the table as the evidence for the choice.
    "delay-adaptive, tau_C 4": {**OFF, "staleness": fsq.staleness.delay_adaptive(4.0)},
    "weighted step, tau_C 3": {**OFF, "staleness": "weighted_step"},
    "weighted step, tau_C 4": {**OFF, "staleness": fsq.staleness.weighted_step(4.0)},
    "weighted step tau_C 4 + DC-a lam0 2": {
        "staleness": fsq.staleness.weighted_step(4.0),
        "compensation": fsq.compensation.adaptive(2.0),
    },
    "flying squirrel default (weighted step tau_C 3 + DC-a lam0 1)": {},
}
DIVERGED_ACCURACY = 0.15  # chance is 0.10
DEFAULT = "flying squirrel default (weighted step tau_C 3 + DC-a lam0 1)"
# The columns where the best single technique is within seed noise of the default get a
# paired comparison over more seeds: same seeds, same data and delays, difference per seed.
PAIRED_DELAYS = ("uniform(4)", "stragglers(64)")
PAIRED_METHODS = ("plain async", "DC-c (lam 0.04)", "DC-a (lam0 2)", "inverse", "delay-adaptive")
PAIRED_SEEDS = tuple(range(10, 20))


SLOWDOWNS = (1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 4.0, 8.0)  # a heterogeneous cluster


def run(inner, delay, steps, seeds, worker_batch_sizes=None, **kwargs):
    def make_tx(seed):
        # On the trainer's axes, exchanging as the runner says (--exchange).
        return training.flying_squirrel(inner, WORKERS, seed, delay=delay, **kwargs)

    start = time.perf_counter()
    result = mnist1d.train(
        make_tx,
        seeds,
        steps=steps,
        num_workers=WORKERS,
        batch_per_worker=BATCH,
        data=mnist1d.load(),
        worker_batch_sizes=worker_batch_sizes,
    )
    accuracy = np.asarray(result.test_accuracy, np.float64)
    loss = np.asarray(result.train_loss, np.float64)
    return {
        "test_accuracy": accuracy.tolist(),
        "train_loss": loss.tolist(),
        "mean_staleness": np.asarray(result.staleness, np.float64).tolist(),
        "diverged": [
            bool(a < DIVERGED_ACCURACY or not np.isfinite(lo))
            for a, lo in zip(accuracy, loss, strict=True)
        ],
        "wall_seconds": time.perf_counter() - start,
    }


def study(steps: int, seeds: tuple[int, ...]) -> dict:
    records = {"steps": steps, "seeds": list(seeds), "workers": WORKERS, "tuning": {}, "runs": []}
    for inner_name, (make_inner, rates) in INNERS.items():
        tuning = {
            lr: run(make_inner(lr), 0, steps, seeds, **OFF)
            for lr in tqdm(rates, desc=f"tune {inner_name}", leave=False)
        }
        best = max(rates, key=lambda lr: np.mean(tuning[lr]["test_accuracy"]))
        records["tuning"][inner_name] = {"best": best, **{str(k): v for k, v in tuning.items()}}
        records["runs"].append(
            {"inner": inner_name, "method": "synchronous", "delay": "none", **tuning[best]}
        )
        grid = [(m, d) for m in METHODS for d in DELAYS]
        for method, delay in tqdm(grid, desc=f"{inner_name} lr={best}", leave=False):
            outcome = run(make_inner(best), DELAYS[delay], steps, seeds, **METHODS[method])
            records["runs"].append(
                {"inner": inner_name, "method": method, "delay": delay, **outcome}
            )
    return records


def load_balance_study(records: dict, steps: int, seeds: tuple[int, ...]) -> None:
    """Per-worker speeds, without and with load balancing, at each inner's tuned rate."""
    model = fsq.delays.speeds(SLOWDOWNS)
    # Balanced shares of the global batch of W * BATCH examples (at least one each).
    sizes = [max(1, round(s * WORKERS * BATCH)) for s in model.shares()]
    records["load_balance"] = {"slowdowns": list(SLOWDOWNS), "batch_sizes": sizes, "runs": []}
    for inner_name, (make_inner, _) in INNERS.items():
        lr = records["tuning"][inner_name]["best"]
        for balance in (False, True):
            outcome = run(
                make_inner(lr),
                model,
                steps,
                seeds,
                worker_batch_sizes=sizes if balance else None,
                load_balance=balance,
            )
            records["load_balance"]["runs"].append(
                {"inner": inner_name, "load_balance": balance, **outcome}
            )


def paired_study(records: dict, steps: int, seeds: tuple[int, ...]) -> None:
    """Default vs each single technique in the mild columns, over ``seeds`` (paired)."""
    records["paired"] = {"seeds": list(seeds), "runs": []}
    for inner_name, (make_inner, _) in INNERS.items():
        lr = records["tuning"][inner_name]["best"]
        grid = [(m, d) for d in PAIRED_DELAYS for m in (DEFAULT, *PAIRED_METHODS)]
        for method, delay in tqdm(grid, desc=f"paired {inner_name}", leave=False):
            outcome = run(make_inner(lr), DELAYS[delay], steps, seeds, **METHODS[method])
            records["paired"]["runs"].append(
                {"inner": inner_name, "method": method, "delay": delay, **outcome}
            )


def paired_table(records: dict) -> str:
    """Per column: mean accuracy and the default's paired advantage (mean +- standard error)."""
    paired = records["paired"]
    lines = [
        f"\n**Paired comparison in the mild columns**, {len(paired['seeds'])} further seeds "
        "(default minus technique, per seed; mean +- standard error, in accuracy points):\n",
        "| inner | column | default | technique | technique acc. | default - technique |",
        "|---|---|---|---|---|---|",
    ]
    for inner in INNERS:
        for delay in PAIRED_DELAYS:
            runs = {
                r["method"]: np.asarray(r["test_accuracy"])
                for r in paired["runs"]
                if r["inner"] == inner and r["delay"] == delay
            }
            default = runs[DEFAULT]
            for method in PAIRED_METHODS:
                diff = 100 * (default - runs[method])
                se = diff.std(ddof=1) / np.sqrt(len(diff))
                lines.append(
                    f"| {inner} | {delay} | {100 * default.mean():.1f} | {method} | "
                    f"{100 * runs[method].mean():.1f} | {diff.mean():+.2f} +- {se:.2f} |"
                )
    return "\n".join(lines)


def table(records: dict) -> str:
    lines = []
    for inner in INNERS:
        runs = [r for r in records["runs"] if r["inner"] == inner]
        sync = next(r for r in runs if r["method"] == "synchronous")
        sync_mean = np.mean(sync["test_accuracy"])
        lr = records["tuning"][inner]["best"]
        lines += [
            f"\n**{inner}** (lr {lr}, tuned for synchronous training): synchronous test "
            f"accuracy {100 * sync_mean:.1f} +- {100 * np.std(sync['test_accuracy']):.1f}%. "
            "Cells: mean +- std test accuracy over seeds (% of synchronous), diverged seeds.\n",
            "| method | " + " | ".join(DELAYS) + " |",
            "|---|" + "---|" * len(DELAYS),
        ]
        for method in METHODS:
            cells = []
            for delay in DELAYS:
                r = next(x for x in runs if x["method"] == method and x["delay"] == delay)
                acc = np.asarray(r["test_accuracy"])
                relative = 100 * acc.mean() / sync_mean
                cell = f"{100 * acc.mean():.1f} +- {100 * acc.std():.1f} ({relative:.1f}%)"
                if any(r["diverged"]):
                    cell += f", {sum(r['diverged'])} div."
                cells.append(cell)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if "load_balance" in records:
        balance = records["load_balance"]
        lines += [
            f"\n**Load balancing**, slowdowns {balance['slowdowns']}, balanced batch sizes "
            f"{balance['batch_sizes']} (default Flying Squirrel otherwise):\n",
            "| inner | load balance | mean staleness | test accuracy |",
            "|---|---|---|---|",
        ]
        for r in balance["runs"]:
            acc = np.asarray(r["test_accuracy"])
            lines.append(
                f"| {r['inner']} | {r['load_balance']} | {np.mean(r['mean_staleness']):.2f} | "
                f"{100 * acc.mean():.1f} +- {100 * acc.std():.1f} |"
            )
    if "paired" in records:
        lines.append(paired_table(records))
    return "\n".join(lines)


def plot(records: dict, path: pathlib.Path) -> None:
    plt, fig, axes = figure(len(INNERS), width=6.5)
    fig.set_figheight(5.5)  # room for the legend of every method beneath the axes
    uniform = [d for d in DELAYS if d.startswith("uniform")]
    xs = [0] + [DELAYS[d].max_delay for d in uniform]
    for ax, inner in zip(axes, INNERS, strict=True):
        runs = [r for r in records["runs"] if r["inner"] == inner]
        sync = np.mean(next(r for r in runs if r["method"] == "synchronous")["test_accuracy"])
        for i, method in enumerate(METHODS):
            cells = [
                next(r for r in runs if r["method"] == method and r["delay"] == d) for d in uniform
            ]
            # A cell whose every seed diverged is marked, not averaged.
            ys = [sync] + [
                np.nan if all(c["diverged"]) else np.mean(c["test_accuracy"]) for c in cells
            ]
            series(
                ax,
                xs,
                100 * np.asarray(ys),
                index=i,
                label=method,
                higher_is_better=True,
                marker="o",
            )
        ax.axhline(100 * sync, color="gray", linestyle=":", linewidth=0.8, label="synchronous")
        ax.set_xscale("symlog", linthresh=4)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_title(f"{inner} inner, MNIST-1D MLP, {WORKERS} workers")
        ax.set_xlabel("max_delay (uniform delays)")
        ax.set_ylabel("test accuracy (%)")
    save(plt, fig, path)


def main(out: pathlib.Path, quick: bool) -> None:
    steps, seeds = (300, (0,)) if quick else (2000, SEEDS)
    records = study(steps, seeds)
    load_balance_study(records, steps, seeds)
    paired_study(records, steps, (100, 101) if quick else PAIRED_SEEDS)
    out.mkdir(parents=True, exist_ok=True)
    (out / "coordination.json").write_text(json.dumps(records, indent=1))
    report = table(records)
    (out / "coordination.md").write_text(report + "\n")
    plot(records, out / "coordination.png")
    print(report)
    print(f"\nresults: {out / 'coordination.md'}, {out / 'coordination.png'}")
