"""Where features meet: compression x faults x bounds x NaN, momentum x crashes, DC x each
compressor, counters under overlapping events, against the numpy event simulation of
tests/reference.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsq
from fsq import _random, compression, delays
from tests import reference, simulation

W, DIM, STEPS, LR, SEED = 4, 6, 24, 0.1, 3
RNG = np.random.default_rng(21)
A = np.stack([np.diag(RNG.uniform(0.5, 2.0, DIM)) for _ in range(W)])
C = RNG.normal(size=(W, DIM))
TABLE = RNG.integers(0, 4, size=(7, W))
# Worker 1 is down for steps 3..9, worker 2 from step 15 on.
LIVE = np.ones((STEPS, W), bool)
LIVE[3:10, 1] = False
LIVE[15:, 2] = False
# NaN gradients, one of them from a worker that is down (it must count as lost).
POISONED = np.zeros((STEPS, W), bool)
POISONED[[2, 5, 11, 17], [0, 1, 3, 2]] = True
PLAIN = {"staleness": None, "compensation": None}
CRASHES = [fsq.faults.crash_recover([1], at=3, until=10), fsq.faults.crash([2], at=15)]


def grad_np(i, w):
    return A[i] @ (w - C[i])


def run(look_ahead=None, **kwargs):
    """The library's run of this module's task: trajectory, metrics, final state."""
    kwargs = {**PLAIN, **kwargs}
    tx = fsq.flying_squirrel(
        fsq.sgd(LR), num_workers=W, delay=delays.trace(TABLE), seed=SEED, **kwargs
    )
    tx = tx if look_ahead is None else fsq.look_ahead(tx, look_ahead)
    a, c, poisoned = jnp.asarray(A, jnp.float32), jnp.asarray(C, jnp.float32), POISONED

    def gradients(w, step):
        g = jnp.einsum("wij,wj->wi", a, w[None] - c)
        nan = jnp.asarray(poisoned)[step][:, None] & (jnp.arange(DIM) == 0)
        return jnp.where(nan, jnp.nan, g)

    return simulation.run(tx, gradients, jnp.zeros(DIM), STEPS, W)


def library_compressor(operator):
    """The operator as the library calls it (documented key: seed, step, worker), on
    float32, as the reference's compression."""

    def apply(x, step, worker):
        who = 0 if operator.shared else worker
        key = _random.event_key(SEED, _random.Stream.COMPRESSION, step, who)
        return np.asarray(operator.compress(jnp.asarray(x, jnp.float32), key), np.float64)

    return apply


def expected(**options):
    """The reference's run of this module's task (crashes and NaN unless told otherwise)."""
    task = {"num_workers": W, "steps": STEPS, "lr": LR, "dim": DIM, "table": TABLE}
    events = {"live": LIVE, "poisoned": POISONED}
    return reference.simulate(grad_np, **{**task, **events, **options})


def assert_trajectories(got, want):
    np.testing.assert_allclose(got, want, rtol=5e-5, atol=5e-6)


def assert_counts(metrics, counts):
    for name in ("delivered", "bounded", "rejected", "lost"):
        np.testing.assert_array_equal(metrics[name], counts[name], err_msg=name)


@pytest.mark.parametrize(
    "on_stale, exchange", [("drop", "dense"), ("wait", "dense"), ("wait", "ordered")]
)
def test_error_feedback_with_crashes_bounds_and_nan(on_stale, exchange):
    """A message that carries nothing (down, rejected, dropped) leaves the residual as it
    was; every other one updates it (with the sums added in worker order too)."""
    top = compression.top_k(0.34)
    path, metrics, state = run(
        faults=CRASHES, max_staleness=1, on_stale=on_stale, compression=top, exchange=exchange
    )
    want, counts, residual, _ = expected(
        bound=1,
        on_stale=on_stale,
        compress=library_compressor(top),
    )
    assert_trajectories(path, want)
    assert_counts(metrics, counts)
    residuals = np.asarray(optax.tree.get(state, "residual"))
    np.testing.assert_allclose(residuals, residual, rtol=5e-5, atol=5e-6)
    # Every kind of event happened.
    assert all(counts[k].sum() > 0 for k in ("bounded", "rejected", "lost"))


def test_worker_momentum_with_crash_and_recovery():
    """A down worker's momentum does not move; it resumes where it stopped."""
    path, metrics, state = run(faults=CRASHES, worker_momentum=0.8)
    want, counts, _, velocity = expected(
        momentum=0.8,
    )
    assert_trajectories(path, want)
    assert_counts(metrics, counts)
    np.testing.assert_allclose(
        np.asarray(optax.tree.get(state, "ema")), velocity, rtol=5e-5, atol=5e-6
    )


