"""One gradient per shared ring row: where a device's workers send to the same row, the
step computes one gradient of their summed losses, and runs exactly as when each worker's
gradient is computed apart (to float32 rounding, the sum being formed in another order).

The per-worker reference is the same transform inside ``optax.chain``: a transform around
Flying Squirrel may need each gradient, so the step never sums the workers' gradients for
it (:func:`fsq.parallel.sums_workers` asks the whole transform's state only).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsq
from fsq import delays
from tests.test_parallel import init_params
from tests.test_parallel import mlp_loss as loss

STEPS = 5
OFF = {"staleness": None, "compensation": None}


def data(num_workers, poisoned=None):
    """``STEPS`` batches; with ``poisoned = (step, worker)`` that worker's batch holds a NaN."""
    rng = np.random.default_rng(num_workers)
    x = rng.normal(size=(STEPS, num_workers, 4, 3)).astype(np.float32)
    y = rng.normal(size=(STEPS, num_workers, 4)).astype(np.float32)
    if poisoned is not None:
        x[poisoned][0, 0] = np.nan
    return x, y


def train(
    kwargs,
    num_workers,
    *,
    per_worker=False,
    backend="vmap",
    devices=1,
    slots=None,
    model_axes=None,
    **data_kw,
):
    tx = fsq.flying_squirrel(
        fsq.adam(0.05), num_workers=num_workers, axis_name=fsq.parallel.AXIS_NAME, seed=1, **kwargs
    )
    if per_worker:
        tx = optax.chain(tx)
    mesh = None if backend == "vmap" else fsq.parallel.make_mesh(devices, model_axes=model_axes)
    dp = fsq.parallel.data_parallel(
        loss, tx, num_workers=num_workers, backend=backend, mesh=mesh, gradient_slots=slots
    )
    state = dp.init(init_params())
    x, y = data(num_workers, **data_kw)
    losses = []
    for t in range(STEPS):
        state, step_losses = dp.step(state, (x[t], y[t]))
        losses.append(step_losses)
    fs = state.opt_state[0] if per_worker else state.opt_state
    counts = {m: int(getattr(fs, m)) for m in ("delivered", "rejected", "bounded")}
    return state, np.stack(losses), counts


