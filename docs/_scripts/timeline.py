"""Draws docs/timeline.png, the picture of the Time page: which worker computes what, when.

Four workers whose gradients take 2, 3, 4 and 7 ticks (:func:`fsq.timing.fixed`), under
three policies. The schedule is read from the clock's own state (the jobs each tick
starts, how long they take, when they are applied or discarded), so the picture is what
the library does. Bars: a job, from the tick its worker read the parameters to the end of
its computation; hatched grey: discarded; dots on the server row: inner steps, with the
number of gradients each applies.

Run from the repository root: ``python docs/_scripts/timeline.py`` (needs matplotlib, from
the ``experiments`` extra).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt

import fsq

OUT = pathlib.Path(__file__).parents[1] / "timeline.png"
TICKS = [2, 3, 4, 7]
W, STEPS = len(TICKS), 28
POLICIES = {
    "synchronous: a barrier per round": "synchronous",
    "asynchronous (Flying Squirrel)": "asynchronous",
    "Ringmaster R = 2: staler than 1 step is discarded": fsq.timing.ringmaster(2),
}
COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52"]


def schedule(policy):
    """Per tick: the jobs started ``(worker, start, ticks, applied)`` and the gradients
    applied."""
    tx = fsq.flying_squirrel(
        fsq.sgd(0.1), num_workers=W, compute=fsq.timing.fixed(TICKS), policy=policy
    )
    init = jax.vmap(tx.init, axis_size=W, in_axes=None, axis_name="workers")
    update = jax.jit(jax.vmap(tx.update, in_axes=(0, 0, None), axis_name="workers"))
    params, state = jnp.zeros(1), init(jnp.zeros(1))
    jobs, steps = [], []
    for t in range(STEPS):
        _, state = update(jnp.ones((W, 1)), state, params)
        clock = jax.tree.map(lambda x: x[0], state.worker_states[0])
        row = t % clock.arrival.shape[0]
        for w in range(W):
            if clock.arrival[row, w] >= 0:
                jobs.append((w, t, int(clock.duration[row, w]), bool(clock.applied[row, w])))
        steps.append(int(state.delivered[0]))
    return jobs, steps


def main() -> None:
    fig, axes = plt.subplots(len(POLICIES), 1, figsize=(9, 2.2 * len(POLICIES)), sharex=True)
    for ax, (title, policy) in zip(axes, POLICIES.items(), strict=True):
        jobs, steps = schedule(policy)
        for w, start, ticks, applied in jobs:
            ax.barh(
                W - w,
                ticks,
                left=start,
                height=0.6,
                color=COLORS[w] if applied else "#DDDDDD",
                hatch=None if applied else "///",
                edgecolor="white" if applied else "#888888",
            )
        for t, n in enumerate(steps):
            if n:
                # Applied at the end of tick t: the dot sits at its right edge.
                ax.plot(t + 1, 0, "ko", markersize=4)
                ax.annotate(
                    str(n),
                    (t + 1, 0),
                    textcoords="offset points",
                    xytext=(0, 5),
                    ha="center",
                    fontsize=7,
                )
        ax.set_yticks(
            range(W + 1),
            ["server"] + [f"worker {w} ({c} ticks)" for w, c in reversed(list(enumerate(TICKS)))],
        )
        ax.set_ylim(-0.7, W + 0.6)
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(axis="x", color="#EEEEEE")
    axes[-1].set_xlabel("tick")
    axes[-1].set_xlim(0, STEPS + 0.6)
    fig.tight_layout()
    fig.savefig(OUT, dpi=110, metadata={"Software": None})


if __name__ == "__main__":
    main()
