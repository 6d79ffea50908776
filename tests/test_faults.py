"""Faults and robust aggregation against numpy: formulas, an event simulation, layouts."""

import collections
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsq
from fsq import aggregation, delays
from tests import simulation

W, DIM, STEPS, LR = 6, 3, 20, 0.1
RNG = np.random.default_rng(7)
A = np.stack([np.diag(RNG.uniform(0.5, 2.0, DIM)) for _ in range(W)])
C = RNG.normal(size=(W, DIM))
TABLE = RNG.integers(0, 4, size=(5, W))  # hand-built delays: some workers' messages collide
PLAIN = {"staleness": None, "compensation": None}


def loss(w, shard):
    a, c = shard
    return 0.5 * (w - c) @ a @ (w - c)


def reference(live, table=TABLE, bad=None, reduce=None, horizon=None):
    """Per-gradient event simulation with SGD: worker ``i`` sends at ``t`` iff ``live[t, i]``;
    ``bad`` maps a worker to the factor it scales its gradient by; ``reduce`` a numpy
    coordinate-wise rule over the workers' latest votes (None: the plain mean over ``W``),
    those that arrived within ``horizon + 1`` steps (default: the largest delay).
    """
    horizon = table.max() if horizon is None else horizon
    due, latest, voted_at = collections.defaultdict(list), {}, {}
    w, trajectory = np.zeros(DIM), []
    for t in range(STEPS):
        share = W / max(live[t].sum(), 1)
        for i in np.flatnonzero(live[t]):
            g = A[i] @ (w - C[i]) * (bad or {}).get(i, 1.0)
            due[t + table[t % len(table), i]].append((i, g, share))
        arrived = due.pop(t, [])
        if arrived:
            weights = collections.defaultdict(float)
            sums = collections.defaultdict(lambda: np.zeros(DIM))
            for i, g, share in arrived:
                weights[i] += share
                sums[i] += share * g
            if reduce is None:
                aggregate = sum(sums.values()) / W
            else:  # every worker's latest vote, if it arrived within max_delay + 1 steps
                for i in sums:
                    latest[i], voted_at[i] = sums[i] / weights[i], t
                recent = [i for i in sorted(latest) if t - voted_at[i] <= horizon]
                votes = np.stack([latest[i] for i in recent])
                aggregate = reduce(votes) * sum(weights.values()) / W
            w = w - LR * aggregate
        trajectory.append(w)
    return np.stack(trajectory)


def simulate(table=TABLE, num_workers=W, **kwargs):
    tx = fsq.flying_squirrel(
        fsq.sgd(LR), num_workers=num_workers, delay=delays.trace(table), **PLAIN, **kwargs
    )
    data = (jnp.asarray(A, jnp.float32), jnp.asarray(C, jnp.float32))
    return simulation.trajectory(tx, loss, data, jnp.zeros(DIM), STEPS, "lost")


def live_mask(down):
    """``[STEPS, W]`` liveness from ``{worker: (first down step, first step up again)}``."""
    live = np.ones((STEPS, W), bool)
    for i, (start, stop) in down.items():
        live[start:stop, i] = False
    return live


def assert_close(got, want):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


# --- Fault models -------------------------------------------------------------------------


def test_crash_stop_and_recover_match_event_simulation():
    faults = [fsq.faults.crash([1], at=4), fsq.faults.crash_recover([3, 4], at=2, until=9)]
    got, lost = simulate(faults=faults)
    live = live_mask({1: (4, STEPS), 3: (2, 9), 4: (2, 9)})
    want = reference(live)
    assert_close(got, want)
    # The faults change the run (the test is not vacuous), and the lost messages are
    # counted when they would have been due.
    assert not np.allclose(want, reference(np.ones_like(live)), atol=1e-4)
    lost_due = np.zeros(STEPS + 8, int)
    for t, i in zip(*np.nonzero(~live), strict=True):
        lost_due[t + TABLE[t % len(TABLE), i]] += 1
    np.testing.assert_array_equal(lost, lost_due[:STEPS])


def test_in_flight_messages_of_a_crashed_worker_are_still_delivered():
    # Constant delay 3: worker 0 crashes at step 2, its gradients of steps 0-1 arrive at 3-4.
    table = np.full((1, W), 3)
    got, _ = simulate(table=table, faults=fsq.faults.crash([0], at=2))
    assert_close(got, reference(live_mask({0: (2, STEPS)}), table=table))


