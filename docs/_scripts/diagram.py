"""Draws docs/clock.png, the diagram of the concepts page.

Top: the logical clock. Every worker sends a gradient at every step; each arrow runs
from the step it was computed at to the step it is delivered at (its delay). Bottom: the
in-flight buffer of one device at step t, and the one all-reduce that delivers.

Run from the repository root: ``python docs/_scripts/diagram.py`` (needs matplotlib,
from the ``experiments`` extra).
"""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = pathlib.Path(__file__).parents[1] / "clock.png"
# delays[i][s]: the delay of the gradient worker i computes at step s (max_delay 2).
DELAYS = [[0, 1, 0, 2, 0], [2, 0, 1, 0, 1], [1, 2, 0, 0, 2]]
COLORS = ["tab:green", "tab:orange", "tab:red"]
DELIVER_Y = -1.2
SPREAD = 0.15  # workers' dots are spread around their step so that arrows do not overlap


def draw_clock(ax: plt.Axes) -> None:
    steps = len(DELAYS[0])
    arrived = [0] * (steps + max(map(max, DELAYS)))
    for worker, row in enumerate(DELAYS):
        y = len(DELAYS) - 1 - worker
        ax.text(-0.6, y, f"worker {worker}", ha="right", va="center")
        for sent, delay in enumerate(row):
            arrived[sent + delay] += 1
            x = sent + SPREAD * (worker - 1)
            ax.plot(x, y, "o", color="black", ms=5, zorder=3)
            ax.add_patch(
                FancyArrowPatch(
                    (x, y),
                    (sent + delay, DELIVER_Y),
                    arrowstyle="-|>",
                    mutation_scale=10,
                    color=COLORS[delay],
                    lw=1.3,
                    connectionstyle="arc3,rad=0.15" if delay else "arc3",
                )
            )
    ax.text(-0.6, DELIVER_Y, "delivered", ha="right", va="center", weight="bold")
    for step, count in enumerate(arrived):
        ax.text(step, DELIVER_Y - 0.45, f"{count}", ha="center", va="top", fontsize=9)
    ax.text(-0.6, DELIVER_Y - 0.45, "how many", ha="right", va="top", fontsize=9)
    for delay, color in enumerate(COLORS):
        ax.plot([], [], color=color, label=f"delay {delay}")
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, 1.18), ncol=3, frameon=False)
    ax.set_xticks(range(len(arrived)), [f"t={t}" for t in range(len(arrived))])
    ax.set_xlim(-2.6, len(arrived) - 0.4)
    ax.set_ylim(DELIVER_Y - 1.0, len(DELAYS) - 0.4)
    ax.set_yticks([])
    ax.set_title("The logical clock: a gradient sent at step s arrives at step s + d", loc="left")
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)


def box(ax: plt.Axes, x: float, y: float, w: float, h: float, text: str, color: str) -> None:
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=color, ec="black"))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9)


def arrow(ax: plt.Axes, start: tuple[float, float], end: tuple[float, float]) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=10, lw=1.2))


def draw_buffer(ax: plt.Axes) -> None:
    box(ax, 0.0, 2.2, 2.2, 0.6, "local workers\n(vmap, W / D)", "#e8f0fe")
    box(ax, 0.0, 1.0, 2.2, 0.6, "messages $m_i$, delays $d_i$", "#e8f0fe")
    arrow(ax, (1.1, 2.2), (1.1, 1.65))
    rows = ["due: delivered at t", "slot (t+1) mod L", "slot (t+2) mod L"]
    for k, label in enumerate(rows):
        box(ax, 3.2, 2.4 - 0.75 * k, 2.4, 0.5, label, "#fff4e0" if k else "#ffe0b2")
    ax.text(4.4, 3.05, "in-flight buffer of one device", ha="center", fontsize=9, weight="bold")
    arrow(ax, (2.25, 1.3), (3.15, 2.6))
    ax.text(2.45, 2.2, "$d_i = 0$", fontsize=9)
    arrow(ax, (2.25, 1.3), (3.15, 1.05))
    ax.text(0.0, 0.75, "$d_i \\geq 1$: added to slot $(t + d_i)$ mod L", fontsize=9)
    ax.add_patch(
        FancyArrowPatch(
            (5.6, 1.9),
            (5.6, 2.55),
            arrowstyle="-|>",
            mutation_scale=10,
            lw=1.0,
            connectionstyle="arc3,rad=-0.6",
            linestyle="--",
        )
    )
    ax.text(5.9, 1.95, "next step's due\n(read after the writes)", fontsize=8)
    box(ax, 6.5, 2.35, 2.3, 0.6, "one all-reduce\n(sum over devices)", "#e6f4ea")
    arrow(ax, (5.65, 2.65), (6.45, 2.65))
    box(
        ax,
        6.5,
        1.1,
        2.3,
        0.75,
        "$G_t$ = sum / W\ninner optimizer steps\n(same on every worker)",
        "#e6f4ea",
    )
    arrow(ax, (7.65, 2.35), (7.65, 1.9))
    ax.set_xlim(-0.1, 9.0)
    ax.set_ylim(0.6, 3.3)
    ax.axis("off")


def main() -> None:
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(8.5, 6.5), gridspec_kw={"height_ratios": [1.25, 1]}
    )
    draw_clock(top)
    draw_buffer(bottom)
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
