"""The report of a results folder: ``report.md`` and PNG plots, from ``results.json`` alone.

:func:`markdown` is a pure function of the records (same JSON, byte-identical report),
and each plot is drawn from them with fixed styles, so ``python -m experiments report
--out DIR`` regenerates the report of any saved run. Sections appear for the studies
present in the records.

Cells are ``mean +- std`` over seeds. The headline metric is the test accuracy for
classifiers, and otherwise the test loss above the task's exact floor where it is known
(the quadratic's noise, the Markov chain's entropy rate).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from experiments import records, tables
from experiments.records import Record, best_rate, group, headline, higher_is_better, mean
from experiments.studies import anchors
from experiments.studies.base import SYNCHRONOUS, SYNCHRONOUS_METHOD

REPORT = "report.md"


# --- Numbers ------------------------------------------------------------------------------


def metric_name(record: Record) -> str:
    if record.test_accuracy is not None:
        return "test accuracy (%)"
    return "test loss - floor" if record.loss_floor is not None else "test loss"


def summary(rows: Sequence[Record]) -> str:
    """``mean +- std`` of the headline metric over seeds, with diverged runs counted."""
    values = np.asarray([headline(r) for r in rows])
    if higher_is_better(rows[0]):
        text = f"{100 * values.mean():.1f} +- {100 * values.std():.1f}"
    else:
        text = f"{values.mean():.3g} +- {values.std():.2g}"
    diverged = sum(r.diverged for r in rows)
    return text + (f" ({diverged}/{len(rows)} div.)" if diverged else "")


def final_train_loss(rows: Sequence[Record]) -> str:
    """Mean final training loss over seeds (``nan`` if any run's loss was not finite)."""
    losses = [np.nan if r.final_train_loss is None else r.final_train_loss for r in rows]
    return f"{np.mean(losses):.4g}"


# --- Sections -----------------------------------------------------------------------------


def anchors_section(rows: list[Record]) -> list[str]:
    lines = [
        "## Sanity anchors: the MNIST-1D paper",
        "",
        "Synchronous data-parallel training with fsq's catalogue (Flying Squirrel with delay "
        f"0 and every extra off over `fsq.adam`, learning rate {anchors.LEARNING_RATE}, "
        f"{anchors.WORKERS} workers x {anchors.BATCH} examples = batch "
        f"{anchors.WORKERS * anchors.BATCH}), against the test accuracies of Greydanus "
        f"(2020), with a tolerance of {100 * anchors.TOLERANCE:.0f} points.",
        "",
    ]
    table, verdicts = [], []
    for task, runs in group(rows, "task").items():
        accuracy = np.asarray([r.test_accuracy for r in runs])
        paper = anchors.PAPER[task]
        within = bool(abs(accuracy.mean() - paper) <= anchors.TOLERANCE)
        verdicts.append(within)
        table.append(
            {
                "task": task,
                "steps": runs[0].steps,
                "seeds": len(runs),
                "paper (%)": f"{100 * paper:.0f}",
                "fsq (%)": f"{100 * accuracy.mean():.1f} +- {100 * accuracy.std():.1f}",
                "difference (points)": f"{100 * (accuracy.mean() - paper):+.1f}",
                "within 3 points": "yes" if within else "no",
            }
        )
    lines += [tables.markdown(table), ""]
    if all(verdicts):
        lines.append("All anchors are reproduced within 3 points.")
    else:
        missed = [t["task"] for t, ok in zip(table, verdicts, strict=True) if not ok]
        lines.append(f"Not within 3 points: {', '.join(missed)} (see the steps column).")
    return [*lines, ""]


def classic_section(rows: list[Record]) -> list[str]:
    lines = [
        "## Classic catalogue",
        "",
        "Per task and optimizer: the best synchronous learning rate (by the headline "
        "metric), its final training loss and metric, then the metric once uniform delays "
        "are added at that rate, frozen (plain asynchronous Flying Squirrel: no "
        "compensation, no staleness rule). Percentages in brackets are of synchronous. "
        "Plots: training curves at the best learning rate (loss above the floor where it "
        "is known), the metric against the learning rate, and against the delay.",
        "",
        _image("classic_curves.png", "best curves"),
        _image("classic_sensitivity.png", "learning-rate sensitivity"),
        _image("classic_staleness.png", "staleness tolerance"),
        "",
    ]
    for task, by_task in group(rows, "task").items():
        first = by_task[0]
        delays = [d for d in group(by_task, "delay") if d != SYNCHRONOUS]
        table = []
        for method, runs in group(by_task, "method").items():
            sync = [r for r in runs if r.delay == SYNCHRONOUS]
            lr = best_rate(sync)
            at_lr = group(runs, "learning_rate")[lr]
            best = group(at_lr, "delay")
            row = {
                "optimizer": method,
                "best lr": lr,
                "final train loss": final_train_loss(best[SYNCHRONOUS]),
                metric_name(first): summary(best[SYNCHRONOUS]),
            }
            for delay in delays:
                row[delay] = summary(best[delay]) + _relative(best[delay], best[SYNCHRONOUS])
            table.append(row)
        lines += [
            f"**{task}** ({first.workers} workers x {_batch(first)}, {first.steps} steps, "
            f"{len(group(by_task, 'seed'))} seeds; {metric_name(first)}):",
            "",
            tables.markdown(table),
            "",
        ]
    return lines


def _image(name: str, caption: str) -> str:
    return f"![{caption}]({name})"


def _batch(record: Record) -> str:
    return f"batch {record.hyperparameters['batch_size']}"


def _relative(rows: Sequence[Record], reference: Sequence[Record]) -> str:
    if not higher_is_better(rows[0]):
        return ""
    return f" ({100 * mean(rows) / mean(reference):.0f}%)"


def staleness_section(rows: list[Record]) -> list[str]:
    lines = [
        "## Staleness",
        "",
        "Learning rate tuned for synchronous training, frozen, then uniform delays up to "
        "`max_delay` (columns). Percentages in brackets are of synchronous.",
        "",
        _image("staleness.png", "metric against delay"),
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
            row |= {d: summary(cells[d]) + _relative(cells[d], sync) for d in delays}
            table.append(row)
        lines += [
            f"**{task}, {inner} inner** (lr {lr}, {sync[0].workers} workers x {_batch(sync[0])}, "
            f"{sync[0].steps} steps, {len(sync)} seeds; {metric_name(sync[0])}):",
            "",
            tables.markdown(table),
            "",
        ]
    return lines


def steps_to_target(rows: Sequence[Record]) -> float:
    """Mean steps to the target over seeds; infinite if any seed missed it."""
    steps = [r.steps_to_target for r in rows]
    return float("inf") if None in steps else float(np.mean(steps))


def speedups(rows: list[Record]) -> dict[tuple[str, str], dict[int, tuple[float, float]]]:
    """Per (task, method): ``{W: (best lr, steps to target)}``, best lr per ``W``."""
    out: dict[tuple[str, str], dict[int, tuple[float, float]]] = {}
    for key, runs in group(rows, "task", "method").items():
        out[key] = {}
        for w, by_w in group(runs, "workers").items():
            by_rate = group(by_w, "learning_rate")
            lr = min(by_rate, key=lambda x: steps_to_target(by_rate[x]))
            out[key][w] = (lr, steps_to_target(by_rate[lr]))
    return out


def workers_section(rows: list[Record]) -> list[str]:
    lines = [
        "## Workers: speed-up",
        "",
        "Steps until the test loss (evaluated 50 times per run) reaches the target, at the "
        "best learning rate per `W` (mean over seeds; `-` if a seed never reached it), for "
        "synchronous training and for Flying Squirrel with uniform delays up to `W` steps. "
        "Each worker keeps its batch, so linear speed-up is `speed-up = W`. The learning "
        "rates are half a decade apart and a test loss near the target can cross it early "
        "or late by chance, so single speed-ups carry noise of tens of percent: read the "
        "trend.",
        "",
        _image("workers.png", "speed-up against workers"),
        "",
    ]
    for (task, method), by_w in speedups(rows).items():
        base = by_w[min(by_w)][1]
        table = [
            {
                "W": w,
                "best lr": lr,
                "steps to target": "-" if np.isinf(s) else f"{s:.0f}",
                "speed-up": "-" if np.isinf(s) else f"{base / s:.2f}",
                "efficiency": "-" if np.isinf(s) else f"{base / s / (w / min(by_w)):.2f}",
            }
            for w, (lr, s) in by_w.items()
        ]
        sample = next(r for r in rows if r.task == task)
        lines += [
            f"**{task}, {method}** ({_batch(sample)} per worker, target test loss "
            f"{sample.target_loss}, {sample.steps} steps):",
            "",
            tables.markdown(table),
            "",
        ]
    return lines


def _percent_of(rows: Sequence[Record], reference: Sequence[Record]) -> str:
    return f"{100 * mean(rows) / mean(reference):.1f}%"


def faults_section(rows: list[Record]) -> list[str]:
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
            {"scenario": m, metric_name(r[0]): summary(r), "of failure-free": _percent_of(r, clean)}
            for m, r in by_method.items()
        ]
        lines += [
            f"**{task}, delays {delay}** ({clean[0].workers} workers x {_batch(clean[0])}, "
            f"{clean[0].steps} steps, {len(clean)} seeds):",
            "",
            tables.markdown(table),
            "",
        ]
    return lines


def compression_section(rows: list[Record]) -> list[str]:
    lines = [
        "## Compression",
        "",
        "Synchronous training with each worker's message compressed (EF: error feedback). "
        "Bytes per step are the compressed message's; dense float32 is the 1x reference.",
        "",
    ]
    for (task, shards), runs in group(rows, "task", "shards").items():
        by_method = group(runs, "method")
        dense = by_method["dense"]
        table = [
            {
                "method": m,
                metric_name(r[0]): summary(r),
                "of dense": _percent_of(r, dense),
                "bytes / step": r[0].bytes_per_step,
                "fewer bytes": f"{dense[0].bytes_per_step / r[0].bytes_per_step:.1f}x",
            }
            for m, r in by_method.items()
        ]
        lines += [
            f"**{task}, {shards} shards** ({dense[0].workers} workers x {_batch(dense[0])}, "
            f"{dense[0].steps} steps, {len(dense)} seeds):",
            "",
            tables.markdown(table),
            "",
        ]
    return lines


SECTIONS: dict[str, Callable[[list[Record]], list[str]]] = {
    "anchors": anchors_section,
    "classic": classic_section,
    "staleness": staleness_section,
    "workers": workers_section,
    "faults": faults_section,
    "compression": compression_section,
}


def markdown(meta: dict[str, Any], rows: list[Record]) -> str:
    """The text of ``report.md``: a pure function of the results."""
    seconds = meta.get("wall_seconds", {})
    timing = ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
    lines = [
        # Front matter for the Sphinx site (docs/studies/): the page may sit outside a toctree.
        "---",
        "orphan: true",
        "---",
        "",
        f"# fsq studies: {', '.join(group(rows, 'study'))}",
        "",
        f"Generated from `{records.RESULTS_JSON}` by `python -m experiments report`. "
        f"Run: `{meta.get('command', '')}` ({meta.get('scale', '')} scale, "
        f"{meta.get('devices', '')} simulated devices, jax {meta.get('jax', '')}; wall time "
        f"{timing or 'not recorded'}).",
        "",
    ]
    studies = group(rows, "study")
    for name, section in SECTIONS.items():
        if name in studies:
            lines += section(studies[name])
    lines += [
        "## Communication",
        "",
        "Bytes each worker sends per step are dense float32 gradients (x3 with delay "
        "compensation's extra channels) or, in the compression study, the compressed "
        "message; the plot puts each configuration's metric, at its "
        "best learning rate, against the bytes each worker sent over the run.",
        "",
        _image("bytes.png", "metric against bytes sent"),
        "",
    ]
    return "\n".join(lines)


# --- Plots --------------------------------------------------------------------------------


def _axes(count: int, width: float = 4.5):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, count, figsize=(width * count, 3.6), squeeze=False)
    return plt, fig, axes[0]


