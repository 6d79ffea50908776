"""A short delayed run, whole or in two processes joined by a checkpoint (test_checkpoint).

``python tests/resume_script.py MODE DIR``: ``whole`` runs every step; ``first`` runs up to
the checkpoint and saves it; ``second`` restores it in a fresh process and finishes. The
final state's leaves go to ``DIR/MODE.npz``.
"""

import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fsq  # noqa: E402

WORKERS, STEPS, CHECKPOINT_AT = 8, 12, 5


def loss(params, batch):
    hidden = jnp.tanh(batch["x"] @ params["w1"])
    return jnp.mean((hidden @ params["w2"] - batch["y"]) ** 2)


def batch(step):
    rng = np.random.default_rng(step)
    return {"x": rng.normal(size=(WORKERS, 16, 5)), "y": rng.normal(size=(WORKERS, 16))}


def main(mode, directory):
    tx = fsq.flying_squirrel(
        fsq.adam(0.05),
        num_workers=WORKERS,
        delay=fsq.delays.uniform(4),
        faults=fsq.faults.drops(0.2),
        axis_name=fsq.parallel.AXIS_NAME,
        seed=3,
    )
    dp = fsq.parallel.data_parallel(loss, tx, num_workers=WORKERS)
    rng = np.random.default_rng(0)
    state = dp.init({"w1": rng.normal(size=(5, 7)), "w2": rng.normal(size=7)})
    start, stop = 0, STEPS
    if mode == "first":
        stop = CHECKPOINT_AT
    if mode == "second":
        state = fsq.checkpoint.restore(directory, state)
        start = int(state.opt_state.step)
    for step in range(start, stop):
        state, _ = dp.step(state, batch(step))
    if mode == "first":
        pending = jax.tree.leaves(state.opt_state.in_flight.pending())
        assert any(np.any(np.asarray(x) != 0) for x in pending), "nothing in flight"
        fsq.checkpoint.save(directory, stop, state)
    leaves = jax.tree.leaves(state)
    np.savez(f"{directory}/{mode}.npz", *[np.asarray(x) for x in leaves])


if __name__ == "__main__":
    main(*sys.argv[1:])
