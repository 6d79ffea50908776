"""Dtypes: float64 runs (x64) against a float64 numpy reference, float32 runs unchanged by
x64, empty leaves, integer leaves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fsq
from fsq import compression, delays
from tests import reference, simulation

W, DIM, STEPS, LR = 4, 5, 20, 0.1
RNG = np.random.default_rng(8)
A = np.stack([np.diag(RNG.uniform(0.5, 2.0, DIM)) for _ in range(W)])
C = RNG.normal(size=(W, DIM))
TABLE = RNG.integers(0, 4, size=(5, W))
LIVE = np.ones((STEPS, W), bool)
LIVE[4:9, 2] = False


def grad_np(i, w):
    return A[i] @ (w - C[i])


def run(dtype, **kwargs):
    tx = fsq.flying_squirrel(fsq.sgd(LR), num_workers=W, delay=delays.trace(TABLE), **kwargs)
    a, c = jnp.asarray(A, dtype), jnp.asarray(C, dtype)

    def gradients(w, step):
        del step
        return jnp.einsum("wij,wj->wi", a, w[None] - c)

    return simulation.run(tx, gradients, jnp.zeros(DIM, dtype), STEPS, W)


def test_float64_run_matches_a_float64_reference_to_1e_12():
    kwargs = {"faults": fsq.faults.crash_recover([2], at=4, until=9), "max_staleness": 2}
    with jax.enable_x64(True):
        path, metrics, state = run(jnp.float64, **kwargs)  # defaults: weighted step, DC-a
        assert path.dtype == np.float64
        assert {x.dtype for x in jax.tree.leaves(state.in_flight.slots)} == {jnp.dtype(jnp.float64)}
        assert optax_tree_dtype(state, "mean_square") == jnp.float64
    want, counts, *_ = reference.simulate(
        grad_np,
        num_workers=W,
        steps=STEPS,
        lr=LR,
        dim=DIM,
        table=TABLE,
        live=LIVE,
        bound=2,
        rule=lambda d: min(1.0, 3.0 / max(1, d)),
        scope="step",
        compensation=(1.0, 0.95, 1e-7),
    )
    np.testing.assert_allclose(path, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(metrics["lost"], counts["lost"])
    # In float32 the same run is only as good as float32.
    path32, *_ = run(jnp.float32, **kwargs)
    assert np.max(np.abs(path32 - want)) > 1e-9


def optax_tree_dtype(state, name):
    import optax

    return jax.tree.leaves(optax.tree.get(state, name))[0].dtype


CONFIGS = {
    "delay 0, extras off": {"delay": 0, "staleness": None, "compensation": None},
    "defaults": {},
    "robust, momentum, bound wait": {
        "aggregation": "median",
        "worker_momentum": 0.9,
        "max_staleness": 1,
        "on_stale": "wait",
    },
    "top-k, sparse exchange": {"compression": compression.top_k(0.4), "exchange": "sparse"},
    "quantize, faults": {
        "compression": compression.quantize(4),
        "faults": [fsq.faults.drops(0.2), fsq.faults.byzantine([1], "random", 2.0)],
    },
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_float32_runs_are_the_same_with_x64_enabled(name):
    kwargs = dict(CONFIGS[name])
    if "delay" not in kwargs:
        kwargs["delay"] = delays.trace(TABLE)
    tx = fsq.flying_squirrel(fsq.sgd(LR), num_workers=W, **kwargs)
    a, c = jnp.asarray(A, jnp.float32), jnp.asarray(C, jnp.float32)

    def gradients(w, step):
        del step
        return jnp.einsum("wij,wj->wi", a, w[None] - c)

    want, *_ = simulation.run(tx, gradients, jnp.zeros(DIM), STEPS, W)
    with jax.enable_x64(True):
        got, *_ = simulation.run(tx, gradients, jnp.zeros(DIM, jnp.float32), STEPS, W)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"compression": compression.top_k(0.3), "exchange": "sparse"},
        {"compression": compression.random_k(0.3)},
        {"compression": compression.sign(), "aggregation": "trimmed_mean"},
        {"compression": compression.quantize(4), "worker_momentum": 0.5},
        {"compression": compression.top_k(0.3, per_leaf=True)},
    ],
    ids=["top_k-sparse", "random_k", "sign-trimmed", "quantize-momentum", "top_k-per-leaf"],
)
def test_an_empty_leaf_changes_nothing(kwargs):
    """optax handles zero-size leaves; so does every piece: the run equals the run
    without the leaf."""
    tx = fsq.flying_squirrel(fsq.sgd(LR), num_workers=W, delay=delays.trace(TABLE), **kwargs)
    a, c = jnp.asarray(A, jnp.float32), jnp.asarray(C, jnp.float32)

    def gradients(params, step):
        del step
        g = jnp.einsum("wij,wj->wi", a, params["w"][None] - c)
        return {"w": g, "empty": jnp.zeros((W, 0, 3))}

    path, _, _ = simulation.run(
        tx, gradients, {"w": jnp.zeros(DIM), "empty": jnp.zeros((0, 3))}, STEPS, W
    )
    assert path["empty"].shape == (STEPS, 0, 3)
    without, _, _ = simulation.run(
        tx, lambda p, s: {"w": gradients({"w": p["w"]}, s)["w"]}, {"w": jnp.zeros(DIM)}, STEPS, W
    )
    np.testing.assert_allclose(path["w"], without["w"], rtol=1e-6, atol=1e-7)
    assert not np.allclose(path["w"][-1], 0)


def test_integer_leaves_get_a_clear_error():
    tx = fsq.flying_squirrel(fsq.sgd(LR), num_workers=2)
    workers = fsq.parallel.vmap_workers(tx, num_workers=2)
    params = {"w": jnp.zeros(2), "count": jnp.zeros((), jnp.int32)}
    state = workers.init(params)
    grads = {"w": jnp.ones((2, 2)), "count": jnp.zeros((2,), jnp.int32)}
    with pytest.raises(TypeError, match=r"\['count'\] is int32.*optax.masked"):
        workers.update(grads, state, params)
