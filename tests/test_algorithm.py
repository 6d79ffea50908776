"""Flying Squirrel's algorithmic pieces against a per-gradient numpy event simulation.

The reference keeps every gradient with the parameters it was computed at and applies
each rule to each gradient separately, the way the papers state them; the library
instead sums channels in flight. Agreement on hand-built delay schedules checks both the
formulas and the linear-sum machinery.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsq
from fsq import compensation, delays, staleness
from tests import simulation

W, DIM, STEPS, LR = 4, 3, 25, 0.2
RNG = np.random.default_rng(1)
A = np.stack([np.diag(RNG.uniform(0.5, 2.0, DIM)) for _ in range(W)])
C = RNG.normal(size=(W, DIM))
TABLE = RNG.integers(0, 6, size=(7, W))  # a hand-built, irregular delivery schedule


def loss(w, shard):
    a, c = shard
    return 0.5 * (w - c) @ a @ (w - c)


def grad_np(i, w):
    return A[i] @ (w - C[i])


def reference(
    lam=0.0,
    adaptive=None,
    rule=None,
    max_staleness=None,
    on_stale="drop",
    weights=None,
    scope="gradient",
    momentum=0.0,
    table=TABLE,
):
    """Per-gradient event simulation; ``adaptive=(decay, eps)`` for DC-ASGD-a.

    The inner optimizer is SGD with heavy-ball ``momentum`` (0: plain SGD).
    """
    due = collections.defaultdict(list)
    w, ms, velocity = np.zeros(DIM), np.zeros(DIM), np.zeros(DIM)
    trajectory, bounded = [], []
    for t in range(STEPS):
        for i in range(W):
            d = int(table[t % len(table), i])
            late = max_staleness is not None and d > max_staleness
            if late and on_stale == "wait":
                d = max_staleness
            due[t + d].append((grad_np(i, w), w.copy(), d, i, late))
        arrived = due.pop(t, [])
        bounded.append(sum(late for *_, late in arrived))
        applied = [a for a in arrived if not (a[4] and on_stale == "drop")]
        if applied:
            scales = [
                (rule(d) if rule else 1.0) * (weights[i] if weights is not None else 1.0)
                for _, _, d, i, _ in applied
            ]
            if adaptive is not None:  # EMA of the (scale-weighted) mean square
                decay, eps = adaptive
                square = sum(a * g * g for a, (g, *_) in zip(scales, applied, strict=True))
                ms = decay * ms + (1 - decay) * square / sum(scales)
                lam_t = lam / np.sqrt(ms + eps)
            else:
                lam_t = lam
            total, weight = np.zeros(DIM), 0.0
            for scale, (g, w_sent, *_) in zip(scales, applied, strict=True):
                total += scale * (g + lam_t * g * g * (w - w_sent))
                weight += scale
            if scope == "step":  # weighted mean in, step scaled by the total weight
                mean, step = total / weight, weight / W
            else:
                mean, step = total / W, 1.0
            velocity = mean + momentum * velocity
            w = w - step * LR * velocity
        trajectory.append(w)
    return np.stack(trajectory), np.array(bounded)


def simulate(inner=None, table=TABLE, **kwargs):
    kwargs = {"staleness": None, "compensation": None, **kwargs}
    inner = fsq.sgd(LR) if inner is None else inner
    tx = fsq.flying_squirrel(inner, num_workers=W, delay=delays.trace(table), **kwargs)
    data = (jnp.asarray(A, jnp.float32), jnp.asarray(C, jnp.float32))
    return simulation.trajectory(tx, loss, data, jnp.zeros(DIM), STEPS, "bounded")


def assert_matches(got, want):
    np.testing.assert_allclose(got[0], want[0], rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(got[1], want[1])


def test_plain_run_differs_from_each_rule():
    """The rules below are not vacuous: each changes the trajectory on this schedule."""
    plain = reference()[0]
    for kwargs in (
        {"lam": 2.0},
        {"lam": 0.5, "adaptive": (0.9, 1e-7)},
        {"rule": lambda d: 1 / max(1, d)},
        {"max_staleness": 2},
    ):
        assert not np.allclose(reference(**kwargs)[0], plain, atol=1e-4)


@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_constant_compensation_matches_dc_asgd(lam):
    assert_matches(simulate(compensation=lam), reference(lam=lam))


def test_adaptive_compensation_matches_dc_asgd_a():
    config = compensation.adaptive(0.5, decay=0.9, eps=1e-7)
    assert_matches(simulate(compensation=config), reference(lam=0.5, adaptive=(0.9, 1e-7)))


def test_zero_compensation_and_no_rule_equal_the_plain_simulator_exactly():
    plain = simulate()
    for got in (simulate(compensation=0.0), simulate(compensation=compensation.constant(0.0))):
        np.testing.assert_array_equal(got[0], plain[0])


@pytest.mark.parametrize(
    ("name", "formula"),
    [
        ("inverse", lambda d: 1.0 / max(1, d)),
        # delay_adaptive's threshold is the model's mean delay (here the table's mean).
        ("delay_adaptive", lambda d: min(1.0, max(1.0, TABLE.mean()) / max(1, d))),
    ],
)
def test_staleness_rules_match_their_formula(name, formula):
    assert_matches(simulate(staleness=name), reference(rule=formula))


@pytest.mark.parametrize("threshold", [1.0, 2.5])
def test_weighted_step_matches_its_formula_with_a_momentum_inner(threshold):
    def formula(d):
        return min(1.0, threshold / max(1, d))

    want = reference(rule=formula, scope="step", momentum=0.8)
    got = simulate(fsq.momentum(LR, 0.8), staleness=fsq.staleness.weighted_step(threshold))
    assert_matches(got, want)
    # The step scope differs from scaling gradients when the inner has momentum.
    assert not np.allclose(want[0], reference(rule=formula, momentum=0.8)[0], atol=1e-4)


def test_defaults_are_weighted_step_and_adaptive_compensation():
    def formula(d):
        return min(1.0, 3.0 / max(1, d))

    want = reference(lam=1.0, adaptive=(0.95, 1e-7), rule=formula, scope="step", momentum=0.8)
    tx = fsq.flying_squirrel(fsq.momentum(LR, 0.8), num_workers=W, delay=delays.trace(TABLE))
    data = (jnp.asarray(A, jnp.float32), jnp.asarray(C, jnp.float32))
    step = jax.jit(
        jax.vmap(
            lambda p, s, d: tx.update(jax.grad(loss)(p, d), s, p),
            in_axes=(None, None, 0),
            out_axes=None,
            axis_name="workers",
        )
    )
    init = jax.vmap(tx.init, in_axes=None, out_axes=None, axis_size=W, axis_name="workers")
    params, state = jnp.zeros(DIM), init(jnp.zeros(DIM))
    trajectory = []
    for _ in range(STEPS):
        updates, state = step(params, state, data)
        params = optax.apply_updates(params, updates)
        trajectory.append(params)
    np.testing.assert_allclose(np.stack(trajectory), want[0], rtol=2e-5, atol=2e-6)


def test_callable_staleness_rule_and_compensation_compose():
    rule = lambda d: 1.0 / (1.0 + d)  # noqa: E731
    got = simulate(staleness=lambda tau: 1.0 / (1.0 + tau.astype(jnp.float32)), compensation=1.0)
    assert_matches(got, reference(lam=1.0, rule=rule))


@pytest.mark.parametrize("on_stale", ["drop", "wait"])
@pytest.mark.parametrize("bound", [0, 2, 4])
def test_bounded_staleness_policies(bound, on_stale):
    got = simulate(max_staleness=bound, on_stale=on_stale)
    want = reference(max_staleness=bound, on_stale=on_stale)
    assert_matches(got, want)
    assert want[1].sum() > 0  # the bound did affect some gradients


@pytest.mark.parametrize("bound", [0, 1])
def test_waiting_under_delays_that_are_never_zero(bound):
    """Delays of at least 1 read the due row a step early; a bound below them makes
    ``wait`` deliver sooner (bound 0: synchronously), and nothing may be lost."""
    table = TABLE + 1
    got = simulate(table=table, max_staleness=bound, on_stale="wait")
    want = reference(max_staleness=bound, on_stale="wait", table=table)
    assert_matches(got, want)
    assert want[1].sum() > 0


def test_load_balancing_weights_gradients_by_their_share():
    slowdowns = (1.0, 1.0, 2.0, 4.0)
    model = delays.speeds(slowdowns)
    shares = np.array(model.shares())
    np.testing.assert_allclose(shares, [1 / 1, 1 / 1, 1 / 2, 1 / 4] / np.sum([1, 1, 0.5, 0.25]))
    tx = fsq.flying_squirrel(fsq.sgd(1.0), num_workers=4, delay=model, load_balance=True)
    init = jax.vmap(tx.init, in_axes=None, out_axes=None, axis_size=4, axis_name="workers")
    update = jax.vmap(tx.update, in_axes=(0, None, None), out_axes=None, axis_name="workers")
    # Harmonic-mean slowdown 4 / (1 + 1 + 0.5 + 0.25) = 1.4545: delays 0 or 1, so after two
    # steps of gradients and one of zeros everything sent at step 0 has arrived.
    grads = jnp.asarray(RNG.normal(size=(4, DIM)), jnp.float32)
    state = init(jnp.zeros(DIM))
    total = jnp.zeros(DIM)
    for g in (grads, jnp.zeros_like(grads), jnp.zeros_like(grads)):
        u, state = update(g, state, jnp.zeros(DIM))
        total = total + u
    np.testing.assert_allclose(total, -(shares[:, None] * np.asarray(grads)).sum(0), rtol=1e-6)


def test_load_balancing_reduces_mean_staleness():
    model = delays.speeds((1.0, 1.0, 3.0, 8.0))
    means = {}
    for balance in (False, True):
        tx = fsq.flying_squirrel(fsq.sgd(0.0), num_workers=4, delay=model, load_balance=balance)
        init = jax.vmap(tx.init, in_axes=None, out_axes=None, axis_size=4, axis_name="workers")
        update = jax.jit(
            jax.vmap(tx.update, in_axes=(0, None, None), out_axes=None, axis_name="workers")
        )
        state, delivered, weighted = init(jnp.zeros(1)), 0, 0.0
        for _ in range(200):
            _, state = update(jnp.ones((4, 1)), state, jnp.zeros(1))
            delivered += int(state.delivered)
            weighted += float(state.staleness) * int(state.delivered)
        means[balance] = weighted / delivered
    # Unbalanced: mean of k - 1 = 2.25. Balanced: harmonic mean 4 / (2 + 1/3 + 1/8) - 1.
    assert abs(means[False] - 2.25) < 0.15
    assert abs(means[True] - (4 / (2 + 1 / 3 + 1 / 8) - 1)) < 0.1
    assert means[True] < means[False] / 3


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"compensation": -0.1}, ValueError, "compensation"),
        ({"compensation": "dc"}, TypeError, "compensation"),
        ({"compensation": float("inf")}, ValueError, "compensation"),
        ({"staleness": "harmonic"}, ValueError, "staleness must be"),
        ({"staleness": 3}, ValueError, "staleness must be"),
        ({"max_staleness": 9, "delay": 4}, ValueError, "max_staleness"),
        ({"max_staleness": -1, "delay": 4}, ValueError, "max_staleness"),
        ({"on_stale": "block"}, ValueError, "on_stale"),
        ({"load_balance": True, "delay": 3}, ValueError, "load_balance"),
    ],
)
def test_bad_values_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        fsq.flying_squirrel(fsq.sgd(0.1), num_workers=4, **kwargs)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: compensation.adaptive(-1.0), "strength"),
        (lambda: compensation.adaptive(1.0, decay=1.0), "decay"),
        (lambda: compensation.adaptive(1.0, eps=0.0), "eps"),
        (lambda: staleness.delay_adaptive(0.0), "threshold"),
        (lambda: staleness.delay_adaptive(1.0, scope="update"), "scope"),
        (lambda: staleness.weighted_step(-1.0), "threshold"),
    ],
)
def test_bad_piece_arguments_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_compensation_needs_params():
    tx = fsq.flying_squirrel(fsq.sgd(0.1), num_workers=2, delay=1, compensation=1.0)
    state = tx.init(jnp.zeros(2))
    update = jax.vmap(tx.update, in_axes=(0, None), axis_name="workers")
    with pytest.raises(ValueError, match="compensation needs the current params"):
        update(jnp.ones((2, 2)), state)
