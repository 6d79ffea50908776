"""Shared by the tests: Flying Squirrel runs of W workers, all steps in one scan."""

import jax
import numpy as np
import optax

import fsq

METRICS = ("delivered", "staleness", "bounded", "rejected", "lost", "discarded")


def run(tx, gradients, params, steps, num_workers):
    """Runs ``steps`` steps of ``tx`` for ``num_workers`` workers on one device
    (:func:`fsq.parallel.vmap_workers`); ``gradients(params, step)`` returns the workers'
    gradients, leaves ``[W, ...]``.

    Returns the parameters after each step, ``{metric: [steps]}`` and the final state,
    as numpy arrays.
    """
    workers = fsq.parallel.vmap_workers(tx, num_workers=num_workers)

    @jax.jit
    def go(params):
        def body(carry, step):
            params, state = carry
            updates, state = workers.update(gradients(params, step), state, params)
            params = optax.apply_updates(params, updates)
            metrics = fsq.step_metrics(state)
            return (params, state), (params, {m: metrics[m] for m in METRICS})

        carry = (params, workers.init(params))
        return jax.lax.scan(body, carry, jax.numpy.arange(steps))

    (_, state), (path, metrics) = go(params)
    return jax.tree.map(np.asarray, path), jax.tree.map(np.asarray, metrics), state


def trajectory(tx, loss, data, params, steps, metric):
    """Runs ``steps`` steps of ``tx`` with one worker per leading row of ``data``; returns
    the parameters after each step and the state's ``metric`` (a field name) after each
    step, as numpy arrays."""
    num_workers = jax.tree.leaves(data)[0].shape[0]

    def gradients(params, step):
        del step
        return jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, data)

    path, metrics, _ = run(tx, gradients, params, steps, num_workers)
    return path, metrics[metric]
