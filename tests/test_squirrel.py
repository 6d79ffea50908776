"""Flying Squirrel's core: exact delayed delivery, against independent numpy simulations.

Tests of the plain simulator switch the default staleness rule and delay compensation
off (``PLAIN``); tests/test_algorithm.py covers those pieces.
"""

import collections
import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsq
from fsq import delays

AXIS = "workers"
PLAIN = {"staleness": None, "compensation": None}


def run(tx, loss_fn, params, data, steps):
    """``steps`` steps of W workers (leading axis of ``data``) under one jax.vmap.

    Returns the final params and, per step, (params after the step, delivered, staleness).
    """
    num_workers = jax.tree.leaves(data)[0].shape[0]

    def worker(params, state, shard):
        grads = jax.grad(loss_fn)(params, shard)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.vmap(worker, in_axes=(None, None, 0), out_axes=None, axis_name=AXIS)
    init = jax.vmap(tx.init, in_axes=None, out_axes=None, axis_size=num_workers, axis_name=AXIS)

    @jax.jit
    def simulate(params, data):
        def body(carry, _):
            params, state = step(*carry, data)
            return (params, state), (params, state.delivered, state.staleness)

        return jax.lax.scan(body, (params, init(params)), None, length=steps)

    (params, state), history = simulate(params, data)
    return params, state, history


# --- Tasks: per-worker losses with numpy gradients as the independent reference ----------

W = 4
RNG = np.random.default_rng(0)
QUAD_A = np.stack([np.diag(RNG.uniform(0.5, 2.0, 3)) for _ in range(W)])
QUAD_C = RNG.normal(size=(W, 3))
LOGREG_X = RNG.normal(size=(W, 16, 3))
LOGREG_Y = (RNG.uniform(size=(W, 16)) < 0.5).astype(np.float64)


def quad_loss(w, shard):
    a, c = shard
    return 0.5 * (w - c) @ a @ (w - c)


def quad_grad(i, w):
    return QUAD_A[i] @ (w - QUAD_C[i])


def logreg_loss(w, shard):
    x, y = shard
    logits = x @ w
    return jnp.mean(jnp.logaddexp(0.0, logits) - y * logits)


def logreg_grad(i, w):
    p = 1.0 / (1.0 + np.exp(-LOGREG_X[i] @ w))
    return LOGREG_X[i].T @ (p - LOGREG_Y[i]) / LOGREG_X.shape[1]


TASKS = {
    "quadratic": (quad_loss, quad_grad, (QUAD_A, QUAD_C)),
    "logistic": (logreg_loss, logreg_grad, (LOGREG_X, LOGREG_Y)),
}


