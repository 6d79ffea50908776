"""What the studies' sections and plots share: headline numbers, table cells, figures."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np
from tabulate import tabulate

from experiments.records import Record, headline, higher_is_better, mean


def markdown(rows: Sequence[dict]) -> str:
    """A Markdown table of ``rows`` (one dict per row, same keys), floats to 4 digits."""
    return tabulate(rows, headers="keys", tablefmt="github", floatfmt=".4g", disable_numparse=True)


def table_block(caption: str, rows: Sequence[dict]) -> list[str]:
    """The lines of a captioned table in a report section."""
    return [caption, "", markdown(rows), ""]


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


def image(name: str, caption: str) -> str:
    return f"![{caption}]({name})"


def batch(record: Record) -> str:
    return f"batch {record.hyperparameters['batch_size']}"


def relative(rows: Sequence[Record], reference: Sequence[Record]) -> str:
    if not higher_is_better(rows[0]):
        return ""
    return f" ({100 * mean(rows) / mean(reference):.0f}%)"


def percent_of(rows: Sequence[Record], reference: Sequence[Record]) -> str:
    return f"{100 * mean(rows) / mean(reference):.1f}%"


def figure(count: int, width: float = 4.5):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, count, figsize=(width * count, 3.6), squeeze=False)
    return plt, fig, axes[0]


def save(plt, fig, path: pathlib.Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def speedup_axes(ax) -> None:
    """Workers against speed-up, both on base-2 log scales with plain numbers (4, not 2^2)."""
    from matplotlib.ticker import FuncFormatter

    for axis, scale in ((ax.xaxis, ax.set_xscale), (ax.yaxis, ax.set_yscale)):
        scale("log", base=2)
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_xlabel("workers W")


def plotted(rows: Sequence[Record]) -> float:
    """The mean headline metric in plot units; not plotted (NaN) if every run diverged."""
    if all(r.diverged for r in rows):
        return float("nan")
    value = mean(rows)
    return 100 * value if higher_is_better(rows[0]) else value


def metric_axis(ax, record: Record) -> None:
    ax.set_ylabel(metric_name(record))
    if not higher_is_better(record):
        ax.set_yscale("log")
