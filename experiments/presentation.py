"""What the studies' sections and plots share: headline numbers, table cells, figures."""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence

import numpy as np
from matplotlib.ticker import FuncFormatter, NullFormatter
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


def converged(rows: Sequence[Record]) -> list[Record]:
    """The runs that did not diverge."""
    return [r for r in rows if not r.diverged]


def diverged_tag(rows: Sequence[Record]) -> str:
    """``"div. (k/n)"`` when ``k`` of the ``n`` runs diverged, else ``""``."""
    k = sum(r.diverged for r in rows)
    return f"div. ({k}/{len(rows)})" if k else ""


def summary(rows: Sequence[Record]) -> str:
    """``mean +- std`` of the headline metric over the seeds that did not diverge (the mean
    alone for one), then ``div. (k/n)`` for those that did (never averaged in);
    ``div. (n/n)`` alone if all did."""
    ok = converged(rows)
    if not ok:
        return diverged_tag(rows)
    values = np.asarray([headline(r) for r in ok])
    if higher_is_better(rows[0]):
        text = f"{100 * values.mean():.1f}"
        spread = f" +- {100 * values.std():.1f}"
    else:
        text = f"{values.mean():.3g}"
        spread = f" +- {values.std():.2g}"
    text += spread if len(values) > 1 else ""  # one run has no spread to show
    return " ".join(filter(None, (text, diverged_tag(rows))))


def seed_count(n: int) -> str:
    """``"1 seed"``, ``"3 seeds"``."""
    return f"{n} seed" if n == 1 else f"{n} seeds"


def final_train_loss(rows: Sequence[Record]) -> str:
    """Mean final training loss over seeds (``nan`` if any run's loss was not finite)."""
    losses = [np.nan if r.final_train_loss is None else r.final_train_loss for r in rows]
    return f"{np.mean(losses):.4g}"


def image(name: str, caption: str) -> str:
    return f"![{caption}]({name})"


def batch(record: Record) -> str:
    return f"batch {record.hyperparameters['batch_size']}"


def _percent(rows: Sequence[Record], reference: Sequence[Record]) -> float | None:
    """The metric of ``rows`` in % of ``reference``'s, over the runs that did not diverge
    (``None`` if either has none)."""
    if not converged(rows) or not converged(reference):
        return None
    return 100 * mean(converged(rows)) / mean(converged(reference))


def relative(rows: Sequence[Record], reference: Sequence[Record]) -> str:
    """`` (x%)`` of the reference's metric, over the runs that did not diverge."""
    percent = _percent(rows, reference)
    return "" if not higher_is_better(rows[0]) or percent is None else f" ({percent:.0f}%)"


def percent_of(rows: Sequence[Record], reference: Sequence[Record]) -> str:
    percent = _percent(rows, reference)
    return (diverged_tag(rows) or "-") if percent is None else f"{percent:.1f}%"


LINESTYLES = ("-", "--", "-.", ":")
DIVERGED = "diverged"  # the gid of the markers of diverged runs


def style(index: int) -> dict:
    """The colour and line style of a figure's ``index``-th series: no two of the first 40
    alike, and neighbours differ in both."""
    return {"color": f"C{index % 10}", "linestyle": LINESTYLES[index % 4]}


def figure(count: int, width: float = 4.8):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8}
    )
    fig, axes = plt.subplots(1, count, figsize=(width * count, 4.0), squeeze=False)
    return plt, fig, axes[0]


def save(plt, fig, path: pathlib.Path) -> None:
    """Writes ``fig`` with its legends (see :func:`legend`) and closes it."""
    bottom = legend(fig)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


# More entries than this find no free corner inside an axes: they go beneath the axes.
INSIDE_ENTRIES = 6


def labelled(ax) -> list:
    """The series of ``ax`` that have a label (matplotlib's own start with ``_``)."""
    return [a for a in ax.get_lines() + ax.collections if not a.get_label().startswith("_")]


def _look(artist) -> tuple:
    if hasattr(artist, "get_linestyle") and hasattr(artist, "get_marker"):
        return (str(artist.get_color()), str(artist.get_linestyle()), str(artist.get_marker()))
    return (str(artist.get_label()),)


