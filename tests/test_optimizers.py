"""The classic catalogue against independent float64 numpy implementations of each formula."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsq

DIM = 5
RNG = np.random.default_rng(0)
A = np.diag(np.logspace(0, 1, DIM)) + 0.1 * np.ones((DIM, DIM))  # SPD, mildly ill-conditioned
B = RNG.normal(size=(4, DIM))  # one linear term per microbatch
W0 = RNG.normal(size=DIM)


def gradient(w, call):
    """Gradient of 0.5 w'Aw - b'w, with b cycling over microbatches so calls differ."""
    return A @ w - B[call % len(B)]


def constant(lr):
    return lambda n: lr


def decaying(lr):
    return lambda n: lr * 0.9**n


# Textbook formulas, written from the papers / optax docs, in float64 numpy.
def ref_sgd(lr, steps, w):
    for t in range(steps):
        w = w - lr(t) * gradient(w, t)
    return w


def ref_momentum(lr, steps, w, momentum, nesterov=False):
    m = np.zeros_like(w)
    for t in range(steps):
        g = gradient(w, t)
        m = g + momentum * m
        w = w - lr(t) * (g + momentum * m if nesterov else m)
    return w


def ref_adagrad(lr, steps, w, initial_accumulator_value, eps):
    s = np.full_like(w, initial_accumulator_value)
    for t in range(steps):
        g = gradient(w, t)
        s = s + g**2
        w = w - lr(t) * g / np.sqrt(s + eps)
    return w


def ref_rmsprop(lr, steps, w, decay, eps):
    nu = np.zeros_like(w)
    for t in range(steps):
        g = gradient(w, t)
        nu = decay * nu + (1 - decay) * g**2
        w = w - lr(t) * g / np.sqrt(nu + eps)
    return w


def ref_adam(lr, steps, w, b1, b2, eps):
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t in range(steps):
        g = gradient(w, t)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat, v_hat = m / (1 - b1 ** (t + 1)), v / (1 - b2 ** (t + 1))
        w = w - lr(t) * m_hat / (np.sqrt(v_hat) + eps)
    return w


def ref_bgd(lr, steps, w, num_microbatches):
    """``steps`` calls; every num_microbatches-th applies the mean at the batch's params."""
    acc = np.zeros_like(w)
    for call in range(steps):
        acc = acc + gradient(w, call)
        if (call + 1) % num_microbatches == 0:
            w = w - lr(call // num_microbatches) * acc / num_microbatches
            acc = np.zeros_like(w)
    return w


# name -> (non-default hyperparameters, reference taking them, the documented defaults)
CASES = {
    "sgd": ({}, ref_sgd, {}),
    "bgd": ({"num_microbatches": 3}, ref_bgd, None),
    "momentum": ({"momentum": 0.7}, ref_momentum, {"momentum": 0.9}),
    "nesterov": (
        {"momentum": 0.6},
        lambda *a, **k: ref_momentum(*a, nesterov=True, **k),
        {"momentum": 0.9},
    ),
    "adagrad": (
        {"initial_accumulator_value": 0.3, "eps": 1e-3},
        ref_adagrad,
        {"initial_accumulator_value": 0.1, "eps": 1e-7},
    ),
    "rmsprop": ({"decay": 0.7, "eps": 1e-3}, ref_rmsprop, {"decay": 0.9, "eps": 1e-8}),
    "adam": (
        {"b1": 0.8, "b2": 0.95, "eps": 1e-3},
        ref_adam,
        {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
    ),
}
LEARNING_RATE = 0.05


def assert_close(got, want):
    """Relative to the vector's scale: optax schedules evaluate in float32 (~1e-8)."""
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def run_fsq(tx, steps):
    with jax.enable_x64(True):
        w = jnp.asarray(W0, jnp.float64)
        state = tx.init(w)
        for t in range(steps):
            updates, state = tx.update(jnp.asarray(gradient(np.asarray(w), t)), state, w)
            w = optax.apply_updates(w, updates)
        return np.asarray(w)


@pytest.mark.parametrize("steps", [1, 10])
@pytest.mark.parametrize("schedule", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_against_numpy(name, schedule, steps):
    hparams, reference, _ = CASES[name]
    if schedule:
        lr_fsq = optax.exponential_decay(LEARNING_RATE, transition_steps=1, decay_rate=0.9)
        lr_ref = decaying(LEARNING_RATE)
    else:
        lr_fsq, lr_ref = LEARNING_RATE, constant(LEARNING_RATE)
    if name == "bgd":
        steps *= hparams["num_microbatches"]
    got = run_fsq(fsq.get_optimizer(name, learning_rate=lr_fsq, **hparams), steps)
    want = reference(lr_ref, steps, W0.copy(), **hparams)
    assert not np.allclose(want, W0)  # the reference moved: the comparison is not vacuous
    assert_close(got, want)


@pytest.mark.parametrize("name", sorted(n for n in CASES if CASES[n][2] is not None))
def test_defaults_match_the_documented_ones(name):
    _, reference, defaults = CASES[name]
    got = run_fsq(getattr(fsq, name)(LEARNING_RATE), 10)
    want = reference(constant(LEARNING_RATE), 10, W0.copy(), **defaults)
    assert_close(got, want)


def test_accumulate_runs_the_inner_update_only_on_the_last_microbatch():
    executions = []
    sgd = optax.sgd(1.0)

    def update(updates, state, params=None):
        jax.debug.callback(lambda: executions.append(1))  # runs only if this branch runs
        return sgd.update(updates, state, params)

    tx = fsq.accumulate(optax.GradientTransformation(sgd.init, update), num_microbatches=4)
    step = jax.jit(tx.update)
    state = tx.init(jnp.zeros(2))
    for call in range(8):
        updates, state = step(jnp.ones(2) * call, state)
        jax.block_until_ready(updates)
        if call % 4 != 3:
            np.testing.assert_array_equal(updates, 0.0)
    assert len(executions) == 2
    np.testing.assert_allclose(updates, -5.5)  # one SGD step on the mean of calls 4..7
    assert int(state.microbatch) == 0


# Condition number 1e2; each method with a reasonable step size reaches the optimum.
ILL = np.diag(np.logspace(0, 2, 10))
W_STAR = np.linalg.solve(ILL, np.ones(10))
CONVERGENCE = {
    "sgd": (fsq.sgd(0.019), 600),
    "bgd": (fsq.bgd(0.019, num_microbatches=2), 1200),
    "momentum": (fsq.momentum(0.033, momentum=0.67), 150),
    "nesterov": (fsq.nesterov(0.01, momentum=0.8), 300),
    "adagrad": (fsq.adagrad(0.5), 600),
    "rmsprop": (fsq.rmsprop(optax.exponential_decay(0.01, 100, 0.5)), 1500),
    "adam": (fsq.adam(optax.exponential_decay(0.1, 100, 0.5)), 1500),
}


@pytest.mark.parametrize("name", sorted(CONVERGENCE))
def test_converges_on_ill_conditioned_quadratic(name):
    tx, steps = CONVERGENCE[name]
    ill = jnp.asarray(ILL, jnp.float32)

    def body(carry, _):
        w, state = carry
        updates, state = tx.update(ill @ w - 1.0, state, w)
        return (optax.apply_updates(w, updates), state), None

    w0 = jnp.zeros(10)
    (w, _), _ = jax.lax.scan(body, (w0, tx.init(w0)), None, length=steps)
    error = np.linalg.norm(np.asarray(w) - W_STAR) / np.linalg.norm(W_STAR)
    assert error < 1e-2, error


@pytest.mark.parametrize("name", sorted(CASES))
def test_jit_compiles_once(name):
    tx = fsq.get_optimizer(name, learning_rate=0.1, **CASES[name][0])
    chex.clear_trace_counter()  # the counter is keyed by code, shared across parameters

    @jax.jit
    @chex.assert_max_traces(n=1)
    def update(grads, state, params):
        return tx.update(grads, state, params)

    params = jnp.zeros(3)
    state = tx.init(params)
    for value in (1.0, 2.0, 3.0):
        _, state = update(jnp.full(3, value), state, params)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_dtype_is_preserved(name, dtype):
    tx = fsq.get_optimizer(name, learning_rate=0.1, **CASES[name][0])
    params = {"w": jnp.ones((2, 3), dtype), "b": jnp.zeros(3, dtype)}
    state = tx.init(params)
    for _ in range(CASES[name][0].get("num_microbatches", 1)):
        updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    new = optax.apply_updates(params, updates)
    for tree in (updates, new):
        assert all(x.dtype == dtype for x in jax.tree.leaves(tree))
    assert not np.allclose(np.asarray(new["b"], np.float32), 0.0)


BAD = [
    ("sgd", {"learning_rate": -0.1}, "learning_rate"),
    ("sgd", {"learning_rate": float("nan")}, "learning_rate"),
    ("momentum", {"learning_rate": 0.1, "momentum": 1.0}, "momentum"),
    ("momentum", {"learning_rate": 0.1, "momentum": -0.1}, "momentum"),
    ("nesterov", {"learning_rate": 0.1, "momentum": 1.5}, "momentum"),
    ("adagrad", {"learning_rate": 0.1, "eps": 0.0}, "eps"),
    ("adagrad", {"learning_rate": 0.1, "initial_accumulator_value": -1.0}, "initial_accumulator"),
    ("rmsprop", {"learning_rate": 0.1, "eps": -1e-8}, "eps"),
    ("rmsprop", {"learning_rate": 0.1, "decay": 1.0}, "decay"),
    ("adam", {"learning_rate": 0.1, "b1": 1.0}, "b1"),
    ("adam", {"learning_rate": 0.1, "b2": -0.5}, "b2"),
    ("adam", {"learning_rate": 0.1, "eps": 0.0}, "eps"),
    ("bgd", {"learning_rate": 0.1, "num_microbatches": 0}, "num_microbatches"),
    ("bgd", {"learning_rate": -1.0, "num_microbatches": 2}, "learning_rate"),
]


@pytest.mark.parametrize(("name", "hparams", "argument"), BAD)
def test_bad_hyperparameters_raise(name, hparams, argument):
    with pytest.raises(ValueError, match=argument):
        fsq.get_optimizer(name, **hparams)


def test_wrong_types_raise():
    with pytest.raises(TypeError, match="num_microbatches"):
        fsq.bgd(0.1, num_microbatches=2.5)
    with pytest.raises(TypeError, match="momentum"):
        fsq.momentum(0.1, momentum="high")


def test_unknown_name_raises():
    with pytest.raises(ValueError, match="name must be one of"):
        fsq.get_optimizer("adamw", learning_rate=0.1)


def test_schedule_learning_rate_is_accepted_and_used():
    tx = fsq.sgd(lambda count: 0.5 * (count + 1))
    state = tx.init(jnp.zeros(1))
    u0, state = tx.update(jnp.ones(1), state)
    u1, state = tx.update(jnp.ones(1), state)
    np.testing.assert_allclose([u0[0], u1[0]], [-0.5, -1.0])