def as_f32(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


@pytest.mark.parametrize("tau", [1, 3, 8])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_constant_delay_matches_numpy_recursion(task, tau):
    loss_fn, grad_np, data = TASKS[task]
    lr, steps = 0.3, 30
    tx = fsq.flying_squirrel(fsq.sgd(lr), num_workers=W, delay=tau, **PLAIN)
    params, _, (trajectory, delivered, staleness) = run(
        tx, loss_fn, jnp.zeros(3), as_f32(data), steps
    )

    # w_{t+1} = w_t - lr * mean_i g_i(w_{t - tau}); nothing is applied while t < tau.
    history = [np.zeros(3)]
    for t in range(steps):
        w = history[-1]
        if t >= tau:
            w = w - lr * np.mean([grad_np(i, history[t - tau]) for i in range(W)], axis=0)
        history.append(w)
    np.testing.assert_allclose(trajectory, np.stack(history[1:]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(delivered, [0] * tau + [W] * (steps - tau))
    np.testing.assert_array_equal(staleness, [0.0] * tau + [float(tau)] * (steps - tau))


def numpy_event_simulation(grad_np, table, lr, steps):
    """Worker i's gradient at step s, taken at w_s, is applied at s + table[s % T, i]."""
    due = collections.defaultdict(list)
    w, trajectory, delivered, staleness = np.zeros(3), [], [], []
    for t in range(steps):
        for i in range(W):
            d = int(table[t % len(table), i])
            due[t + d].append((grad_np(i, w), d))
        arrived = due.pop(t, [])
        if arrived:
            w = w - lr * sum(g for g, _ in arrived) / W
        trajectory.append(w)
        delivered.append(len(arrived))
        staleness.append(np.mean([d for _, d in arrived]) if arrived else 0.0)
    return np.stack(trajectory), np.array(delivered), np.array(staleness)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_delay_trace_matches_event_simulation(seed):
    table = np.random.default_rng(seed).integers(0, 6, size=(7, W))
    check_trace_against_event_simulation(table)


@pytest.mark.parametrize("choices", [(0, 3, 5), (1, 2, 5)], ids=["from-0", "never-0"])
def test_rows_left_empty_for_whole_cycles_deliver_nothing(choices):
    # All workers of a step share its delay, so many ring rows get no message for a whole
    # cycle after they were delivered: what they held must not come back. Never 0: the due
    # row is read one step early.
    per_step = np.random.default_rng(3).choice(choices, size=(11, 1))
    delivered = check_trace_against_event_simulation(np.broadcast_to(per_step, (11, W)))
    assert np.any(delivered[2 * max(choices) :] == 0)  # rows left empty after delivery


def check_trace_against_event_simulation(table):
    lr, steps = 0.2, 25
    tx = fsq.flying_squirrel(fsq.sgd(lr), num_workers=W, delay=delays.trace(table), **PLAIN)
    _, _, (trajectory, delivered, staleness) = run(
        tx, quad_loss, jnp.zeros(3), as_f32(TASKS["quadratic"][2]), steps
    )
    want = numpy_event_simulation(quad_grad, table, lr, steps)
    np.testing.assert_allclose(trajectory, want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(delivered, want[1])
    np.testing.assert_allclose(staleness, want[2], rtol=1e-6)
    return delivered


# --- Delay 0 is synchronous data-parallel training ---------------------------------------

X = RNG.normal(size=(W * 8, 5))
Y = X @ RNG.normal(size=5) + 0.1 * RNG.normal(size=W * 8)


def linreg_loss(params, shard):
    x, y = shard
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


@pytest.mark.parametrize(
    "inner", [fsq.sgd(0.05), fsq.momentum(0.05), fsq.adam(0.05)], ids=["sgd", "momentum", "adam"]
)
def test_delay_zero_equals_synchronous_full_batch(inner):
    params = {"w": jnp.zeros(5), "b": jnp.zeros(())}
    data = (jnp.asarray(X.reshape(W, 8, 5), jnp.float32), jnp.asarray(Y.reshape(W, 8), jnp.float32))
    tx = fsq.flying_squirrel(inner, num_workers=W, delay=0)
    got, _, _ = run(tx, linreg_loss, params, data, steps=10)

    # Reference: one device, the whole batch, the inner optimizer alone.
    full = (jnp.asarray(X, jnp.float32), jnp.asarray(Y, jnp.float32))
    want, state = params, inner.init(params)
    for _ in range(10):
        updates, state = inner.update(jax.grad(linreg_loss)(want, full), state, want)
        want = optax.apply_updates(want, updates)
    assert not np.allclose(want["w"], 0.0)
    for leaf_got, leaf_want in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(leaf_got, leaf_want, rtol=1e-6, atol=1e-6)


def test_inner_optimizer_is_not_stepped_while_nothing_arrives():
    tau, steps = 3, 8
    tx = fsq.flying_squirrel(fsq.adam(0.1), num_workers=W, delay=tau, **PLAIN)
    data = as_f32(TASKS["quadratic"][2])
    _, state, (trajectory, _, _) = run(tx, quad_loss, jnp.zeros(3), data, steps)
    np.testing.assert_array_equal(trajectory[:tau], 0.0)
    assert not np.allclose(trajectory[tau], 0.0)
    assert int(state.inner_state[0].count) == steps - tau  # adam's own step counter


# --- Conservation under random delays ---------------------------------------------------

MODELS = [
    delays.constant(0),
    delays.constant(2),
    delays.uniform(3),
    delays.geometric(1.0, 5),
    delays.heavy_tailed(7),
]
SHAPES = {"a": (3,), "b": (2, 2)}


@functools.cache
def conservation_runner(num_workers, model_index):
    """Feeds the given gradients to lr-1 SGD, then the zero tail; jitted once per config.

    The seed is traced, so hypothesis can draw seeds without recompiling.
    """
    model = MODELS[model_index]

    @jax.jit
    def go(grads, zero_tail, seed):
        tx = fsq.flying_squirrel(
            fsq.sgd(1.0), num_workers=num_workers, delay=model, seed=seed, **PLAIN
        )
        params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
        update = jax.vmap(tx.update, in_axes=(0, None, None), out_axes=None, axis_name=AXIS)
        init = jax.vmap(tx.init, in_axes=None, out_axes=None, axis_size=num_workers, axis_name=AXIS)

        def body(carry, g):
            params, state = carry
            updates, state = update(g, state, params)
            return (optax.apply_updates(params, updates), state), state.delivered

        feed = jax.tree.map(lambda x, z: jnp.concatenate([x, z]), grads, zero_tail)
        (params, _), delivered = jax.lax.scan(body, (params, init(params)), feed)
        return params, delivered

    return go


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**16),
    data_seed=st.integers(0, 2**16),
    num_workers=st.sampled_from([1, 3, 8]),
    model_index=st.integers(0, len(MODELS) - 1),
)
def test_conservation_nothing_lost_nothing_twice(seed, data_seed, num_workers, model_index):
    steps = 12
    model = MODELS[model_index]
    rng = np.random.default_rng(data_seed)
    grads = {
        k: rng.normal(size=(steps, num_workers, *s)).astype(np.float32) for k, s in SHAPES.items()
    }
    tail = {k: np.zeros((model.max_delay, num_workers, *s), np.float32) for k, s in SHAPES.items()}
    params, delivered = conservation_runner(num_workers, model_index)(grads, tail, seed)
    for key in SHAPES:
        want = -grads[key].astype(np.float64).sum(axis=(0, 1)) / num_workers
        np.testing.assert_allclose(params[key], want, rtol=1e-5, atol=1e-5)
    # Everything sent in the first `steps` steps arrived; tail sends may still be in flight.
    total = int(np.sum(delivered))
    assert steps * num_workers <= total <= (steps + model.max_delay) * num_workers


# --- Reproducibility --------------------------------------------------------------------


def delivered_sequence(seed):
    tx = fsq.flying_squirrel(fsq.sgd(0.1), num_workers=W, delay=delays.uniform(5), seed=seed)
    params, _, (trajectory, delivered, _) = run(
        tx, quad_loss, jnp.zeros(3), as_f32(TASKS["quadratic"][2]), steps=20
    )
    return np.asarray(trajectory), np.asarray(delivered)


def test_same_seed_bitwise_identical_different_seed_different_delays():
    a, b, c = delivered_sequence(0), delivered_sequence(0), delivered_sequence(1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


# --- Layout of the state, dtypes, extras -----------------------------------------------


def test_in_flight_memory_is_independent_of_the_number_of_workers():
    for num_workers in (2, 16):
        for extras, channels in ((PLAIN, 1), ({}, 3)):  # compensation sends 3 channels
            tx = fsq.flying_squirrel(
                fsq.sgd(0.1), num_workers=num_workers, delay=delays.uniform(6), **extras
            )
            init = jax.vmap(
                tx.init, in_axes=None, out_axes=None, axis_size=num_workers, axis_name=AXIS
            )
            state = init({"w": jnp.zeros((10, 3)), "b": jnp.zeros(3)})
            # max_delay + 1 rows x (33 params x channels + 7 totals), float32, and a
            # one-byte mark per row
            pending = state.in_flight.pending()
            assert len(pending.channels) == channels
            assert pending.channels[0]["w"].shape == (7, 1, 10, 3)
            assert pending.totals.shape == (7, 1, 7)
            in_flight_bytes = sum(x.nbytes for x in jax.tree.leaves(state.in_flight))
            assert in_flight_bytes == 7 * (33 * channels + 7) * 4 + 7


def test_bfloat16_params_get_bfloat16_updates():
    """Sums are kept in float32; the update, cast to bfloat16, is the float32 run's."""
    updates = {}
    for dtype in (jnp.bfloat16, jnp.float32):
        tx = fsq.flying_squirrel(fsq.adam(0.1), num_workers=2, delay=2)
        workers = fsq.parallel.vmap_workers(tx, num_workers=2)
        params = {"w": jnp.ones(3, dtype)}
        state = workers.init(params)
        pending = jax.tree.leaves(state.in_flight.pending())
        assert {x.dtype for x in pending} == {jnp.dtype(jnp.float32)}  # sums: float32
        grads = {"w": jnp.asarray([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]], dtype)}
        for _ in range(3):
            u, state = workers.update(grads, state, params)
            params = optax.apply_updates(params, u)
        assert u["w"].dtype == dtype
        updates[dtype] = np.asarray(u["w"], np.float32)
    assert not np.allclose(updates[jnp.float32], 0.0)
    np.testing.assert_allclose(updates[jnp.bfloat16], updates[jnp.float32], rtol=1e-2)


def test_works_with_per_worker_batched_state_too():
    """The plain ``jax.vmap(..., axis_name)`` with default axes: every worker holds a copy."""
    tx = fsq.flying_squirrel(fsq.sgd(1.0), num_workers=2, delay=1)
    state = jax.vmap(tx.init, axis_name=AXIS)(jnp.zeros((2, 1)))
    update = jax.vmap(tx.update, axis_name=AXIS)
    grads = jnp.array([[1.0], [3.0]])
    u, state = update(grads, state, jnp.zeros((2, 1)))
    np.testing.assert_array_equal(u, 0.0)
    u, state = update(jnp.zeros((2, 1)), state, jnp.zeros((2, 1)))
    np.testing.assert_array_equal(u, [[-2.0], [-2.0]])
    np.testing.assert_array_equal(state.delivered, [2, 2])


@pytest.mark.parametrize("extras", [PLAIN, {}], ids=["plain", "defaults"])
def test_non_finite_gradients_are_rejected_and_counted(extras):
    # The values of the defaults' run with NaN gradients are checked against the numpy
    # reference in tests/test_combinations.py.
    steps, tau = 6, 2
    tx = fsq.flying_squirrel(fsq.sgd(0.5), num_workers=W, delay=tau, **extras)
    update = jax.jit(jax.vmap(tx.update, in_axes=(0, None, None), out_axes=None, axis_name=AXIS))
    init = jax.vmap(tx.init, in_axes=None, out_axes=None, axis_size=W, axis_name=AXIS)
    grads = np.ones((steps, W, 3), np.float32)
    grads[1, 2, 0] = np.nan  # worker 2 at step 1
    grads[3, 0, :] = np.inf  # worker 0 at step 3
    clean = grads.copy()
    clean[1, 2], clean[3, 0] = 0.0, 0.0
    params, state, rejected = jnp.zeros(3), init(jnp.zeros(3)), []
    for t in range(steps + tau):
        g = grads[t] if t < steps else np.zeros((W, 3), np.float32)
        updates, state = update(jnp.asarray(g), state, params)
        params = optax.apply_updates(params, updates)
        pending = jax.tree.leaves(state.in_flight.pending())
        assert np.all(np.isfinite(params)) and all(np.all(np.isfinite(x)) for x in pending)
        rejected.append(int(state.rejected))
    assert rejected == [0, 0, 0, 1, 0, 1, 0, 0]  # counted when they were due (t + 2)
    if extras is PLAIN:  # 1/W of everything that was finite, nothing else
        np.testing.assert_allclose(params, -0.5 * clean.sum((0, 1)) / W, rtol=1e-6)


@pytest.mark.parametrize("leaf", ["matrix", "vector", "scalar"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 3e38])
def test_rejection_looks_at_every_entry_of_every_leaf(leaf, value):
    """One bad entry anywhere rejects the gradient; a huge finite one (whose sum with the
    others would overflow float32) does not."""
    like = {"matrix": jnp.ones((3, 4)), "vector": jnp.ones(5), "scalar": jnp.ones(())}
    tx = fsq.flying_squirrel(fsq.sgd(1.0), num_workers=W, **PLAIN)
    update = jax.jit(jax.vmap(tx.update, in_axes=(0, None, None), out_axes=None, axis_name=AXIS))
    state = jax.vmap(tx.init, in_axes=None, out_axes=None, axis_size=W, axis_name=AXIS)(like)
    grads = jax.tree.map(
        lambda x: np.full((W, *x.shape), 3e38 if value == 3e38 else 1.0, np.float32), like
    )
    grads[leaf][(1,) + tuple(d - 1 for d in like[leaf].shape)] = value  # worker 1, last entry
    _, state = update(jax.tree.map(jnp.asarray, grads), state, like)
    assert int(state.rejected) == (0 if value == 3e38 else 1)
    assert int(state.delivered) == (W if value == 3e38 else W - 1)


# --- Bad configurations ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_workers": 0}, ValueError, "num_workers"),
        ({"num_workers": 2.0}, TypeError, "num_workers"),
        ({"num_workers": 2, "axis_name": ""}, None, None),
        ({"num_workers": 2, "axis_name": ()}, TypeError, "axis_name"),
        ({"num_workers": 2, "axis_name": ("a", "a")}, TypeError, "axis_name"),
        ({"num_workers": 2, "axis_name": 3}, TypeError, "axis_name"),
        ({"num_workers": 3, "delay": delays.speeds([1.0, 2.0])}, ValueError, "2 workers"),
        ({"num_workers": 2, "seed": -1}, ValueError, "seed"),
        ({"num_workers": 2**20, "delay": 64}, ValueError, "2\\*\\*24"),
    ],
)
def test_bad_configuration_raises_at_construction(kwargs, error, match):
    if error is None:
        fsq.flying_squirrel(fsq.sgd(0.1), **kwargs)
        return
    with pytest.raises(error, match=match):
        fsq.flying_squirrel(fsq.sgd(0.1), **kwargs)