def test_worker_momentum_with_a_byzantine_worker():
    path, _, _ = run(
        faults=[fsq.faults.byzantine([3], factor=-2.0)], worker_momentum=0.5, max_staleness=2
    )
    want, *_ = expected(
        live=None,
        momentum=0.5,
        byzantine={3: -2.0},
        bound=2,
    )
    assert_trajectories(path, want)


@pytest.mark.parametrize(
    "operator",
    [
        compression.top_k(0.34),
        compression.random_k(0.5),
        compression.sign(),
        compression.quantize(4),
    ],
    ids=["top_k", "random_k", "sign", "quantize"],
)
def test_compensation_channels_are_those_of_the_compressed_gradient(operator):
    path, _, _ = run(compensation=0.5, compression=operator, faults=CRASHES)
    want, *_ = expected(
        compress=library_compressor(operator),
        compensation=0.5,
    )
    assert_trajectories(path, want)


def test_staleness_rule_with_faults_and_step_scope():
    rule = fsq.staleness.weighted_step(1.5)
    path, metrics, _ = run(staleness=rule, faults=CRASHES, max_staleness=2, on_stale="wait")
    want, counts, *_ = expected(
        bound=2,
        on_stale="wait",
        rule=lambda d: min(1.0, 1.5 / max(1, d)),
        scope="step",
    )
    assert_trajectories(path, want)
    assert_counts(metrics, counts)


def test_counts_partition_what_was_sent():
    """Of the W gradients of a step, each is delivered, rejected, lost or dropped: a down
    worker's NaN gradient is lost, a late NaN gradient rejected, a late one from a down
    worker lost."""
    table = np.array([[2, 0, 3, 1]])  # worker 2 always late for a bound of 1
    live = LIVE.copy()
    poisoned = POISONED | np.eye(STEPS, W, k=0, dtype=bool)  # also NaN at (t, t) for t < W
    tx = fsq.flying_squirrel(
        fsq.sgd(LR),
        num_workers=W,
        delay=delays.trace(table),
        faults=CRASHES,
        max_staleness=1,
        **PLAIN,
    )
    a, c = jnp.asarray(A, jnp.float32), jnp.asarray(C, jnp.float32)

    def gradients(w, step):
        g = jnp.einsum("wij,wj->wi", a, w[None] - c)
        return jnp.where(jnp.asarray(poisoned)[step][:, None], jnp.nan, g)

    _, metrics, _ = simulation.run(tx, gradients, jnp.zeros(DIM), STEPS, W)
    sent_at = np.zeros(STEPS + 4, int)
    for t in range(STEPS):
        for i in range(W):
            sent_at[t + table[0, i]] += 1
    total = metrics["delivered"] + metrics["rejected"] + metrics["lost"] + metrics["bounded"]
    np.testing.assert_array_equal(total, sent_at[:STEPS])
    _, counts, *_ = expected(
        table=table,
        live=live,
        poisoned=poisoned,
        bound=1,
    )
    assert_counts(metrics, counts)
    # Worker 1's NaN at step 5 came while it was down: lost, not rejected.
    assert poisoned[5, 1] and not live[5, 1]


def test_non_finite_gradients_under_the_defaults():
    """With the defaults (weighted step, DC-a) and crashes, the rejected gradients are
    simply absent: the run equals the reference's, where they never reach any sum."""
    path, metrics, _ = run(staleness="weighted_step", compensation="adaptive", faults=CRASHES)
    want, counts, *_ = expected(
        rule=lambda d: min(1.0, 3.0 / max(1, d)),
        scope="step",
        compensation=(1.0, 0.95, 1e-7),
    )
    assert_trajectories(path, want)
    assert_counts(metrics, counts)
    assert counts["rejected"].sum() == 2  # the other two NaN came from workers that were down


def test_float16_params_with_compensation_do_not_overflow():
    """g * g of a float16 gradient overflows beyond 256; the channels are formed in
    float32."""
    tx = fsq.flying_squirrel(fsq.sgd(1e-4), num_workers=2, delay=1, compensation=1.0)
    workers = fsq.parallel.vmap_workers(tx, num_workers=2)
    params = jnp.ones(3, jnp.float16)
    state = workers.init(params)
    grads = jnp.full((2, 3), 300.0, jnp.float16)
    for _ in range(3):
        updates, state = workers.update(grads, state, params)
        params = params + updates
    assert params.dtype == jnp.float16
    assert int(state.rejected) == 0 and int(state.delivered) == 2
    # Sent at w = 1 and applied at w = 1 - 0.03 (one step of lr 1e-4 * 300 later).
    g, lam = 300.0, 1.0
    first = 1 - 1e-4 * g
    second = first - 1e-4 * (g + lam * g * g * (first - 1))
    np.testing.assert_allclose(np.asarray(params, np.float32), second, rtol=2e-3)


