"""Each piece of the pipeline alone, against a numpy formula."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsq
from fsq import _random, compression
from fsq.transforms import Status, pairs, ring, wire

T = fsq.transforms
SEED = 7


def context(step=0, worker=0, num_workers=4, max_delay=3):
    return T.Context(jnp.int32(step), jnp.int32(worker), num_workers, SEED, max_delay)


def message(gradient, delay=0, status=Status.SENT, weight=1.0):
    m = T.new_message(gradient, delay, jnp.float32)
    return m._replace(status=jnp.int32(status), weight=jnp.float32(weight))


def status_of(m):
    return Status(int(m.status))


# --- Worker side -----------------------------------------------------------------------


def test_on_gradient_runs_the_transform_and_keeps_state_when_nothing_is_sent():
    ema = T.on_gradient(optax.ema(0.5, debias=False))
    state = ema.init(jnp.zeros(2))
    m, state = ema.update(message(jnp.array([2.0, 4.0])), state, None, None)
    np.testing.assert_allclose(m.gradient, [1.0, 2.0])
    np.testing.assert_allclose(state.ema, [1.0, 2.0])
    for fate in (Status.LOST, Status.REJECTED, Status.DROPPED):
        _, kept = ema.update(message(jnp.array([9.0, 9.0]), status=fate), state, None, None)
        np.testing.assert_array_equal(kept.ema, state.ema)
        assert int(kept.count) == int(state.count)
    _, held = ema.update(message(jnp.array([3.0, 0.0]), status=Status.HELD), state, None, None)
    np.testing.assert_allclose(held.ema, [2.0, 1.0])  # held back, but sent
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        T.on_gradient(lambda g: g)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 3e38])
def test_reject_non_finite(value):
    reject = T.reject_non_finite()
    tree = {"a": jnp.ones((2, 3)), "b": jnp.ones(4).at[3].set(value), "c": jnp.ones(())}
    m, _ = reject.update(message(tree), reject.init(None), None, None)
    assert status_of(m) == (Status.SENT if value == 3e38 else Status.REJECTED)
    lost, _ = reject.update(message(tree, status=Status.LOST), reject.init(None), None, None)
    assert status_of(lost) == Status.LOST  # the first fate decided stays
    assert bool(T.all_finite({"empty": jnp.zeros((0, 3))}))


def test_liveness_weights_live_workers_by_w_over_n_live():
    model = fsq.faults.crash_recover([1, 3], at=2, until=5)
    live = T.liveness(model)
    for step in range(7):
        down = 2 <= step < 5
        n_live = 4 - 2 * down
        for worker in range(4):
            m, _ = live.update(message(jnp.ones(2)), (), None, context(step, worker))
            if down and worker in (1, 3):
                assert status_of(m) == Status.LOST
            else:
                assert status_of(m) == Status.SENT
                np.testing.assert_allclose(float(m.weight), 4 / n_live, rtol=1e-7)


def test_attack_corrupts_byzantine_workers_and_rejects_what_is_not_finite():
    attack = T.attack(fsq.faults.byzantine([1], factor=-4.0))
    honest, _ = attack.update(message(jnp.array([1.0, 2.0])), (), None, context(worker=0))
    evil, _ = attack.update(message(jnp.array([1.0, 2.0])), (), None, context(worker=1))
    np.testing.assert_array_equal(honest.gradient, [1.0, 2.0])
    np.testing.assert_array_equal(evil.gradient, [-4.0, -8.0])
    huge, _ = attack.update(message(jnp.array([1e38, 0.0])), (), None, context(worker=1))
    assert status_of(huge) == Status.REJECTED  # -4e38 overflows float32


def test_worker_momentum_is_an_ema_that_skips_what_is_not_sent():
    beta = 0.7
    momentum = T.worker_momentum(beta)
    state = momentum.init(jnp.zeros(3))
    rng = np.random.default_rng(0)
    velocity = np.zeros(3)
    for fate in [Status.SENT, Status.LOST, Status.SENT, Status.REJECTED, Status.HELD]:
        g = rng.normal(size=3).astype(np.float32)
        m, state = momentum.update(message(jnp.asarray(g), status=fate), state, None, None)
        if fate in (Status.SENT, Status.HELD):
            velocity = beta * velocity + (1 - beta) * g
            np.testing.assert_allclose(m.gradient, velocity, rtol=1e-6)
        np.testing.assert_allclose(state.ema, velocity, rtol=1e-6)
    with pytest.raises(ValueError, match="beta"):
        T.worker_momentum(1.0)


@pytest.mark.parametrize("on_stale", ["drop", "wait"])
def test_bound_staleness(on_stale):
    bound = T.bound_staleness(2, on_stale)
    for delay in range(5):
        m, _ = bound.update(message(jnp.ones(1), delay), (), None, None)
        late = delay > 2
        if on_stale == "wait":
            assert int(m.delay) == min(delay, 2)
            assert status_of(m) == (Status.HELD if late else Status.SENT)
        else:
            assert int(m.delay) == delay
            assert status_of(m) == (Status.DROPPED if late else Status.SENT)
    lost, _ = bound.update(message(jnp.ones(1), 4, Status.LOST), (), None, None)
    assert status_of(lost) == Status.LOST
    assert bound.delays((1, 5)) == ((1, 2) if on_stale == "wait" else (1, 5))
    with pytest.raises(ValueError, match="max_staleness"):
        bound.delays((0, 1))  # a bound above the largest delay
    with pytest.raises(ValueError, match="on_stale"):
        T.bound_staleness(2, "block")


@pytest.mark.parametrize("feedback", [True, False])
def test_compress_keeps_the_rest_in_the_residual(feedback):
    top = compression.top_k(0.5, error_feedback=feedback)
    piece = T.compress(top)
    params = {"a": jnp.zeros(3), "b": jnp.zeros(1)}
    state = piece.init(params)
    rng = np.random.default_rng(1)
    residual = np.zeros(4)
    for fate in [Status.SENT, Status.DROPPED, Status.SENT, Status.LOST, Status.SENT]:
        g = rng.normal(size=4).astype(np.float32)
        tree = {"a": jnp.asarray(g[:3]), "b": jnp.asarray(g[3:])}
        m, state = piece.update(message(tree, status=fate), state, None, context())
        x = g + residual if feedback else g
        kept = np.argsort(-np.abs(x))[:2]
        sent = np.zeros(4)
        sent[kept] = x[kept]
        flat = np.concatenate([np.asarray(m.gradient["a"]), np.asarray(m.gradient["b"])])
        np.testing.assert_allclose(flat, sent, rtol=1e-6)
        np.testing.assert_array_equal(np.sort(np.asarray(m.support)), np.sort(kept))
        if feedback and fate == Status.SENT:
            residual = x - sent
        if feedback:
            own = np.concatenate([np.asarray(state.residual["a"]), state.residual["b"]])
            np.testing.assert_allclose(own, residual, rtol=1e-6, atol=1e-7)
    if not feedback:
        assert isinstance(state, optax.EmptyState)
    assert piece.wire_bytes((3, 1), 1) == top.payload_bytes((3, 1), 1)


def test_scale_by_staleness_and_by_worker():
    rule = fsq.staleness.weighted_step(3.0)
    scale = T.scale_by_staleness(rule)
    for delay in range(8):
        m, _ = scale.update(message(jnp.ones(1), delay, weight=0.5), (), None, None)
        np.testing.assert_allclose(float(m.weight), 0.5 * min(1.0, 3.0 / max(1, delay)), 1e-7)
    by_worker = T.scale_by_worker([0.5, 2.0, 1.0, 0.5])
    m, _ = by_worker.update(message(jnp.ones(1), weight=3.0), (), None, context(worker=1))
    assert float(m.weight) == 6.0
    with pytest.raises(ValueError, match="weights"):
        T.scale_by_worker([1.0, -1.0])


def test_gaussian_noise_is_drawn_from_the_workers_key():
    noise = T.gaussian_noise(0.5)
    tree = {"a": jnp.zeros((40, 50)), "b": jnp.ones(3)}
    m, _ = noise.update(message(tree), (), None, context(step=4, worker=2))
    key = _random.event_key(SEED, _random.Stream.NOISE, 4, 2)
    ka, kb = jax.random.split(key, 2)
    np.testing.assert_allclose(m.gradient["a"], 0.5 * jax.random.normal(ka, (40, 50)), 1e-6)
    np.testing.assert_allclose(m.gradient["b"], 1 + 0.5 * jax.random.normal(kb, (3,)), 1e-6)
    sample = np.asarray(m.gradient["a"])  # 2000 draws
    assert abs(sample.std() - 0.5) < 0.03 and abs(sample.mean()) < 0.05
    other, _ = noise.update(message(tree), (), None, context(step=4, worker=3))
    assert not np.allclose(other.gradient["a"], m.gradient["a"])


def test_compensation_channels():
    dc = T.compensation_channels()
    g, w = np.array([2.0, -3.0], np.float32), np.array([0.5, 4.0], np.float32)
    m, _ = dc.update(message(jnp.asarray(g)), (), jnp.asarray(w), None)
    np.testing.assert_allclose(m.channels[1], g * g)
    np.testing.assert_allclose(m.channels[2], g * g * w)
    assert status_of(m) == Status.SENT and dc.channels == 3
    with pytest.raises(ValueError, match="needs the current params"):
        dc.update(message(jnp.asarray(g)), (), None, None)


@pytest.mark.parametrize("adaptive", [False, True])
def test_an_overflowed_correction_falls_back_to_the_gradient(adaptive):
    """The channels of g = 2e19 overflow float32: that coordinate is applied uncorrected,
    the others corrected, and DC-ASGD-a's mean square keeps its last finite value."""
    config = fsq.compensation.adaptive(1.0) if adaptive else fsq.compensation.constant(1.0)
    dc, combine = T.compensation_channels(), T.compensate(config)
    w_sent, w_now = jnp.array([1.0, 1.0]), jnp.array([0.5, 0.5])
    m, _ = dc.update(message(jnp.array([2e19, 2.0])), (), w_sent, None)
    assert not np.isfinite(np.asarray(m.channels[1])[0])
    totals = T.Totals(*[jnp.float32(1)] * 7)
    layout = T.Layout(num_workers=1, num_channels=3, max_delay=1)
    state = combine.init(w_now, layout)
    out, state = combine.update(T.Arrival(m.channels, totals), state, w_now, None)
    total = np.asarray(out.channels[0])
    assert total[0] == np.float32(2e19)  # the gradient, uncorrected
    lam = 1.0 / np.sqrt(0.05 * 4.0 + 1e-7) if adaptive else 1.0
    np.testing.assert_allclose(total[1], 2.0 + lam * 4.0 * (0.5 - 1.0), rtol=1e-6)
    if adaptive:
        np.testing.assert_allclose(state.mean_square, [0.0, 0.05 * 4.0], rtol=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
def test_compensate_combines_the_channels(adaptive):
    config = (
        fsq.compensation.adaptive(0.5, 0.9, 1e-7) if adaptive else fsq.compensation.constant(0.5)
    )
    combine = T.compensate(config)
    layout = T.Layout(num_workers=2, num_channels=3, max_delay=2)
    w = np.array([1.0, -2.0], np.float32)
    state = combine.init(jnp.asarray(w), layout)
    mean_square = np.zeros(2)
    rng = np.random.default_rng(2)
    for weight in (2.0, 0.0, 1.5):
        c1, c2, c3 = (rng.normal(size=2).astype(np.float32) for _ in range(3))
        c2 = np.abs(c2)
        totals = T.Totals(*[jnp.float32(weight)] * 7)
        arrival = T.Arrival(tuple(jnp.asarray(c) for c in (c1, c2, c3)), totals)
        out, state = combine.update(arrival, state, jnp.asarray(w), None)
        lam = 0.5
        if adaptive:
            if weight > 0:
                mean_square = 0.9 * mean_square + 0.1 * c2 / weight
            lam = 0.5 / np.sqrt(mean_square + 1e-7)
            np.testing.assert_allclose(state.mean_square, mean_square, rtol=1e-6)
        np.testing.assert_allclose(out.channels[0], c1 + lam * (c2 * w - c3), rtol=1e-5)


def test_robust_reduces_the_latest_votes_within_the_horizon():
    median = T.robust(fsq.aggregation.median())
    layout = T.Layout(num_workers=3, num_channels=1, max_delay=1)
    state = median.init({"w": jnp.zeros(2)}, layout)
    latest, voted = np.zeros((3, 2)), np.full(3, -(10**9))
    rng = np.random.default_rng(3)
    for step, weights in enumerate([(1, 1, 1), (2, 0, 0), (0, 0, 1), (0, 1, 0)]):
        weights = np.asarray(weights, np.float32)
        sums = rng.normal(size=(3, 2)).astype(np.float32) * weights[:, None]
        # Votes are weighted means: one delivered gradient of weight 2 votes sums / 2.
        count, zero = jnp.asarray(weights > 0, jnp.float32), jnp.zeros(3)
        by_worker = T.Totals(count, zero, zero, jnp.asarray(weights), zero, zero, zero)
        arrival = T.Arrival(({"w": jnp.asarray(sums)},), None, by_worker)
        out, state = median.update(arrival, state, None, context(step, num_workers=3, max_delay=1))
        fresh = weights > 0
        latest[fresh] = sums[fresh] / weights[fresh][:, None]
        voted[fresh] = step
        recent = step - voted <= 1
        want = np.median(latest[recent], axis=0) * weights.sum()
        np.testing.assert_allclose(out.channels[0]["w"], want, rtol=1e-6)
        np.testing.assert_allclose(state.latest[0]["w"], latest, rtol=1e-6)


@pytest.mark.parametrize("by", ["workers", "weight"])
def test_normalise(by):
    norm = T.normalise(by)
    totals = T.Totals(*[jnp.float32(2.5)] * 7)
    arrival = T.Arrival((jnp.array([5.0, -1.0]),), totals)
    out, _ = norm.update(arrival, norm.init(None, None), None, context(num_workers=4))
    if by == "workers":
        np.testing.assert_allclose(out.channels[0], [1.25, -0.25])
        assert out.step_scale is None
    else:
        np.testing.assert_allclose(out.channels[0], [2.0, -0.4])
        np.testing.assert_allclose(out.step_scale, 2.5 / 4)
    with pytest.raises(ValueError, match="by must be"):
        T.normalise("mean")


# --- The wire and the ring -----------------------------------------------------------------


def test_wire_row_of_a_message_with_a_zero_size_leaf():
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "empty": jnp.zeros((0, 4)), "c": jnp.ones(())}
    m = message(tree, delay=3, weight=0.5)
    m = m._replace(channels=(tree, jax.tree.map(lambda x: 2 * x, tree)))
    row = wire.parts(m, jnp.float32)
    like = wire.like(tree, 2, jnp.bfloat16, jnp.float32)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), row.channels[1]) == jax.tree.map(
        lambda x: (x.shape, jnp.dtype(jnp.float32)), tree
    )
    assert like.channels[0]["a"].dtype == jnp.bfloat16 and like.totals.shape == (7,)
    assert wire.matches(tree, jax.tree.map(lambda x: x[None], row), leading=1)
    assert not wire.matches({"a": tree["a"]}, row, leading=0)
    for got, want in zip(row.channels, (tree, jax.tree.map(lambda x: 2 * x, tree)), strict=True):
        for g, x in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(g, 0.5 * np.asarray(x))
    np.testing.assert_array_equal(row.totals, [1, 3, 0, 0.5, 0, 0, 0])
    assert wire.totals(row).weight == 0.5
    dropped = wire.parts(m._replace(status=jnp.int32(Status.DROPPED)), jnp.float32)
    assert all(not np.any(x) for x in jax.tree.leaves(dropped.channels))
    np.testing.assert_array_equal(dropped.totals, [0, 0, 1, 0, 0, 0, 0])
    nan = {"a": jnp.full((2, 3), jnp.nan), "empty": jnp.zeros((0, 4)), "c": jnp.ones(())}
    rejected = wire.parts(message(nan, status=Status.REJECTED), jnp.float32)
    np.testing.assert_array_equal(rejected.channels[0]["a"], 0)  # zeros, not NaN