def test_inner_must_be_a_transformation():
    with pytest.raises(TypeError, match="inner"):
        fsq.flying_squirrel(lambda g: g, num_workers=2)


def test_unbound_axis_raises():
    tx = fsq.flying_squirrel(fsq.sgd(0.1), num_workers=2)
    state = tx.init(jnp.zeros(2))  # no per-worker state: one state serves every worker
    with pytest.raises(ValueError, match=r"not bound.*fsq\.nnx\.DataParallel.*nnx\.vmap"):
        tx.update(jnp.ones(2), state, jnp.zeros(2))


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"worker_momentum": 0.9}, "EmaState"),
        ({"compression": fsq.compression.top_k(0.5)}, "ErrorFeedbackState"),
    ],
)
def test_per_worker_state_outside_the_worker_axes_fails_at_init(options, named):
    # As nnx.Optimizer and flax's TrainState.create call it: one state cannot hold every
    # worker's own, so the transform fails when built, naming the supported paths.
    tx = fsq.flying_squirrel(fsq.sgd(0.1), num_workers=2, **options)
    with pytest.raises(ValueError, match=rf"own \({named}.*fsq\.nnx\.DataParallel"):
        tx.init(jnp.zeros(2))
    jax.vmap(tx.init, in_axes=None, axis_size=2, axis_name=AXIS)(jnp.zeros(2))  # mapped: fine