def _save(plt, fig, path: pathlib.Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def plot_classic(rows: list[Record], out: pathlib.Path) -> None:
    by_task = group(rows, "task")
    plt, fig, axes = _axes(len(by_task))
    for ax, (task, runs) in zip(axes, by_task.items(), strict=True):
        for method, by_method in group(runs, "method").items():
            sync = [r for r in by_method if r.delay == SYNCHRONOUS]
            best = group(sync, "learning_rate")[best_rate(sync)]
            curve = np.mean([np.asarray(r.curve, float) for r in best], axis=0)
            steps = np.linspace(0, best[0].steps, len(curve) + 1)[1:]
            # Smoothed over 5 points: near a floor, noise makes single points negative.
            smooth = np.convolve(curve - (best[0].loss_floor or 0.0), np.ones(5) / 5, "valid")
            ax.plot(steps[len(steps) - len(smooth) :], smooth, label=method)
        ax.set_yscale("log")
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss" + (" - floor" if runs[0].loss_floor is not None else ""))
    axes[0].legend(fontsize=7)
    _save(plt, fig, out / "classic_curves.png")

    plt, fig, axes = _axes(len(by_task))
    for ax, (task, runs) in zip(axes, by_task.items(), strict=True):
        for method, by_method in group(runs, "method").items():
            sync = group([r for r in by_method if r.delay == SYNCHRONOUS], "learning_rate")
            rates = sorted(sync)
            ax.plot(rates, [_plotted(sync[lr]) for lr in rates], marker="o", label=method)
        _metric_axis(ax, runs[0])
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (synchronous)")
        ax.set_title(task)
    axes[0].legend(fontsize=7)
    _save(plt, fig, out / "classic_sensitivity.png")

    plt, fig, axes = _axes(len(by_task))
    for ax, (task, runs) in zip(axes, by_task.items(), strict=True):
        for method, by_method in group(runs, "method").items():
            sync = [r for r in by_method if r.delay == SYNCHRONOUS]
            at_lr = group(group(by_method, "learning_rate")[best_rate(sync)], "delay")
            bounds = [r.hyperparameters["max_delay"] for r in (v[0] for v in at_lr.values())]
            ax.plot(bounds, [_plotted(v) for v in at_lr.values()], marker="o", label=method)
        _metric_axis(ax, runs[0])
        ax.set_xlabel("max delay (uniform), lr frozen")
        ax.set_title(task)
    axes[0].legend(fontsize=7)
    _save(plt, fig, out / "classic_staleness.png")


def _plotted(rows: Sequence[Record]) -> float:
    """The mean headline metric in plot units; not plotted (NaN) if every run diverged."""
    if all(r.diverged for r in rows):
        return float("nan")
    value = mean(rows)
    return 100 * value if higher_is_better(rows[0]) else value


def _metric_axis(ax, record: Record) -> None:
    ax.set_ylabel(metric_name(record))
    if not higher_is_better(record):
        ax.set_yscale("log")


def plot_staleness(rows: list[Record], out: pathlib.Path) -> None:
    panels = group(rows, "task", "inner")
    plt, fig, axes = _axes(len(panels))
    for ax, ((task, inner), runs) in zip(axes, panels.items(), strict=True):
        sync_runs = [r for r in runs if r.method == SYNCHRONOUS_METHOD]
        sync = group(sync_runs, "learning_rate")[best_rate(sync_runs)]
        for method, by_method in group(runs, "method").items():
            if method == SYNCHRONOUS_METHOD:
                continue
            cells = group(by_method, "delay")
            bounds = [0] + [v[0].hyperparameters["max_delay"] for v in cells.values()]
            values = [_plotted(sync)] + [_plotted(v) for v in cells.values()]
            ax.plot(bounds, values, marker="o", label=method)
        ax.axhline(_plotted(sync), color="gray", linestyle="--", linewidth=0.8)
        ax.set_xscale("symlog", linthresh=4)
        _metric_axis(ax, runs[0])
        ax.set_xlabel("max delay (uniform)")
        ax.set_title(f"{task}, {inner} inner")
    axes[0].legend(fontsize=7)
    _save(plt, fig, out / "staleness.png")


def plot_workers(rows: list[Record], out: pathlib.Path) -> None:
    by_task: dict[str, dict] = {}
    for (task, method), by_w in speedups(rows).items():
        by_task.setdefault(task, {})[method] = by_w
    plt, fig, axes = _axes(len(by_task))
    for ax, (task, methods) in zip(axes, by_task.items(), strict=True):
        for method, by_w in methods.items():
            base = by_w[min(by_w)][1]
            ws = [w for w, (_, s) in by_w.items() if np.isfinite(s)]
            ax.plot(ws, [base / by_w[w][1] for w in ws], marker="o", label=method)
        ws = sorted({w for by_w in methods.values() for w in by_w})
        ax.plot(ws, [w / ws[0] for w in ws], color="gray", linestyle="--", label="linear")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("workers W")
        ax.set_ylabel("speed-up in steps to target")
        ax.set_title(task)
    axes[0].legend(fontsize=7)
    _save(plt, fig, out / "workers.png")


def plot_bytes(rows: list[Record], out: pathlib.Path) -> None:
    by_task = group(rows, "task")
    plt, fig, axes = _axes(len(by_task))
    for ax, (task, runs) in zip(axes, by_task.items(), strict=True):
        for (study, method), by_method in group(runs, "study", "method").items():
            points = []
            for cell in group(by_method, "delay", "workers").values():
                best = group(cell, "learning_rate")[best_rate(cell)]
                points.append((best[0].bytes_per_step * best[0].steps, _plotted(best)))
            sent, value = np.asarray(points).T
            ax.scatter(sent, value, s=14, label=f"{study}: {method}")
        ax.set_xscale("log")
        _metric_axis(ax, runs[0])
        ax.set_xlabel("bytes sent per worker over the run")
        ax.set_title(task)
    axes[0].legend(fontsize=6)
    _save(plt, fig, out / "bytes.png")


PLOTS: dict[str, Callable[[list[Record], pathlib.Path], None]] = {
    "classic": plot_classic,
    "staleness": plot_staleness,
    "workers": plot_workers,
}


def write(out: pathlib.Path) -> pathlib.Path:
    """Writes ``report.md`` and the PNGs of ``out / results.json`` into ``out``."""
    meta, rows = records.read(out)
    studies = group(rows, "study")
    for name, plot in PLOTS.items():
        if name in studies:
            plot(studies[name], out)
    plot_bytes(rows, out)
    path = out / REPORT
    path.write_text(markdown(meta, rows))
    return path
