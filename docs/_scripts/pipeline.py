"""Draws docs/pipeline.png, the picture of Flying Squirrel's pipeline on the concepts page.

Left: each worker's side, the pieces its gradient passes through, with the worker's own
state. Middle: the delay line, the one place with collectives. Right: the delivery side,
identical on every worker, and the inner optimizer.

Run from the repository root: ``python docs/_scripts/pipeline.py`` (needs matplotlib, from
the ``experiments`` extra).
"""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = pathlib.Path(__file__).parents[1] / "pipeline.png"
WORKER_SIDE = [
    ("liveness", "faults"),
    ("reject_non_finite", None),
    ("worker_momentum", "momentum m_i"),
    ("attack", "Byzantine faults"),
    ("bound_staleness", None),
    ("compress", "residual e_i"),
    ("scale_by_staleness", None),
    ("compensation_channels", None),
]
DELIVERY_SIDE = [
    ("robust", "latest votes"),
    ("compensate", "mean square (DC-a)"),
    ("normalise", None),
    ("inner optimizer", "its state"),
]
STAGE_COLORS = {"worker": "#dbe9f6", "line": "#fde2c8", "deliver": "#d9f0d3"}


def box(ax, x, y, w, h, text, color, note=None, fontsize=10, weight="normal"):
    ax.add_patch(
        FancyBboxPatch(
            (x - w / 2, y - h / 2),
            w,
            h,
            boxstyle="round,pad=0.02,rounding_size=0.08",
            facecolor=color,
            edgecolor="black",
            linewidth=1,
        )
    )
    ax.text(
        x,
        y + (0.06 if note else 0),
        text,
        ha="center",
        va="center",
        fontsize=fontsize,
        weight=weight,
        family="monospace",
    )
    if note:
        ax.text(
            x, y - 0.17, note, ha="center", va="center", fontsize=8, style="italic", color="#444444"
        )


def arrow(ax, start, end, **kwargs):
    style = {"arrowstyle": "-|>", "mutation_scale": 12, "color": "black", "lw": 1.2}
    ax.add_patch(FancyArrowPatch(start, end, **{**style, **kwargs}))


def main() -> None:
    fig, ax = plt.subplots(figsize=(13, 7.5))
    ax.set_xlim(-0.2, 13)
    ax.set_ylim(-1.3, 9.2)
    ax.axis("off")

    # Worker side: one column per worker (two drawn, "..." between), own state noted.
    top = 8.0
    for column, (x, title) in enumerate(((1.6, "worker 0"), (4.3, "worker W-1"))):
        ax.text(x, top + 0.75, title, ha="center", fontsize=11, weight="bold")
        ax.text(x, top + 0.42, "gradient g_i(t)", ha="center", fontsize=9)
        for k, (name, note) in enumerate(WORKER_SIDE):
            y = top - 0.95 * k
            box(ax, x, y, 2.3, 0.7, name, STAGE_COLORS["worker"], note if column == 0 else None)
            if k:
                arrow(ax, (x, y + 0.6), (x, y + 0.36))
        arrow(
            ax,
            (x, top - 0.95 * (len(WORKER_SIDE) - 1) - 0.36),
            (6.6, 0.9),
            connectionstyle="arc3,rad=0.15" if column == 0 else "arc3,rad=-0.05",
        )
    ax.text(2.95, top - 3.0, "...", fontsize=20, ha="center", va="center")
    ax.text(
        2.95,
        -0.25,
        "worker side: per worker, its own state\n(any optax transformation may run here too)",
        ha="center",
        va="center",
        fontsize=9,
    )

    # The delay line.
    box(
        ax,
        7.05,
        0.35,
        2.4,
        1.1,
        "delay_line",
        STAGE_COLORS["line"],
        "ring of max_delay + 1 rows per device",
        fontsize=11,
        weight="bold",
    )
    ax.text(
        7.05,
        -0.75,
        "the only collectives:\none all-reduce (or all-gather) per step",
        ha="center",
        va="center",
        fontsize=9,
    )

    # Delivery side.
    x = 10.9
    ax.text(x, top + 0.75, "delivery side", ha="center", fontsize=11, weight="bold")
    ax.text(
        x,
        top + 0.42,
        "identical on every worker; only if anything arrived",
        ha="center",
        fontsize=9,
    )
    # Due sums, into the first delivery piece from the left, clear of the column.
    first = top - 0.3
    ax.plot([8.25, 9.15, 9.15], [0.35, 0.35, first], color="black", lw=1.2)
    arrow(ax, (9.15, first), (x - 1.3, first))
    ax.text(9.05, 2.5, "what is due at t", rotation=90, ha="right", va="center", fontsize=9)
    for k, (name, note) in enumerate(DELIVERY_SIDE):
        y = top - 0.3 - 1.25 * k
        color = STAGE_COLORS["deliver"] if k < len(DELIVERY_SIDE) - 1 else "#f0f0f0"
        box(ax, x, y, 2.6, 0.8, name, color, note)
        if k:
            arrow(ax, (x, y + 0.85), (x, y + 0.41))
    ax.text(
        x,
        top - 0.3 - 1.25 * len(DELIVERY_SIDE) + 0.55,
        "update u_t (the same on every worker)",
        ha="center",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(OUT, dpi=110, metadata={"Software": None})
    print(OUT)


if __name__ == "__main__":
    main()