def legend(fig) -> float:
    """A legend for every axes that shows more than one labelled series: inside it when
    short; when some are long (they would cover data), one legend for the figure beneath
    the axes, each label once (if a label is drawn alike in every axes, and there are
    several axes; else each legend goes beside its own axes). Returns the figure
    fraction a figure legend takes at the bottom."""
    series_of = {ax: labelled(ax) for ax in fig.axes}
    axes = [ax for ax, drawn in series_of.items() if len(drawn) > 1]
    if not any(len(series_of[ax]) > INSIDE_ENTRIES for ax in axes):
        for ax in axes:
            ax.legend(fontsize=8)
        return 0.0
    entries: dict[str, object] = {}
    for ax in axes:
        for artist in series_of[ax]:
            entries.setdefault(artist.get_label(), artist)
    alike = all(_look(entries[a.get_label()]) == _look(a) for ax in axes for a in series_of[ax])
    if not alike or len(fig.axes) == 1:  # tight_layout makes room beside the axes
        for ax in axes:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
        return 0.0
    # As many columns as fit the figure's width (8-point text: about 0.065 in a character).
    column_inches = 0.7 + 0.065 * max(len(label) for label in entries)
    columns = max(1, min(len(entries), int(fig.get_figwidth() // column_inches)))
    fig.legend(list(entries.values()), list(entries), fontsize=8, loc="lower center", ncols=columns)
    rows = math.ceil(len(entries) / columns)
    return min(0.6, (0.1 + 0.2 * rows) / fig.get_figheight())


def series(ax, xs, ys, *, index: int, label: str, higher_is_better: bool, **kwargs) -> None:
    """A method's values against ``xs``: finite ones as a line, NaN ones (every seed
    diverged) as crosses on the axes' worst edge, labelled ``div.``, never dropped."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    finite = np.isfinite(ys)
    look = {**style(index), **kwargs}  # a colour given overrides the series' own
    ax.plot(xs[finite], ys[finite], label=label, **look)
    if not finite.all():
        edge = 0.0 if higher_is_better else 1.0
        ax.plot(
            xs[~finite],
            np.full((~finite).sum(), edge),
            "x",
            color=look["color"],
            markersize=9,
            markeredgewidth=2,
            transform=ax.get_xaxis_transform(),  # x in data, y on the axes' edge
            clip_on=False,
            gid=DIVERGED,
            label=f"{label}: div.",
        )


def points(ax, xs, cells: Sequence[Sequence[Record]], *, index: int, label: str) -> None:
    """A method's headline metric per cell of runs against ``xs``, as a :func:`series` of
    dots (a cell whose every run diverged marked)."""
    values = [plotted(cell) for cell in cells]
    better = higher_is_better(cells[0][0])
    series(ax, xs, values, index=index, label=label, higher_is_better=better, marker="o")


def plain_ticks(axis) -> None:
    """Tick labels as plain numbers (2.2, not 2.2x10^0), minor ticks too."""

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}"))


def loss_scale(ax, values) -> None:
    """A log y axis for losses; symmetric-log where values reach zero or below (a loss
    above its floor, noisy near it), so that no point falls off the axis."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if values.size and values.min() <= 0:
        # Linear up to the decade of the bulk of the values: noise around zero stays
        # flat instead of spiking down decades.
        positive = np.abs(values[values != 0])
        bulk = np.percentile(positive, 25) if positive.size else 1.0
        ax.set_yscale("symlog", linthresh=float(10 ** np.floor(np.log10(bulk))))
    else:
        ax.set_yscale("log")
        plain_ticks(ax.yaxis)
        if values.size and values.max() / values.min() >= 10:  # decades: minor labels collide
            ax.yaxis.set_minor_formatter(NullFormatter())


def speedup_axes(ax) -> None:
    """Workers against speed-up, both on base-2 log scales with plain numbers (4, not 2^2)."""
    for axis, scale in ((ax.xaxis, ax.set_xscale), (ax.yaxis, ax.set_yscale)):
        scale("log", base=2)
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_xlabel("workers W")


def plotted(rows: Sequence[Record]) -> float:
    """The mean headline metric over the runs that did not diverge, in plot units; NaN if
    every run diverged (plots mark those: :func:`mark_diverged`)."""
    if not converged(rows):
        return float("nan")
    value = mean(converged(rows))
    return 100 * value if higher_is_better(rows[0]) else value


def metric_axis(ax, record: Record) -> None:
    ax.set_ylabel(metric_name(record))
    if not higher_is_better(record):
        data = [line for line in ax.get_lines() if line.get_gid() != DIVERGED]
        loss_scale(ax, [y for line in data for y in line.get_ydata()])
