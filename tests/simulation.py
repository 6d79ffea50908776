"""Shared by the tests: a Flying Squirrel run of per-worker losses, all steps in one scan."""

import jax
import numpy as np
import optax


def trajectory(tx, loss, data, params, steps, metric):
    """Runs ``steps`` steps of ``tx`` with one worker per leading row of ``data`` (under
    ``jax.vmap`` with axis ``"workers"``); returns the parameters after each step and the
    state's ``metric`` (a field name) after each step, as numpy arrays."""
    num_workers = jax.tree.leaves(data)[0].shape[0]

    def worker(params, state, shard):
        updates, state = tx.update(jax.grad(loss)(params, shard), state, params)
        return optax.apply_updates(params, updates), state

    step = jax.vmap(worker, in_axes=(None, None, 0), out_axes=None, axis_name="workers")
    init = jax.vmap(
        tx.init, in_axes=None, out_axes=None, axis_size=num_workers, axis_name="workers"
    )

    @jax.jit
    def run(params):
        def body(carry, _):
            params, state = step(*carry, data)
            return (params, state), (params, getattr(state, metric))

        return jax.lax.scan(body, (params, init(params)), None, length=steps)[1]

    path, values = run(params)
    return np.asarray(path), np.asarray(values)