def test_axis_size_must_match_num_workers():
    tx = fsq.flying_squirrel(fsq.sgd(0.1), num_workers=3)
    state = tx.init(jnp.zeros(2))
    update = jax.vmap(tx.update, in_axes=(0, None, None), axis_name=AXIS)
    with pytest.raises(ValueError, match="num_workers=3 but axis_name"):
        update(jnp.ones((2, 2)), state, jnp.zeros(2))


def test_mismatched_trees_raise():
    tx = fsq.flying_squirrel(fsq.sgd(0.1), num_workers=2)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    update = jax.vmap(tx.update, in_axes=(0, None, None), axis_name=AXIS)
    with pytest.raises(ValueError, match="same tree structure"):
        update({"v": jnp.ones((2, 2))}, state, params)
    with pytest.raises(ValueError, match="shapes of the params given to init"):
        update({"w": jnp.ones((2, 5))}, state, {"w": jnp.zeros(5)})


def test_the_messages_in_flight_print_as_shapes_not_values():
    """An error that prints the state (optax.tree.get's, for one) stays readable: the
    in-flight buffer prints its dtypes and shapes."""
    tx = fsq.flying_squirrel(fsq.sgd(0.1), num_workers=2, delay=fsq.delays.uniform(4))
    workers = fsq.parallel.vmap_workers(tx, num_workers=2)
    state = workers.init(jnp.zeros(10_000))
    state = workers.update(jnp.full((2, 10_000), 0.5), state, jnp.zeros(10_000))[1]
    text = repr(state.in_flight)
    assert "float32[5, 1, 10000]" in text and "0.5" not in text and len(text) < 400, text
