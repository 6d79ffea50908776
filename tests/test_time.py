"""Workers in time: compute models, links and coordination policies against the
event-driven numpy simulation of tests/reference_time.py."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsq
from fsq import _random, delays, timing
from tests import reference_time, simulation

T = fsq.transforms
W, DIM, STEPS, LR, SEED = 4, 3, 40, 0.1, 5
RNG = np.random.default_rng(41)
A = np.stack([np.diag(RNG.uniform(0.5, 2.0, DIM)) for _ in range(W)])
C = RNG.normal(size=(W, DIM))

COMPUTE = {
    "fixed": timing.fixed([1, 2, 3, 5]),
    "exponential": timing.exponential([1.5, 2.0, 3.0, 4.0], max_ticks=8),
    "slowdown": timing.slowdown(timing.fixed([1, 1, 2, 2]), [0, 3], 4.0, start=8, stop=20),
    "lognormal": timing.lognormal([1.0, 2.0, 2.0, 3.0], 0.6, max_ticks=9),
}
LINKS = {"free": delays.constant(0), "uniform": delays.uniform(2), "constant": delays.constant(1)}
POLICIES = {
    "asynchronous": timing.asynchronous(),
    "synchronous": timing.synchronous(),
    "backup": timing.backup(1),
    "rennala": timing.rennala(3),
    "ringmaster": timing.ringmaster(2),
}


def grad_np(i, w):
    return A[i] @ (w - C[i])


def gradients(w, step):
    del step
    return jnp.einsum(
        "wij,wj->wi", jnp.asarray(A, jnp.float32), w[None] - jnp.asarray(C, jnp.float32)
    )


@functools.cache
def oracle(model, kind):
    """The library's draws for the reference (the compute models' distributions are
    tested against their formulas below, the links' in test_delays): a job's duration or
    a message's transit."""

    @jax.jit
    def draw(worker, index, tick):
        if kind == "compute":
            key = _random.event_key(SEED, _random.Stream.COMPUTE, index, worker)
            return model(key, worker, index, tick)
        key = _random.event_key(SEED, _random.Stream.DELAY, tick, worker)
        return model(key, tick, worker)

    return functools.cache(lambda *args: int(draw(*args)))


def run(compute, link, policy, **options):
    tx = fsq.asynchronous(
        fsq.sgd(LR),
        num_workers=W,
        send=[T.clock(compute, policy, tick_seconds=0.5), *options.pop("send", [])],
        line=T.delay_line(link),
        seed=SEED,
        **options,
    )
    return simulation.run(tx, gradients, jnp.zeros(DIM), STEPS, W)