CASES = {
    "delay 0, defaults": {"delay": 0},
    "delay 0, extras off": {"delay": 0, **OFF},
    "constant(3), extras off": {"delay": 3, **OFF},
    "constant(3), inverse staleness": {"delay": 3, "staleness": "inverse", "compensation": None},
    "constant(3), bound waits": {"delay": 3, "max_staleness": 1, "on_stale": "wait", **OFF},
    "constant(3), bound drops": {"delay": 3, "max_staleness": 1, **OFF},
    "uniform(0)": {"delay": delays.uniform(0)},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_shared_rows_are_summed_and_match_each_gradient_apart(name):
    summed, losses, counts = train(CASES[name], 8)
    apart, want_losses, want_counts = train(CASES[name], 8, per_worker=True)
    assert summed.opt_state.sums_workers()
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
    assert counts == want_counts
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), apart.params, init_params())
    assert max(jax.tree.leaves(moved)) > 1e-3 or counts["bounded"]
    for a, b in zip(jax.tree.leaves(summed.params), jax.tree.leaves(apart.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("num_workers", "backend", "devices", "slots", "model_axes"),
    [
        (16, "shard_map", 8, None, None),
        (32, "shard_map", 4, None, None),
        (8, "vmap", 1, 2, None),
        (16, "pmap", 8, None, None),
        (8, "shard_map", 8, None, {"fsdp": 4}),  # 2 groups of 4 shards, 4 workers each
    ],
)
def test_every_layout_sums_the_same(num_workers, backend, devices, slots, model_axes):
    kwargs = {"delay": 2, **OFF}
    summed, losses, counts = train(
        kwargs, num_workers, backend=backend, devices=devices, slots=slots, model_axes=model_axes
    )
    apart, want_losses, want_counts = train(kwargs, num_workers, per_worker=True)
    assert summed.opt_state.sums_workers()
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
    assert counts == want_counts
    for a, b in zip(jax.tree.leaves(summed.params), jax.tree.leaves(apart.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("delay", [0, 2])
def test_a_non_finite_gradient_is_rejected_alone(delay):
    """The sum holds a NaN: each worker's gradient is computed, and only worker 5's rejected
    (summing the rest), as the per-worker step rejects it."""
    kwargs = {"delay": delay, "compensation": None}
    summed, losses, counts = train(kwargs, 8, poisoned=(STEPS - 1 - delay, 5))
    assert summed.opt_state.sums_workers()
    apart, want_losses, want_counts = train(
        kwargs, 8, per_worker=True, poisoned=(STEPS - 1 - delay, 5)
    )
    assert counts == want_counts == {"delivered": 7, "rejected": 1, "bounded": 0}
    np.testing.assert_array_equal(np.isnan(losses), np.isnan(want_losses))
    for a, b in zip(jax.tree.leaves(summed.params), jax.tree.leaves(apart.params), strict=True):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_delay_zero_is_the_large_batch_step():
    """Independent reference: SGD on the mean of the workers' losses, one device, by hand."""
    num_workers, lr = 8, 0.3
    tx = fsq.flying_squirrel(fsq.sgd(lr), num_workers=num_workers, delay=0, **OFF)
    dp = fsq.parallel.data_parallel(loss, tx, num_workers=num_workers, backend="vmap")
    state = dp.init(init_params())
    params = init_params()
    x, y = data(num_workers)

    def mean_loss(params, batch):
        return jnp.mean(jax.vmap(loss, in_axes=(None, 0))(params, batch))

    for t in range(STEPS):
        state, _ = dp.step(state, (x[t], y[t]))
        grads = jax.grad(mean_loss)(params, (x[t], y[t]))
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delay": delays.uniform(2)},
        {"delay": 2},  # delay compensation needs g * g of each worker
        {"delay": 2, **OFF, "compression": fsq.compression.top_k(0.5)},
        {"delay": 2, **OFF, "worker_momentum": 0.5},
        {"delay": 2, **OFF, "aggregation": "median"},
        {"delay": 2, **OFF, "exchange": "ordered"},
        {"delay": 2, **OFF, "faults": fsq.faults.drops(0.1)},
        {"delay": 0, "compute": fsq.timing.fixed([1, 2, 1, 1])},
        {"delay": fsq.delays.speeds([1.0, 2.0, 1.0, 1.0]), "load_balance": True},
    ],
)
def test_workers_apart_where_a_piece_needs_each_gradient(kwargs):
    tx = fsq.flying_squirrel(fsq.sgd(0.1), num_workers=4, **kwargs)
    state = fsq.parallel.vmap_workers(tx, num_workers=4).init(init_params())
    assert not state.sums_workers()
    assert not fsq.parallel.sums_workers(state)


def test_the_step_hands_over_the_sum_and_says_whose_gradients_it_holds():
    """A transform of its own that allows sums: it is given the sum of the workers'
    gradients (against each worker's jax.grad added up here) and every worker marked in."""

    class State(NamedTuple):
        count: jax.Array = jnp.zeros([], jnp.int32)

        def sums_workers(self):
            return True

    seen = {}

    def update(grads, state, params=None, *, summed=None):
        seen["summed"] = summed
        return grads, state

    tx = optax.GradientTransformationExtraArgs(lambda params: State(), update)
    workers = fsq.parallel.vmap_workers(tx, num_workers=4)
    params = init_params()
    x, y = data(4)
    updates, _, losses = fsq.parallel.workers_step(
        loss, workers, params, workers.init(params), (x[0], y[0]), ids=jnp.arange(4)
    )
    want = jax.tree.map(
        lambda *g: sum(g), *[jax.grad(loss)(params, (x[0, i], y[0, i])) for i in range(4)]
    )
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        losses, [loss(params, (x[0, i], y[0, i])) for i in range(4)], rtol=1e-6
    )
    assert seen["summed"].shape == () and seen["summed"].dtype == bool  # per worker, mapped


def test_summed_update_of_a_transform_that_needs_each_gradient_is_refused():
    tx = fsq.flying_squirrel(fsq.sgd(0.1), num_workers=2, delay=delays.uniform(2))
    workers = fsq.parallel.vmap_workers(tx, num_workers=2)
    state = workers.init(jnp.zeros(3))
    with pytest.raises(ValueError, match="sums_workers"):
        workers.update(jnp.ones(3), state, jnp.zeros(3), summed=jnp.ones(2, bool))