def _leaves_of(messages, width):
    """A message of two leaves, ``[L, 2]`` and ``[L, width - 2]``, as a row of one channel."""
    channel = {"a": messages[:, :2], "b": messages[:, 2:]}
    return wire.Row((channel,), jnp.ones((messages.shape[0], 7)))


@pytest.mark.parametrize("num_local", [1, 3, 8])
@pytest.mark.parametrize("apart", [False, True])
@pytest.mark.parametrize("low", [0, 1])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ring_delivers_every_message_once_at_its_step(num_local, apart, low, dtype):
    """The ring alone against a dict of due steps: L local workers write (one by one, or
    as a segment sum when L exceeds the ring's 4 rows), with rows left unmarked for whole
    cycles; read early when no delay is 0 (``low`` 1). Stored in bfloat16, each row is the
    float32 sum rounded once."""
    max_delay, width, steps = 3 + low, 5, 30
    rng = np.random.default_rng(num_local + 10 * apart + 100 * low)
    segments = num_local if apart else 1
    like = wire.like({"a": jnp.zeros(2), "b": jnp.zeros(width - 2)}, 1, dtype, jnp.float32)
    buffer = ring.init(max_delay, like, early=low > 0, segments=segments)

    @jax.jit
    def step_fn(buffer, step, messages, delays):
        write = ring.add_messages(_leaves_of(messages, width), delays, step, apart)
        due, buffer = ring.advance(buffer, step, write)
        row = ring.read(due)
        channel = row.channels[0]
        return jnp.concatenate([channel["a"], channel["b"]], axis=-1), row.totals, buffer

    due_at = collections.defaultdict(lambda: np.zeros((segments, width)))
    magnitude = collections.defaultdict(lambda: np.zeros((segments, width)))
    counts = collections.defaultdict(lambda: np.zeros(segments))
    for t in range(steps):
        messages = rng.normal(size=(num_local, width)).astype(np.float32)
        # Whole steps share a delay sometimes, so rows stay empty for a cycle.
        shared = rng.uniform() < 0.5
        delays = rng.integers(low, max_delay + 1, size=1 if shared else num_local)
        delays = np.broadcast_to(delays, (num_local,))
        for i in range(num_local):
            due_at[t + delays[i]][i if apart else 0] += messages[i]
            magnitude[t + delays[i]][i if apart else 0] += np.abs(messages[i])
            counts[t + delays[i]][i if apart else 0] += 1
        row, totals, buffer = step_fn(
            buffer, jnp.int32(t), jnp.asarray(messages), jnp.asarray(delays)
        )
        want = due_at.pop(t, np.zeros((segments, width)))
        count = counts.pop(t, np.zeros(segments))
        assert row.dtype == dtype
        if dtype == jnp.float32:
            np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-6)
        else:  # each of the row's writes rounds its running sum once: at most 2^-8 of it
            bound = 2**-8 * count[:, None] * magnitude.pop(t, np.zeros((segments, width)))
            assert np.all(np.abs(np.asarray(row, np.float64) - want) <= bound + 1e-30)
        np.testing.assert_array_equal(totals, np.repeat(count[:, None], 7, 1))  # exact