def test_drops_deliver_the_mean_of_live_workers_at_the_drop_rate():
    # Gradient of worker i: (i + 1) on coordinate i only, so the update shows who was live.
    rate, steps = 0.3, 400
    tx = fsq.flying_squirrel(
        fsq.sgd(1.0), num_workers=W, faults=fsq.faults.drops(rate), seed=3, **PLAIN
    )
    grads = jnp.diag(jnp.arange(1.0, W + 1))

    def step(state, _):
        update = jax.vmap(tx.update, in_axes=(0, None, None), out_axes=None, axis_name="w")
        updates, state = update(grads, state, jnp.zeros(W))
        return state, (updates, state.lost)

    init = jax.vmap(tx.init, in_axes=None, out_axes=None, axis_size=W, axis_name="w")
    tx = fsq.flying_squirrel(
        fsq.sgd(1.0),
        num_workers=W,
        faults=fsq.faults.drops(rate),
        seed=3,
        axis_name="w",
        **PLAIN,
    )
    _, (updates, lost) = jax.lax.scan(step, init(jnp.zeros(W)), None, length=steps)
    updates, lost = np.asarray(updates), np.asarray(lost)
    live = updates != 0
    n_live = live.sum(1)
    np.testing.assert_array_equal(lost, W - n_live)
    busy = n_live > 0
    want = -np.arange(1.0, W + 1) / np.maximum(n_live, 1)[:, None] * live
    np.testing.assert_allclose(updates[busy], want[busy], rtol=1e-6)
    assert abs(1 - live.mean() - rate) < 0.03  # 2400 draws: 4 standard deviations


def test_byzantine_attacks_send_what_they_say():
    g = {"a": jnp.arange(1.0, 4.0), "b": jnp.ones((2, 2))}
    key = jax.random.key(0)
    scaled = fsq.faults.byzantine([2], factor=-4.0)
    np.testing.assert_array_equal(scaled.send(key, 0, 2, g)["a"], [-4.0, -8.0, -12.0])
    np.testing.assert_array_equal(scaled.send(key, 0, 1, g)["a"], [1.0, 2.0, 3.0])
    noise = fsq.faults.byzantine([0], attack="random", factor=3.0)
    draws = jax.vmap(lambda k: noise.send(k, 0, 0, {"x": jnp.zeros(50)})["x"])(
        jax.random.split(key, 400)
    )
    assert abs(float(draws.std()) - 3.0) < 0.05 and abs(float(draws.mean())) < 0.05


def test_byzantine_worker_matches_event_simulation():
    got, _ = simulate(faults=fsq.faults.byzantine([0], factor=-4.0))
    assert_close(got, reference(np.ones((STEPS, W), bool), bad={0: -4.0}))


def test_faults_are_a_pure_function_of_the_seed():
    def lost(seed):
        return simulate(faults=fsq.faults.drops(0.4), seed=seed)[1]

    np.testing.assert_array_equal(lost(1), lost(1))
    assert not np.array_equal(lost(1), lost(2))


def test_no_faults_equal_the_plain_run_bitwise():
    plain, _ = simulate()
    np.testing.assert_array_equal(simulate(faults=fsq.faults.drops(0.0))[0], plain)
    np.testing.assert_array_equal(simulate(aggregation="mean")[0], plain)


# --- Robust aggregation -------------------------------------------------------------------


def numpy_trimmed_mean(votes, trim):
    cut = int(np.floor(trim * len(votes)))
    return np.sort(votes, axis=0)[cut : len(votes) - cut].mean(axis=0)


@pytest.mark.parametrize("seed", range(4))
def test_median_and_trimmed_mean_match_numpy(seed):
    rng = np.random.default_rng(seed)
    votes = rng.normal(size=(9, 17)).astype(np.float32)
    present = rng.random(9) < 0.7
    present[seed] = True
    chosen = votes[present]
    got = fsq.aggregation.median().reduce(jnp.asarray(votes), jnp.asarray(present))
    np.testing.assert_allclose(got, np.median(chosen, axis=0), rtol=1e-6)
    for trim in (0.0, 0.2, 0.4):
        rule = fsq.aggregation.trimmed_mean(trim)
        got = rule.reduce(jnp.asarray(votes), jnp.asarray(present))
        np.testing.assert_allclose(got, numpy_trimmed_mean(chosen, trim), rtol=1e-5, atol=1e-6)
    nobody = fsq.aggregation.median().reduce(jnp.asarray(votes), jnp.zeros(9, bool))
    np.testing.assert_array_equal(nobody, np.zeros(17))


def numpy_centered_clip(votes, iterations):
    center = np.median(votes, axis=0)
    for _ in range(iterations):
        offsets = votes - center
        distances = np.linalg.norm(offsets, axis=1)
        radius = np.median(distances)
        scale = np.minimum(1, radius / np.maximum(distances, 1e-30))
        center = center + (offsets * scale[:, None]).mean(axis=0)
    return center