def expected(compute, link, policy, **options):
    durations, transits = oracle(compute, "compute"), oracle(link, "link")
    return reference_time.simulate(
        grad_np,
        num_workers=W,
        steps=STEPS,
        lr=LR,
        dim=DIM,
        duration=lambda i, j, t: durations(i, j, t),
        transit=lambda i, t: transits(i, 0, t),
        policy=policy.name,
        size=policy.size,
        **options,
    )


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("compute", ["fixed", "exponential", "slowdown"])
def test_policies_match_the_event_simulation(policy, compute):
    link = LINKS["uniform"] if compute == "exponential" else LINKS["free"]
    path, metrics, state = run(COMPUTE[compute], link, POLICIES[policy])
    want, counts, jobs = expected(COMPUTE[compute], link, POLICIES[policy])
    np.testing.assert_allclose(path, want, rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(metrics["delivered"], counts["delivered"])
    np.testing.assert_array_equal(metrics["discarded"], counts["discarded"])
    np.testing.assert_allclose(metrics["staleness"], counts["staleness"], rtol=1e-6)
    # Every job decided within the run was applied once or counted as discarded.
    decided = [j for j in jobs if j.decided is not None and j.decided < STEPS]
    assert metrics["delivered"].sum() + metrics["discarded"].sum() == len(decided)
    schedule = state.worker_states[0]
    assert float(schedule.time) == STEPS * 0.5
    if policy in ("backup", "rennala", "ringmaster"):
        assert counts["discarded"].sum() > 0  # the policy had something to decide


@pytest.mark.parametrize("policy", ["asynchronous", "ringmaster"])
def test_delay_compensation_corrects_by_the_parameters_a_job_read(policy):
    """DC-ASGD under a clock: a gradient is corrected by how far the parameters moved
    between the tick its job read them and the tick it is applied (busy ticks between)."""
    strength = 0.5
    path, metrics, _ = run(
        COMPUTE["fixed"],
        LINKS["uniform"],
        POLICIES[policy],
        send=[T.compensation_channels()],
        deliver=[T.compensate(fsq.compensation.constant(strength))],
    )
    want, counts, _ = expected(
        COMPUTE["fixed"], LINKS["uniform"], POLICIES[policy], compensation=strength
    )
    np.testing.assert_allclose(path, want, rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(metrics["delivered"], counts["delivered"])
    # The correction mattered: without it the trajectory is another one.
    plain, *_ = expected(COMPUTE["fixed"], LINKS["uniform"], POLICIES[policy])
    assert np.abs(plain - want).max() > 1e-3


def draws(model, worker, tick=0, n=20_000):
    keys = jax.random.split(jax.random.key(3), n)
    job = jnp.arange(n)
    return np.asarray(jax.vmap(model, in_axes=(0, None, 0, None))(keys, worker, job, tick))


def assert_frequencies(samples, pmf):
    """Every duration's frequency within 5 standard errors of ``pmf`` (``{k: p}``)."""
    n = len(samples)
    assert abs(sum(pmf.values()) - 1) < 1e-9 and set(np.unique(samples)) <= set(pmf)
    for k, p in pmf.items():
        got = np.mean(samples == k)
        assert abs(got - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12, (k, got, p)


def test_geometric_durations_follow_their_formula():
    """P(c = k) = q^(k-1) (1 - q), q = 1 - 1/mean, the tail piled on max_ticks; mean_ticks
    is the truncated mean."""
    model, mean, top = timing.exponential([1.0, 3.0], max_ticks=8), 3.0, 8
    q = 1 - 1 / mean
    pmf = {k: q ** (k - 1) * (1 - q) for k in range(1, top)} | {top: q ** (top - 1)}
    samples = draws(model, 1)
    assert_frequencies(samples, pmf)
    assert model.mean_ticks(1) == pytest.approx(sum(k * p for k, p in pmf.items()))
    np.testing.assert_array_equal(draws(model, 0, n=100), 1)  # a mean of 1: always 1


def test_lognormal_durations_follow_their_formula():
    """P(c = k) = P(k - 1/2 <= m e^(sigma xi) < k + 1/2), clipped to [1, max_ticks]."""
    model, median, sigma, top = timing.lognormal([2.0, 3.0], 0.6, max_ticks=7), 3.0, 0.6, 7

    def below(x):  # P(m e^(sigma xi) < x)
        return 0.5 * (1 + math.erf(math.log(x / median) / (sigma * math.sqrt(2))))

    pmf = {1: below(1.5)} | {k: below(k + 0.5) - below(k - 0.5) for k in range(2, top)}
    pmf[top] = 1 - below(top - 0.5)
    samples = draws(model, 1)
    assert_frequencies(samples, pmf)
    assert model.mean_ticks(1) == pytest.approx(sum(k * p for k, p in pmf.items()), rel=1e-2)


def test_slowdown_slows_its_workers_in_its_window_only():
    """Jobs of workers 0 and 3 started in ticks [8, 20) take ceil(4 c), the rest c."""
    model, base = COMPUTE["slowdown"], [1, 1, 2, 2]
    for worker in range(W):
        for tick in (0, 7, 8, 19, 20):
            slow = worker in (0, 3) and 8 <= tick < 20
            want = math.ceil(4.0 * base[worker]) if slow else base[worker]
            np.testing.assert_array_equal(draws(model, worker, tick, n=4), want)


def test_utilisation_and_busy_time_by_hand():
    """fixed([1, 2, 3, 5]), synchronous: rounds of 5 ticks, 11 of 20 worker-ticks computing."""
    _, _, state = run(COMPUTE["fixed"], LINKS["free"], POLICIES["synchronous"])
    schedule = state.worker_states[0]
    np.testing.assert_array_equal(schedule.busy, [8, 16, 24, 40])  # 8 rounds
    np.testing.assert_array_equal(schedule.idle, [32, 24, 16, 0])
    np.testing.assert_allclose(schedule.utilisation, 11 / 20, rtol=1e-6)


@pytest.mark.parametrize("link", ["constant", "uniform"])
def test_links_and_the_staleness_rule_in_inner_steps(link):
    rule = fsq.staleness.weighted_step(1.0)
    path, metrics, _ = run(
        COMPUTE["lognormal"],
        LINKS[link],
        POLICIES["asynchronous"],
        send=[T.scale_by_staleness(rule)],
        deliver=[T.normalise("weight")],
    )
    want, counts, _ = expected(
        COMPUTE["lognormal"],
        LINKS[link],
        POLICIES["asynchronous"],
        rule=lambda tau: min(1.0, 1.0 / max(1, tau)),
        scope="step",
    )
    np.testing.assert_allclose(path, want, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(metrics["staleness"], counts["staleness"], rtol=1e-6)
    # Staleness in inner steps is not the delay in ticks here.
    assert np.any(counts["staleness"] > 0)


def test_synchronous_with_one_tick_jobs_is_delay_zero_bitwise():
    plain = fsq.flying_squirrel(fsq.adam(LR), num_workers=W, delay=0)
    timed = fsq.flying_squirrel(
        fsq.adam(LR), num_workers=W, delay=0, compute=timing.fixed([1] * W), policy="synchronous"
    )
    want, *_ = simulation.run(plain, gradients, jnp.zeros(DIM), STEPS, W)
    got, *_ = simulation.run(timed, gradients, jnp.zeros(DIM), STEPS, W)
    np.testing.assert_array_equal(got, want)


def test_bandwidth_links_charge_the_bytes_on_the_wire():
    """A dense message of 3 float32 (12 bytes) over 4 bytes per tick takes 3 ticks to send,
    top-1 of 3 (an index and a value, 8 bytes) 2; a worker sends one message at a time, so
    one-tick jobs are throttled to the link: the first arrive at the transmission's end."""
    for compressor, sending in ((None, 3), (fsq.compression.top_k(0.3), 2)):
        tx = fsq.flying_squirrel(
            fsq.sgd(LR),
            num_workers=W,
            delay=delays.bandwidth(4.0),
            compute=timing.fixed([1] * W),
            staleness=None,
            compensation=None,
            compression=compressor,
        )
        path, metrics, _ = simulation.run(tx, gradients, jnp.zeros(DIM), 12, W)
        arrivals = [W if t > 0 and t % sending == 0 else 0 for t in range(12)]
        np.testing.assert_array_equal(metrics["delivered"], arrivals)
        if compressor is None:
            want, *_ = reference_time.simulate(
                grad_np,
                num_workers=W,
                steps=12,
                lr=LR,
                dim=DIM,
                duration=lambda i, j, t: 1,
                transit=lambda i, t: 3,
                policy="asynchronous",
                sending=3,
            )
            np.testing.assert_allclose(path, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
    ("backend", "devices", "workers", "slots"),
    [
        ("vmap", 1, 16, 3),  # at most 3 gradients per step, more when more workers start
        ("shard_map", 8, 16, None),
        ("shard_map", 8, 8, None),  # one worker per device: a busy one is skipped
        ("pmap", 8, 8, None),
    ],
)
def test_every_layout_runs_the_same_schedule(backend, devices, workers, slots):
    """Every layout, computing only the gradients of the workers that start a job, gives
    the run of one device computing every gradient (idle workers report NaN losses)."""
    compute = timing.exponential([1.0 + (i % 4) for i in range(workers)], max_ticks=6)

    def loss(params, batch):
        return jnp.mean((batch["x"] @ params - batch["y"]) ** 2)

    def trajectory(layout, num_devices, gradient_slots=None):
        tx = fsq.flying_squirrel(
            fsq.adam(0.05),
            num_workers=workers,
            axis_name=fsq.parallel.AXIS_NAME,
            delay=delays.uniform(2),
            compute=compute,
            policy=timing.rennala(workers // 2),
            seed=SEED,
        )
        mesh = None if layout == "vmap" else fsq.parallel.make_mesh(num_devices)
        dp = fsq.parallel.data_parallel(
            loss, tx, num_workers=workers, backend=layout, mesh=mesh, gradient_slots=gradient_slots
        )
        state = dp.init(jnp.zeros(3))
        x = jax.random.normal(jax.random.key(0), (workers, 5, 3))
        batch = {"x": x, "y": x @ jnp.array([1.0, -2.0, 0.5])}
        path, idle = [], []
        for _ in range(12):
            state, losses = dp.step(state, batch)
            path.append(np.asarray(state.params))
            idle.append(np.isnan(np.asarray(losses)))
        return np.stack(path), np.stack(idle)

    want, _ = trajectory("vmap", 1, gradient_slots=workers)  # every gradient computed
    got, idle = trajectory(backend, devices, slots)
    assert not np.allclose(want[-1], 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert 0 < idle.mean() < 1  # some workers were busy, some started jobs


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: timing.fixed([1, 0]), ValueError, "ticks"),
        (lambda: timing.exponential([0.5], 4), ValueError, "means"),
        (lambda: timing.backup(0), ValueError, "workers"),
        (lambda: timing.rennala(0), ValueError, "batch"),
        (lambda: timing.ringmaster(0), ValueError, "threshold"),
        (lambda: T.clock(timing.fixed([1]), "synchronous"), TypeError, "policy"),
        (
            lambda: T.clock(timing.fixed([1]), timing.synchronous(), tick_seconds=0),
            ValueError,
            "tick_seconds",
        ),
        (
            lambda: fsq.flying_squirrel(fsq.sgd(0.1), num_workers=2, policy="gossip"),
            ValueError,
            "policy",
        ),
        (lambda: timing.fixed(5), TypeError, "ticks must be a non-empty sequence"),
        (lambda: timing.stragglers(4, 1, 2), TypeError, "slow must be a non-empty sequence"),
        (lambda: timing.slowdown(timing.fixed([1, 2]), [7], 2.0, 0, 4), ValueError, "workers"),
        (
            lambda: fsq.flying_squirrel(fsq.sgd(0.1), num_workers=2, tick_seconds=-1.0),
            ValueError,
            "tick_seconds",
        ),
        (
            lambda: fsq.parallel.data_parallel(
                lambda w, x: jnp.sum(w * x), fsq.sgd(0.1), num_workers=8, gradient_slots=0
            ),
            ValueError,
            "gradient_slots",
        ),
    ],
)
def test_bad_arguments_raise(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_a_batch_larger_than_the_workers_is_refused():
    tx = fsq.asynchronous(
        fsq.sgd(LR), num_workers=2, send=[T.clock(timing.fixed([1, 1]), timing.rennala(3))]
    )
    with pytest.raises(ValueError, match="at most num_workers=2"):
        fsq.parallel.vmap_workers(tx, num_workers=2).init(jnp.zeros(1))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"compute": timing.fixed([1, 2])}, "defined for 2 workers, but num_workers=4"),
        ({"policy": timing.backup(4)}, r"backup\(4\) needs fewer backup workers"),
        ({"policy": timing.rennala(5)}, "at most num_workers=4"),
    ],
)
def test_the_preset_checks_compute_and_policy_against_the_workers_when_built(options, match):
    """``num_workers`` is known when the preset is built: a mismatch fails there, not at
    ``init`` inside the training step."""
    with pytest.raises(ValueError, match=match):
        fsq.flying_squirrel(fsq.sgd(LR), num_workers=4, **options)