def test_ring_write_strategies_agree():
    """The segment sum and the row-by-row updates write the same sums."""
    rows = jnp.array([0, 2, 2, 1, 0, 2])
    messages = jnp.asarray(np.random.default_rng(4).normal(size=(6, 3)), jnp.float32)
    filled = jnp.array([[True], [False], [True], [False]])
    slots = jnp.arange(12.0).reshape(4, 1, 3)
    row = wire.Row((slots,), jnp.zeros((4, 1, 7)))
    summed = ring._segment_sum(row, filled, rows, wire.Row((messages,), jnp.ones((6, 7))), False)
    want = np.where(np.asarray(filled)[:, :, None], np.asarray(slots), 0)
    for i, r in enumerate(np.asarray(rows)):
        want[r, 0] += np.asarray(messages[i])
    want[3] = np.asarray(slots)[3]  # untouched and unmarked: left as it was (reads as 0)
    np.testing.assert_allclose(summed.channels[0], want, rtol=1e-6)
    np.testing.assert_array_equal(summed.totals[:, 0, 0], [2, 1, 3, 0])


@pytest.mark.parametrize("per_leaf", [False, True])
def test_pairs_deliver_every_message_once_at_its_step(per_leaf):
    """Sparse messages held as pairs by send step, against a dict of due steps: each due
    row is the dense sum of the (position, value) pairs due then; workers that send
    nothing at a step (``slots``) leave no message."""
    shapes, num_local, max_delay, steps = ((3, 4), (5,)), 3, 3, 25
    sizes = [int(np.prod(s)) for s in shapes]
    counts = (2, 1) if per_leaf else None
    k = 3
    like = wire.like(tuple(jnp.zeros(s) for s in shapes), 2, jnp.float32, jnp.float32)
    buffer = pairs.init(max_delay, num_local, k, 2, jnp.float32, jnp.float32)
    rng = np.random.default_rng(5)
    due_at = collections.defaultdict(lambda: np.zeros((2, sum(sizes))))
    counted = collections.defaultdict(float)
    for t in range(steps):
        sending = np.sort(rng.choice(num_local, size=rng.integers(1, num_local + 1), replace=False))
        n = len(sending)
        if per_leaf:  # two positions in the first leaf, one in the second
            positions = np.stack(
                [
                    np.concatenate(
                        [rng.choice(sizes[0], 2, replace=False), sizes[0] + rng.choice(sizes[1], 1)]
                    )
                    for _ in range(n)
                ]
            )
        else:
            positions = np.stack([rng.choice(sum(sizes), k, replace=False) for _ in range(n)])
        values = rng.normal(size=(2, n, k)).astype(np.float32)
        delays = rng.integers(0, max_delay + 1, size=n)
        for i in range(n):
            for c in range(2):
                due_at[t + delays[i]][c, positions[i]] += values[c, i]
            counted[t + delays[i]] += 1
        buffer = pairs.write(
            buffer,
            jnp.int32(t),
            jnp.asarray(positions),
            tuple(jnp.asarray(v) for v in values),
            jnp.ones((n, 7)),
            jnp.asarray(delays),
            jnp.asarray(sending),
        )
        row = pairs.due(buffer, jnp.int32(t), like, counts)
        want = due_at.pop(t, np.zeros((2, sum(sizes))))
        for c, channel in enumerate(row.channels):
            got = np.concatenate([np.ravel(x) for x in channel])
            np.testing.assert_allclose(got, want[c], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(row.totals, np.full(7, counted.pop(t, 0.0)))
    assert pairs.nbytes(max_delay, num_local, k, 2, jnp.float32) == sum(
        x.nbytes for x in jax.tree.leaves(buffer)
    )


# --- Placement and the mapping of workers --------------------------------------------------


def test_vmap_workers_batches_per_worker_state_only():
    tx = fsq.flying_squirrel(
        fsq.adam(0.1), num_workers=4, delay=2, compression=compression.top_k(0.5)
    )
    workers = fsq.parallel.vmap_workers(tx, num_workers=4)
    state = workers.init({"w": jnp.zeros(3)})
    placements = [fsq.placement.placement_of(s) for s in state.worker_states]
    assert placements == [fsq.placement.PER_WORKER] * len(state.worker_states)
    assert fsq.placement.placement_of(state.in_flight) == fsq.placement.PER_DEVICE
    assert optax.tree.get(state, "residual")["w"].shape == (4, 3)  # [W, P]
    assert state.in_flight.slots.channels[0]["w"].shape == (2, 1, 3)  # one ring (read early)
    updates, state = workers.update({"w": jnp.ones((4, 3))}, state, {"w": jnp.zeros(3)})
    assert updates["w"].shape == (3,)


def test_undeclared_state_that_differs_between_workers_is_named():
    tx = optax.MultiSteps(fsq.flying_squirrel(fsq.sgd(0.1), num_workers=2), every_k_schedule=2)
    workers = fsq.parallel.vmap_workers(tx, num_workers=2)
    state = workers.init(jnp.zeros(2))
    with pytest.raises(ValueError, match="fsq.accumulate"):
        workers.update(jnp.ones((2, 2)), state, jnp.zeros(2))