def numpy_mixing(votes, present, bad):
    """Nearest-neighbour mixing, directly from its definition."""
    chosen, mixed = np.flatnonzero(present), votes.copy()
    for i, vote in enumerate(votes):
        distances = ((votes[chosen] - vote) ** 2).sum(axis=1)
        nearest = chosen[np.argsort(distances)[: max(len(chosen) - bad, 1)]]
        mixed[i] = votes[nearest].mean(axis=0)
    return mixed


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "rule, reduce",
    [
        (fsq.aggregation.median(mixing=2), lambda v: np.median(v, axis=0)),
        (fsq.aggregation.trimmed_mean(0.25, mixing=1), lambda v: numpy_trimmed_mean(v, 0.25)),
    ],
)
def test_nearest_neighbour_mixing_matches_numpy(rule, reduce, seed):
    rng = np.random.default_rng(seed)
    votes, present = rng.normal(size=(9, 6)), rng.random(9) < 0.8
    got = rule.reduce(jnp.asarray(votes, jnp.float32), jnp.asarray(present))
    want = reduce(numpy_mixing(votes, present, rule.mixing)[present])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(want, reduce(votes[present]), atol=1e-3)


@pytest.mark.parametrize("n", range(1, 13))
def test_sorting_network_sorts_every_zero_one_sequence(n):
    # The 0-1 principle: a comparator network sorts all inputs iff it sorts all 0/1 ones.
    network = aggregation._sorting_network(n)
    for bits in itertools.product([0, 1], repeat=n):
        x = list(bits)
        for i, j in network:
            x[i], x[j] = min(x[i], x[j]), max(x[i], x[j])
        assert x == sorted(bits)


@pytest.mark.parametrize("n", [3, 8, 17, 32, 33, 40])
def test_votes_are_ordered_like_numpy_with_absent_votes_last(n):
    rng = np.random.default_rng(n)
    votes, present = rng.normal(size=(n, 5)), rng.random(n) < 0.7
    got = aggregation._ordered(jnp.asarray(votes), jnp.asarray(present))
    want = np.sort(np.where(present[:, None], votes, np.inf), axis=0)
    np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))


@pytest.mark.parametrize("seed", range(3))
def test_centered_clipping_matches_numpy_and_bounds_an_outlier(seed):
    rng = np.random.default_rng(seed)
    votes = rng.normal(size=(9, 17)).astype(np.float32)
    votes[2] = 1000.0  # a Byzantine vote
    present = rng.random(9) < 0.8
    present[[2, 3, 4]] = True
    rule = fsq.aggregation.centered_clip(iterations=2)
    got = rule.reduce(jnp.asarray(votes), jnp.asarray(present))
    want = numpy_centered_clip(votes[present].astype(np.float64), 2)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(got)).max() < 3  # the outlier moved the center by < radius


@pytest.mark.parametrize(
    "aggregation, reduce",
    [
        (fsq.aggregation.median(), lambda v: np.median(v, axis=0)),
        (fsq.aggregation.trimmed_mean(0.25), lambda v: numpy_trimmed_mean(v, 0.25)),
    ],
)
def test_robust_rules_match_event_simulation_with_a_byzantine_worker(aggregation, reduce):
    bad = fsq.faults.byzantine([5], factor=-4.0)
    got, _ = simulate(faults=bad, aggregation=aggregation)
    live = np.ones((STEPS, W), bool)
    want = reference(live, bad={5: -4.0}, reduce=reduce)
    assert_close(got, want)
    assert not np.allclose(want, reference(live, bad={5: -4.0}), atol=1e-3)


def test_votes_of_a_crashed_worker_age_out():
    # Worker 2 is down for steps 3-12: after max_delay + 1 steps its last vote no longer counts.
    faults = fsq.faults.crash_recover([2], at=3, until=13)
    got, lost = simulate(faults=faults, aggregation="median")
    live = live_mask({2: (3, 13)})
    want = reference(live, reduce=lambda v: np.median(v, axis=0))
    assert_close(got, want)
    # Ageing matters here: had the stale vote been kept, the run would differ.
    kept = reference(live, reduce=lambda v: np.median(v, axis=0), horizon=STEPS)
    assert not np.allclose(want, kept, atol=1e-4)
    assert lost.sum() == 10


def test_trimmed_mean_without_trim_is_the_mean_of_the_votes():
    # Each worker votes once per step, also when two of its gradients arrive together.
    got, _ = simulate(aggregation=fsq.aggregation.trimmed_mean(0.0))
    live = np.ones((STEPS, W), bool)
    assert_close(got, reference(live, reduce=lambda v: v.mean(axis=0)))
    # Without delays every worker delivers one gradient: exactly the plain mean.
    table = np.zeros((1, W), int)
    robust, _ = simulate(table=table, aggregation=fsq.aggregation.trimmed_mean(0.0))
    assert_close(robust, simulate(table=table)[0])