def test_an_overflow_of_the_channels_never_reaches_the_parameters():
    """|g| = 1e20 is finite in float32 but its square is not: the update is finite, and
    that coordinate is applied without compensation."""
    tx = fsq.flying_squirrel(fsq.sgd(0.1), num_workers=2, delay=1, compensation=1.0)
    workers = fsq.parallel.vmap_workers(tx, num_workers=2)
    params = jnp.ones(2)
    state = workers.init(params)
    grads = jnp.array([[1e20, 1.0], [1.0, 1.0]])
    for _ in range(2):
        updates, state = workers.update(grads, state, params)
        assert np.all(np.isfinite(np.asarray(updates)))
    assert int(state.rejected) == 0 and int(state.delivered) == 2
    np.testing.assert_allclose(updates[0], -0.1 * (1e20 + 1.0) / 2, rtol=1e-6)


def test_gaussian_noise_after_per_worker_clipping_is_dp_sgd():
    """DP-SGD's Gaussian mechanism, per worker: clip each worker's gradient to norm C, add
    N(0, sigma^2) noise drawn from the documented key, average, delay."""
    clip, sigma, table = 1.0, 0.3, np.array([[0, 1, 2, 1]])
    T = fsq.transforms
    tx = fsq.asynchronous(
        fsq.sgd(LR),
        num_workers=W,
        send=[optax.clip_by_global_norm(clip), T.gaussian_noise(sigma)],
        line=T.delay_line(delays.trace(table)),
        seed=SEED,
    )
    a, c = jnp.asarray(A, jnp.float32), jnp.asarray(C, jnp.float32)

    def gradients(w, step):
        del step
        return jnp.einsum("wij,wj->wi", a, w[None] - c)

    path, _, _ = simulation.run(tx, gradients, jnp.zeros(DIM), STEPS, W)

    def noise(step, worker):
        key = _random.event_key(SEED, _random.Stream.NOISE, step, worker)
        (leaf_key,) = jax.random.split(key, 1)
        return np.asarray(jax.random.normal(leaf_key, (DIM,), jnp.float32), np.float64)

    def private(i, w, step):
        g = grad_np(i, w)
        g = g * min(1.0, clip / np.linalg.norm(g))
        return g + sigma * noise(step, i)

    due, w, want = {}, np.zeros(DIM), []
    for t in range(STEPS):
        for i in range(W):
            due.setdefault(t + table[0, i], []).append(private(i, w, t))
        if t in due:
            w = w - LR * sum(due.pop(t)) / W
        want.append(w)
    assert_trajectories(path, np.stack(want))


@pytest.mark.parametrize("horizon", [1.5, 8.0])
def test_look_ahead_with_compensation_weighted_step_crashes_bounds_and_nan(horizon):
    """Gradients computed ahead, compensated by the gap between where they were computed
    and where they are applied, weighted by the default rule, under crashes, NaN and a
    bound that holds late ones back: the held parameters follow the event simulation."""
    rule = fsq.staleness.weighted_step(2.0)
    path, metrics, _ = run(
        look_ahead=horizon,
        faults=CRASHES,
        max_staleness=2,
        on_stale="wait",
        staleness=rule,
        compensation=0.5,
    )
    want, counts, _, _ = expected(
        look_ahead=horizon,
        bound=2,
        on_stale="wait",
        rule=lambda d: min(1.0, 2.0 / max(1, d)),
        scope="step",
        compensation=0.5,
    )
    assert_trajectories(path, want)
    assert_counts(metrics, counts)
    plain, *_ = expected(
        bound=2,
        on_stale="wait",
        rule=lambda d: min(1.0, 2.0 / max(1, d)),
        scope="step",
        compensation=0.5,
    )
    assert np.abs(plain - want).max() > 1e-3  # the look-ahead moved the run


def test_look_ahead_with_error_feedback_and_crashes():
    top = compression.top_k(0.34)
    path, metrics, state = run(look_ahead=4.0, faults=CRASHES, compression=top)
    want, counts, residual, _ = expected(look_ahead=4.0, compress=library_compressor(top))
    assert_trajectories(path, want)
    assert_counts(metrics, counts)
    residuals = np.asarray(optax.tree.get(state, "residual"))
    np.testing.assert_allclose(residuals, residual, rtol=5e-5, atol=5e-6)
