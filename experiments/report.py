"""The report of a results folder: ``report.md`` and PNG plots, from ``results.json`` alone.

:func:`markdown` is a pure function of the records (same JSON, byte-identical report),
and each plot is drawn from them with fixed styles, so ``python -m experiments report
--out DIR`` regenerates the report of any saved run. Each study of the registry
(:data:`experiments.studies.STUDIES`) present in the records gives its section and its
plots; the communication plot spans them all.

Cells are ``mean +- std`` over seeds. The headline metric is the test accuracy for
classifiers, and otherwise the test loss above the task's exact floor where it is known
(the quadratic's noise, the Markov chain's entropy rate).
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
from matplotlib.ticker import NullFormatter

from experiments import records
from experiments.presentation import figure, image, metric_axis, plotted, save, series
from experiments.records import Record, best_rate, group, higher_is_better
from experiments.studies import STUDIES

REPORT = "report.md"


def ran(meta: dict[str, Any]) -> str:
    """The command that made the results: a rerun names itself and what it reran."""
    command = f"`{meta.get('command', '')}`"
    return f"`{meta['rerun']}`, again what {command} ran" if meta.get("rerun") else command


def markdown(meta: dict[str, Any], rows: list[Record]) -> str:
    """The text of ``report.md``: a pure function of the results."""
    seconds = meta.get("wall_seconds", {})
    timing = ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
    lines = [
        f"# fsq studies: {', '.join(group(rows, 'study'))}",
        "",
        f"Generated from `{records.RESULTS_JSON}` by `python -m experiments report`. "
        f"Run: {ran(meta)} ({meta.get('scale', '')} scale, "
        f"{meta.get('devices', '')} {device_kind(meta)} devices"
        f"{processes(meta)}, jax {meta.get('jax', '')}; wall time "
        f"{timing or 'not recorded'}).",
        "",
    ]
    studies = group(rows, "study")
    for name, study in STUDIES.items():
        if name in studies:
            lines += study.section(studies[name])
    if not bytes_vary(rows):
        return "\n".join(lines)
    lines += [
        "## Communication",
        "",
        "Bytes each worker sends per step are dense float32 gradients (x3 with delay "
        "compensation's extra channels) or, in the compression study, the compressed "
        "message; the plot puts each configuration's metric, at its "
        "best learning rate, against the bytes each worker sent over the run (runs in "
        "time, whose workers send only when a job ends, are left out).",
        "",
        image("bytes.png", "metric against bytes sent"),
        "",
    ]
    return "\n".join(lines)


def device_kind(meta: dict[str, Any]) -> str:
    platform = meta.get("platform", "cpu")
    return "simulated CPU" if platform == "cpu" else platform.upper()


def processes(meta: dict[str, Any]) -> str:
    count = meta.get("processes", 1)
    return f" in {count} processes" if count > 1 else ""


def in_bytes_plot(record: Record) -> bool:
    """Workers in time send only when a job ends: their bytes per step are not comparable;
    nor are the runs of a study that opts out (:attr:`Study.in_bytes_plot`)."""
    study = STUDIES.get(record.study)
    return not records.timed(record) and (study is None or study.in_bytes_plot)


def bytes_vary(rows: list[Record]) -> bool:
    """Whether the bytes sent differ between some runs of one task: else the plot of the
    metric against them would be one column, a figure of an accident."""
    sent = group([r for r in rows if in_bytes_plot(r)], "task")
    return any(len({r.bytes_per_step * r.steps for r in runs}) > 1 for runs in sent.values())


def plot_bytes(rows: list[Record], out: pathlib.Path) -> None:
    if not bytes_vary(rows):
        return
    rows = [r for r in rows if in_bytes_plot(r)]
    by_task = {t: r for t, r in group(rows, "task").items() if bytes_vary(r)}
    plt, fig, axes = figure(len(by_task))
    for ax, (task, runs) in zip(axes, by_task.items(), strict=True):
        for i, ((study, method), by_method) in enumerate(group(runs, "study", "method").items()):
            points = []
            for cell in group(by_method, "delay", "workers").values():
                best = group(cell, "learning_rate")[best_rate(cell)]
                points.append((best[0].bytes_per_step * best[0].steps, plotted(best)))
            sent, value = np.asarray(points).T
            marker = "osD^v<>p*h"[i % 10]
            kwargs = {"marker": marker, "linestyle": "none", "markersize": 5}
            series(
                ax,
                sent,
                value,
                index=i,
                label=f"{study}: {method}",
                **kwargs,
                higher_is_better=higher_is_better(runs[0]),
            )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: minor labels collide
        metric_axis(ax, runs[0])
        ax.set_xlabel("bytes sent per worker over the run")
        ax.set_title(task)
    save(plt, fig, out / "bytes.png")


def write(out: pathlib.Path) -> pathlib.Path:
    """Writes ``report.md`` and the PNGs of ``out / results.json`` into ``out``."""
    meta, rows = records.read(out)
    studies = group(rows, "study")
    for name, study in STUDIES.items():
        if name in studies and study.plot is not None:
            study.plot(studies[name], out)
    plot_bytes(rows, out)
    path = out / REPORT
    path.write_text(markdown(meta, rows))
    return path