@pytest.mark.parametrize(
    "backend, num_devices", [("vmap", None), ("shard_map", 3), ("shard_map", 1)]
)
def test_robust_aggregation_is_the_same_on_every_layout(backend, num_devices):
    def run(backend, num_devices):
        tx = fsq.flying_squirrel(
            fsq.sgd(LR),
            num_workers=W,
            delay=delays.trace(TABLE),
            axis_name=fsq.parallel.AXIS_NAME,
            aggregation="median",
            faults=fsq.faults.byzantine([5]),
            **PLAIN,
        )
        mesh = fsq.parallel.make_mesh(num_devices) if backend != "vmap" else None
        dp = fsq.parallel.data_parallel(loss, tx, num_workers=W, backend=backend, mesh=mesh)
        state = dp.init(jnp.zeros(DIM))
        data = (jnp.asarray(A, jnp.float32), jnp.asarray(C, jnp.float32))
        trajectory = []
        for _ in range(STEPS):
            state, _ = dp.step(state, data)
            trajectory.append(np.asarray(state.params))
        return np.stack(trajectory)

    want = reference(
        np.ones((STEPS, W), bool), bad={5: -4.0}, reduce=lambda v: np.median(v, axis=0)
    )
    assert_close(run(backend, num_devices), want)


# --- Bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: fsq.faults.drops(1.0), ValueError, "rate"),
        (lambda: fsq.faults.drops(-0.1), ValueError, "rate"),
        (lambda: fsq.faults.crash([], at=3), TypeError, "workers"),
        (lambda: fsq.faults.crash([1, 1], at=3), ValueError, "distinct"),
        (lambda: fsq.faults.crash([1], at=-1), ValueError, "at"),
        (lambda: fsq.faults.crash_recover([1], at=5, until=5), ValueError, "until"),
        (lambda: fsq.faults.byzantine([0], attack="lie"), ValueError, "attack"),
        (lambda: fsq.aggregation.trimmed_mean(0.5), ValueError, "trim"),
        (lambda: fsq.aggregation.resolve("krum"), ValueError, "aggregation"),
        (lambda: fsq.aggregation.centered_clip(0), ValueError, "iterations"),
        (lambda: fsq.aggregation.median(mixing=-1), ValueError, "mixing"),
        (
            lambda: fsq.flying_squirrel(fsq.sgd(1.0), num_workers=2, worker_momentum=1.0),
            ValueError,
            "worker_momentum",
        ),
        (
            lambda: fsq.flying_squirrel(
                fsq.sgd(1.0), num_workers=4, faults=fsq.faults.crash([4], 1)
            ),
            ValueError,
            "worker ids",
        ),
        (
            lambda: fsq.flying_squirrel(fsq.sgd(1.0), num_workers=4, faults="drops"),
            TypeError,
            "faults",
        ),
    ],
)
def test_bad_values_raise(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_robust_init_outside_the_mapped_context_raises():
    tx = fsq.flying_squirrel(fsq.sgd(1.0), num_workers=2, delay=1, aggregation="median")
    with pytest.raises(ValueError, match="not bound"):
        tx.init(jnp.zeros(3))


def test_worker_momentum_matches_numpy_and_ignores_non_finite_gradients():
    beta, steps = 0.7, 6
    grads = np.random.default_rng(3).normal(size=(steps, W, DIM)).astype(np.float32)
    grads[2, 1, 0] = np.nan  # rejected: worker 1 neither sends nor updates its momentum
    tx = fsq.flying_squirrel(fsq.sgd(1.0), num_workers=W, worker_momentum=beta, **PLAIN)
    workers = fsq.parallel.vmap_workers(tx, num_workers=W)
    state, params = workers.init(jnp.zeros(DIM)), jnp.zeros(DIM)
    velocity = np.zeros((W, DIM))
    for t in range(steps):
        u, state = workers.update(jnp.asarray(grads[t]), state, params)
        ok = np.isfinite(grads[t]).all(axis=1)
        velocity[ok] = beta * velocity[ok] + (1 - beta) * grads[t][ok]
        np.testing.assert_allclose(u, -velocity[ok].sum(0) / W, rtol=1e-5, atol=1e-6)
        momentum = np.asarray(optax.tree.get(state, "ema"))
        np.testing.assert_allclose(momentum, velocity, rtol=1e-5, atol=1e-6)
    assert int(state.rejected) == 0 and not np.allclose(velocity[1], velocity[0])