def test_a_clock_built_without_the_workers_checks_them_at_init():
    tx = fsq.asynchronous(
        fsq.sgd(LR), num_workers=4, send=[T.clock(timing.fixed([1, 2]), timing.asynchronous())]
    )
    with pytest.raises(ValueError, match="defined for 2 workers, but num_workers=4"):
        fsq.parallel.vmap_workers(tx, num_workers=4).init(jnp.zeros(1))


@pytest.mark.parametrize(
    ("policy", "stale"),
    [
        ("asynchronous", True),
        (timing.ringmaster(2), True),
        ("synchronous", False),
        (timing.backup(1), False),
        (timing.rennala(2), False),
    ],
)
def test_delay_compensation_is_on_where_applied_gradients_can_be_stale(policy, stale):
    """The default's compensation sends 3 channels where a policy applies stale gradients
    (even over a free link: compute time makes them stale), and is skipped where every
    applied gradient is fresh (it would add only rounding)."""
    tx = fsq.flying_squirrel(
        fsq.sgd(LR), num_workers=W, compute=COMPUTE["fixed"], policy=policy, staleness=None
    )
    init = jax.vmap(tx.init, axis_size=W, in_axes=None, axis_name="workers")
    state = init(jnp.zeros(DIM))
    assert len(state.in_flight.slots.channels) == (3 if stale else 1)
    # The state's metrics stay reachable by name with a clock in it.
    assert jax.tree.leaves(optax.tree.get(state, "staleness"))[0].shape == (W,)


@pytest.mark.parametrize(("delay", "stale"), [(0, False), (delays.bandwidth(4.0), True)])
def test_delay_compensation_is_on_where_a_link_delays_messages(delay, stale):
    """Without a clock, compensation is on where messages can be late: on a bandwidth
    link, even with no latency, a message takes its bytes' transmission."""
    tx = fsq.flying_squirrel(fsq.sgd(LR), num_workers=W, delay=delay, staleness=None)
    state = jax.vmap(tx.init, axis_size=W, in_axes=None, axis_name="workers")(jnp.zeros(DIM))
    assert len(state.in_flight.slots.channels) == (3 if stale else 1)
