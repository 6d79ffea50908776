"""Local steps (local SGD, DiLoCo, streaming DiLoCo, async local SGD) against a numpy
event simulation, at H = 1 against Flying Squirrel bit for bit, across layouts, faults and
checkpoints."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsq

W = 4
SHAPES = {"a": (3,), "b": (2,)}


def targets(steps, num_workers=W, seed=0):
    """Per-step, per-worker targets: worker i's loss at step t is 0.5 |w - y_it|^2 s."""
    rng = np.random.default_rng(seed)
    return {
        k: rng.normal(size=(steps, num_workers, *s)).astype(np.float32) for k, s in SHAPES.items()
    }


SCALE = {"a": 1.0, "b": 0.5}


def loss(w, y):
    return sum(0.5 * SCALE[k] * jnp.sum((w[k] - y[k]) ** 2) for k in w)


def start():
    return {"a": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([0.3, 3.0])}


def run(tx, ys, *, num_workers=W, backend="vmap", mesh=None, params=None):
    dp = fsq.parallel.data_parallel(loss, tx, num_workers=num_workers, backend=backend, mesh=mesh)
    state = dp.init(start() if params is None else params)
    trajectory = []
    for t in range(len(ys["a"])):
        state, _ = dp.step(state, {k: v[t] for k, v in ys.items()})
        trajectory.append(jax.tree.map(np.asarray, state.params))
    return trajectory, state


class Momentum:
    """Heavy ball as optax.sgd(lr, momentum): m = g + mu m, u = -lr m."""

    def __init__(self, lr, mu):
        self.lr, self.mu = lr, mu

    def init(self):
        return 0.0

    def __call__(self, g, m):
        m = g + self.mu * m
        return -self.lr * m, m


class Nesterov(Momentum):
    def __call__(self, g, m):
        m = g + self.mu * m
        return -self.lr * (g + self.mu * m), m


class DelayedNesterov:
    def __init__(self, lr, mu, period):
        self.lr, self.mu, self.period = lr, mu, period

    def init(self):
        return [0, 0.0, 0.0]  # count, buffer, momentum

    def __call__(self, g, s):
        count, buffer, m = s
        buffer = buffer + g
        count += 1
        if count % self.period == 0:
            m = self.mu * m + buffer
            return -self.lr * (g + self.mu * m), [count, 0.0 * buffer, m]
        return -self.lr * g, [count, buffer, m]


def reference(
    ys, *, steps, local, outer, delay, mixing=None, offsets=None, live=None, compress=None
):
    """A numpy event simulation of local steps, one fragment per parameter leaf group.

    ``steps``: per-worker H; ``offsets``: {leaf: first send after this many local steps};
    ``live(t, i)``: whether worker i is up at tick t (it takes no local step when down);
    ``compress(x) -> kept``: a compressor with error feedback on the whole pseudo-gradient.
    Returns the global parameters after every tick."""
    keys = list(SHAPES)
    offsets = offsets or {k: 0 for k in keys}
    # Leaves sharing an offset form a fragment with its own schedule and outer optimizer.
    groups = {}
    for k in keys:
        groups.setdefault(offsets[k], []).append(k)
    w = {k: np.asarray(v, np.float64) for k, v in start().items()}
    T = len(ys["a"])
    frag = {
        o: {
            "anchor": [{k: w[k].copy() for k in ks} for _ in range(W)],
            "progress": [{k: 0 * w[k] for k in ks} for _ in range(W)],
            "count": [(min(steps) - o) % min(steps)] * W,
            "pending": [False] * W,
            "countdown": [0] * W,
            "local": [{k: local.init() for k in ks} for _ in range(W)],
            "outer": {k: outer.init() for k in ks},
            "inbox": {},
        }
        for o, ks in groups.items()
    }
    residual = [{k: 0 * w[k] for k in keys} for _ in range(W)]
    history = []
    for t in range(T):
        own = [{} for _ in range(W)]
        for o, ks in groups.items():
            f = frag[o]
            for i in range(W):
                active = live is None or live(t, i)
                if active and f["pending"][i] and f["countdown"][i] == 0:
                    for k in ks:
                        o_i = f["anchor"][i][k] + f["progress"][i][k]
                        f["progress"][i][k] = (mixing or 0.0) * (o_i - w[k])
                        f["anchor"][i][k] = w[k].copy()
                    f["pending"][i] = False
                for k in ks:
                    own[i][k] = f["anchor"][i][k] + f["progress"][i][k]
        for o, ks in groups.items():
            f = frag[o]
            for i in range(W):
                countdown = max(f["countdown"][i] - 1, 0)
                if not (live is None or live(t, i)):
                    f["countdown"][i] = countdown
                    continue
                for k in ks:
                    g = SCALE[k] * (own[i][k] - ys[k][t, i])
                    u, f["local"][i][k] = local(g, f["local"][i][k])
                    f["progress"][i][k] = f["progress"][i][k] + u
                f["count"][i] += 1
                if f["count"][i] >= steps[i]:
                    n_live = W if live is None else sum(live(t, j) for j in range(W))
                    weight = W / n_live
                    box = f["inbox"].setdefault(t + delay, {k: 0.0 for k in ks})
                    sent = {k: -f["progress"][i][k] for k in ks}
                    if compress is not None:
                        x = np.concatenate([sent[k] + residual[i][k] for k in ks])
                        kept = compress(x)
                        parts = np.split(kept, np.cumsum([sent[k].size for k in ks])[:-1])
                        for k, part in zip(ks, parts, strict=True):
                            residual[i][k] = sent[k] + residual[i][k] - part
                            sent[k] = part
                    for k in ks:
                        box[k] = box[k] + weight * sent[k]
                    f["count"][i] = 0
                    f["pending"][i] = True
                    countdown = 0 if mixing is None else delay
                f["countdown"][i] = countdown
        for o, ks in groups.items():
            f = frag[o]
            if t in f["inbox"]:
                for k in ks:
                    u, f["outer"][k] = outer(f["inbox"][t][k] / W, f["outer"][k])
                    w[k] = w[k] + u
        history.append({k: v.copy() for k, v in w.items()})
    return history


def assert_close(got, want, tol=2e-5):
    for g, r in zip(got, want, strict=True):
        for k in SHAPES:
            np.testing.assert_allclose(g[k], r[k], rtol=tol, atol=tol)


AXIS = fsq.parallel.AXIS_NAME


def local_state(opt_state):
    """The workers' :class:`fsq.transforms.LocalState` (batched ``[W, ...]``)."""
    is_local = lambda x: isinstance(x, fsq.transforms.LocalState)  # noqa: E731
    (found,) = [x for x in jax.tree.leaves(opt_state, is_leaf=is_local) if is_local(x)]
    return found


def test_local_sgd_with_delays_matches_the_numpy_simulation():
    ys = targets(13)
    tx = fsq.local_sgd(
        fsq.nesterov(0.7, 0.9),
        fsq.momentum(0.1, 0.5),
        num_workers=W,
        steps=3,
        delay=2,
        axis_name=AXIS,
    )
    got, _ = run(tx, ys)
    want = reference(ys, steps=[3] * W, local=Momentum(0.1, 0.5), outer=Nesterov(0.7, 0.9), delay=2)
    assert_close(got, want)
    # Its power: the workers really trained apart (DiLoCo is not data-parallel SGD).
    sync = reference(ys, steps=[1] * W, local=Momentum(0.1, 0.5), outer=Nesterov(0.7, 0.9), delay=0)
    assert np.abs(got[-1]["a"] - sync[-1]["a"]).max() > 1e-2


def test_diloco_is_outer_nesterov_at_the_papers_rates():
    ys = targets(10)
    tx = fsq.diloco(fsq.momentum(0.1, 0.5), num_workers=W, steps=3, axis_name=AXIS)
    got, _ = run(tx, ys)
    want = reference(ys, steps=[3] * W, local=Momentum(0.1, 0.5), outer=Nesterov(0.7, 0.9), delay=0)
    assert_close(got, want)


def test_streaming_diloco_matches_the_numpy_simulation_fragment_by_fragment():
    ys = targets(17)
    tx = fsq.streaming_diloco(
        fsq.momentum(0.1, 0.5),
        num_workers=W,
        steps=4,
        fragments=2,
        overlap=2,
        mixing=0.25,
        axis_name=AXIS,
    )
    got, state = run(tx, ys)
    labels = fsq.fragment_labels(start(), 2)
    assert labels == {"a": 0, "b": 1}
    want = reference(
        ys,
        steps=[4] * W,
        local=Momentum(0.1, 0.5),
        outer=Nesterov(0.7, 0.9),
        delay=2,
        mixing=0.25,
        offsets={"a": 2, "b": 0},
    )
    assert_close(got, want)
    # Each fragment's message carries its own leaves only: bytes are per fragment.
    sizes = [float(s.inner_state.bytes_sent) for s in state.opt_state.inner_states.values()]
    assert sizes == [4 * 3, 4 * 2]


def test_async_local_sgd_with_per_worker_steps_matches_the_numpy_simulation():
    ys = targets(15)
    tx = fsq.async_local_sgd(
        fsq.sgd(0.2),
        num_workers=W,
        steps=3,
        outer_learning_rate=0.5,
        outer_momentum=0.8,
        axis_name=AXIS,
        delay=1,
    )
    got, _ = run(tx, ys)
    want = reference(
        ys, steps=[3] * W, local=Momentum(0.2, 0.0), outer=DelayedNesterov(0.5, 0.8, W), delay=1
    )
    assert_close(got, want)
    tx = fsq.local_sgd(
        fsq.delayed_nesterov(0.5, 0.8, period=W),
        fsq.sgd(0.2),
        num_workers=W,
        steps=[1, 2, 3, 4],
        delay=1,
        axis_name=AXIS,
    )
    got, _ = run(tx, ys)
    want = reference(
        ys,
        steps=[1, 2, 3, 4],
        local=Momentum(0.2, 0.0),
        outer=DelayedNesterov(0.5, 0.8, W),
        delay=1,
    )
    assert_close(got, want)


def test_dynamic_steps_follow_the_workers_speeds():
    tx = fsq.async_local_sgd(
        fsq.sgd(0.2),
        num_workers=W,
        steps=6,
        compute=fsq.timing.fixed([1, 2, 3, 6]),
        dynamic_steps=True,
        axis_name=AXIS,
    )
    ys = targets(12)
    _, state = run(tx, ys)
    # Worker i sends every 6 / speed local steps of (1, 2, 3, 6) ticks: every 6 ticks.
    np.testing.assert_array_equal(local_state(state.opt_state).count, [0, 0, 0, 0])


def test_one_local_step_of_sgd_at_rate_one_is_flying_squirrel_bitwise():
    ys = targets(12, num_workers=8)
    options = dict(
        num_workers=8,
        axis_name=AXIS,
        delay=fsq.delays.uniform(3),
        seed=3,
        compression=fsq.compression.top_k(0.5),
        faults=fsq.faults.crash_recover([2], at=3, until=7),
        worker_momentum=0.5,
    )
    outer = fsq.adam(0.05)
    local = fsq.local_sgd(outer, fsq.sgd(1.0), steps=1, **options)
    plain = fsq.flying_squirrel(outer, compensation=None, staleness=None, **options)
    got, _ = run(local, ys, num_workers=8)
    want, _ = run(plain, ys, num_workers=8)
    for g, r in zip(got, want, strict=True):
        for k in SHAPES:
            np.testing.assert_array_equal(g[k], r[k])


def test_pseudo_gradients_are_conserved_through_delays_and_crashes():
    """Constant gradients: every send carries exactly H lr c_i; with outer SGD at rate 1
    the parameters move by the weighted sum of the sends due so far, none lost or twice."""
    live = lambda t, i: not (i == 1 and 3 <= t < 8)  # noqa: E731
    ys = targets(20)
    tx = fsq.local_sgd(
        fsq.sgd(1.0),
        fsq.sgd(0.1),
        num_workers=W,
        steps=3,
        delay=2,
        axis_name=AXIS,
        faults=fsq.faults.crash_recover([1], at=3, until=8),
    )
    got, _ = run(tx, ys)
    want = reference(
        ys, steps=[3] * W, local=Momentum(0.1, 0.0), outer=Momentum(1.0, 0.0), delay=2, live=live
    )
    assert_close(got, want)
    # Without the fault the trajectory differs: the test sees the crash.
    free = reference(ys, steps=[3] * W, local=Momentum(0.1, 0.0), outer=Momentum(1.0, 0.0), delay=2)
    assert np.abs(free[-1]["a"] - want[-1]["a"]).max() > 1e-3


def test_compressed_pseudo_gradients_keep_what_they_leave_out():
    ys = targets(12)

    def top2(x):
        kept = np.zeros_like(x)
        largest = np.argsort(-np.abs(x), kind="stable")[:2]
        kept[largest] = x[largest]
        return kept

    tx = fsq.local_sgd(
        fsq.sgd(1.0),
        fsq.momentum(0.1, 0.5),
        num_workers=W,
        steps=2,
        delay=1,
        compression=fsq.compression.top_k(0.4),  # 2 of the 5 entries
        axis_name=AXIS,
    )
    got, _ = run(tx, ys)
    want = reference(
        ys,
        steps=[2] * W,
        local=Momentum(0.1, 0.5),
        outer=Momentum(1.0, 0.0),
        delay=1,
        compress=top2,
    )
    assert_close(got, want)


def test_robust_aggregation_votes_over_pseudo_gradients():
    """A coordinate-wise median of the workers' pseudo-gradients, one Byzantine-free round."""
    ys = targets(2)
    tx = fsq.local_sgd(
        fsq.sgd(1.0), fsq.sgd(0.1), num_workers=W, steps=2, aggregation="median", axis_name=AXIS
    )
    got, _ = run(tx, ys)
    w0 = {k: np.asarray(v) for k, v in start().items()}
    for k in SHAPES:
        deltas = []
        for i in range(W):
            w = w0[k].copy()
            for t in range(2):
                w = w - 0.1 * SCALE[k] * (w - ys[k][t, i])
            deltas.append(w0[k] - w)
        np.testing.assert_allclose(got[1][k], w0[k] - np.median(deltas, axis=0), rtol=1e-5)
        np.testing.assert_array_equal(got[0][k], w0[k])  # nothing sent after one step


def test_layouts_agree_vmap_shard_map_and_many_workers_per_device():
    ys = targets(10, num_workers=16)
    options = dict(num_workers=16, steps=3, delay=fsq.delays.uniform(2), axis_name=AXIS, seed=1)
    tx = fsq.diloco(fsq.adam(0.05), **options)
    one, _ = run(tx, ys, num_workers=16)
    eight, _ = run(tx, ys, num_workers=16, backend="shard_map")
    two, _ = run(tx, ys, num_workers=16, backend="shard_map", mesh=fsq.parallel.make_mesh(2))
    for a, b, c in zip(one, eight, two, strict=True):
        for k in SHAPES:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(a[k], c[k], rtol=1e-6, atol=1e-6)


def test_checkpoint_mid_round_resumes_bitwise(tmp_path):
    ys = targets(10)
    tx = fsq.diloco(fsq.adam(0.05), num_workers=W, steps=4, delay=1, axis_name=AXIS)
    mesh = fsq.parallel.make_mesh(4)  # one worker per device
    dp = fsq.parallel.data_parallel(loss, tx, num_workers=W, backend="shard_map", mesh=mesh)
    batch = lambda t: {k: v[t] for k, v in ys.items()}  # noqa: E731
    state = dp.init(start())
    whole = []
    for t in range(10):
        state, _ = dp.step(state, batch(t))
        whole.append(jax.tree.map(np.asarray, state.params))
        if t == 5:  # two local steps into the second round
            fsq.checkpoint.save(tmp_path, t, state)
    restored = fsq.checkpoint.restore(tmp_path, dp.init(start()))
    np.testing.assert_array_equal(local_state(restored.opt_state).count, [2] * W)
    for t in range(6, 10):
        restored, _ = dp.step(restored, batch(t))
        for k in SHAPES:
            np.testing.assert_array_equal(restored.params[k], whole[t][k])


@pytest.mark.parametrize(
    "build, error, match",
    [
        (
            lambda: fsq.transforms.local_steps(fsq.sgd(0.1), 0),
            ValueError,
            "steps must be an int in",
        ),
        (lambda: fsq.transforms.local_steps(fsq.sgd(0.1), [2, 0]), ValueError, "steps"),
        (
            lambda: fsq.transforms.local_steps(fsq.sgd(0.1), 2, mixing=1.5),
            ValueError,
            r"mixing must be in \[0.0, 1.0\]",
        ),
        (
            lambda: fsq.transforms.local_steps(fsq.sgd(0.1), 4, offset=4),
            ValueError,
            r"offset must be an int in \[0, 3\]",
        ),
        (lambda: fsq.transforms.local_steps("sgd", 2), TypeError, "local must be an optax"),
        (
            lambda: fsq.local_sgd(
                fsq.sgd(1.0), fsq.sgd(0.1), num_workers=2, steps=2, delay=1, compensation="adaptive"
            ),
            ValueError,
            "compensation must be None with local steps",
        ),
        (
            lambda: fsq.streaming_diloco(fsq.sgd(0.1), num_workers=2, steps=10, fragments=3),
            ValueError,
            "multiple of fragments",
        ),
        (
            lambda: fsq.streaming_diloco(
                fsq.sgd(0.1), num_workers=2, steps=4, fragments=2, overlap=4
            ),
            ValueError,
            r"overlap must be an int in \[0, 3\]",
        ),
        (
            lambda: fsq.streaming_diloco(
                fsq.sgd(0.1), num_workers=2, steps=4, fragments=2, delay=1
            ),
            TypeError,
            "overlap",
        ),
        (
            lambda: fsq.async_local_sgd(fsq.sgd(0.1), num_workers=2, steps=4, dynamic_steps=True),
            ValueError,
            "needs a compute model",
        ),
        (
            lambda: fsq.diloco(fsq.sgd(0.1), num_workers=2, outer_learning_rate=-1.0),
            ValueError,
            r"outer_learning_rate must be in \[0.0, inf\], got -1.0",
        ),
        (
            lambda: fsq.streaming_diloco(
                fsq.sgd(0.1), num_workers=2, steps=4, fragments=2, outer_momentum=1.0
            ),
            ValueError,
            r"outer_momentum must be in \[0.0, 1.0\), got 1.0",
        ),
        (
            lambda: fsq.async_local_sgd(
                fsq.sgd(0.1), num_workers=2, steps=4, outer_learning_rate=float("nan")
            ),
            ValueError,
            "outer_learning_rate must be finite",
        ),
        (lambda: fsq.delayed_nesterov(0.1, period=0), ValueError, "period must be an int in"),
        (
            lambda: fsq.delayed_nesterov(0.1, momentum=1.0, period=2),
            ValueError,
            r"momentum must be in \[0.0, 1.0\)",
        ),
    ],
)
def test_bad_configurations_raise_naming_the_argument(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    "tx, match",
    [
        (
            fsq.local_sgd(fsq.sgd(1.0), fsq.sgd(0.1), num_workers=W, steps=[1, 2], axis_name=AXIS),
            r"one per worker \(4\)",
        ),
        (
            fsq.local_sgd(
                fsq.sgd(1.0),
                fsq.sgd(0.1),
                num_workers=W,
                steps=2,
                mixing=0.25,
                delay=2,
                axis_name=AXIS,
            ),
            r"steps \(2\) must exceed the largest delay \(2\)",
        ),
        (
            fsq.streaming_diloco(fsq.sgd(0.1), num_workers=W, steps=3, fragments=3, axis_name=AXIS),
            r"fragments must be an int in \[1, 2\]",
        ),
    ],
)
def test_bad_configurations_raise_at_init(tx, match):
    with pytest.raises(ValueError, match=match):
        fsq.parallel.data_parallel(loss, tx, num_workers=W, backend="vmap").init(start())


def test_non_finite_gradients_never_reach_the_local_parameters():
    ys = targets(6)
    ys["a"][2, 1, 0] = np.nan
    tx = fsq.diloco(fsq.sgd(0.1), num_workers=W, steps=2, axis_name=AXIS)
    got, state = run(tx, ys)
    assert all(np.isfinite(g[k]).all() for g in got for k in SHAPES)
    local = local_state(state.opt_state)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(local))


def test_delayed_nesterov_over_a_period_is_one_nesterov_step_on_the_sum():
    rng = np.random.default_rng(0)
    gs = rng.normal(size=(9, 3)).astype(np.float32)
    tx, ref = fsq.delayed_nesterov(0.3, 0.8, period=3), optax.sgd(0.3, 0.8, nesterov=True)
    s, r = tx.init(jnp.zeros(3)), ref.init(jnp.zeros(3))
    total = np.zeros(3)
    for j, g in enumerate(gs):
        u, s = tx.update(jnp.asarray(g), s)
        total += np.asarray(u)
        if j % 3 == 2:
            v, r = ref.update(jnp.asarray(gs[j - 2 : j + 1].sum(0)), r)
            np.testing.assert_allclose(total, v, rtol=1e-5, atol=1e-6)
            total = np.zeros(3)


def test_skipping_busy_workers_takes_the_gradients_at_their_own_parameters():
    """With a clock, gradient_slots computes only the starting workers' gradients, each at
    its own parameters: the same run as computing every worker's."""
    ys = targets(14)
    tx = fsq.async_local_sgd(
        fsq.momentum(0.1, 0.5),
        num_workers=W,
        steps=6,
        compute=fsq.timing.fixed([1, 3, 2, 3]),  # at tick 2 workers 0 and 2 start
        dynamic_steps=True,
        delay=1,
        axis_name=AXIS,
    )
    runs = []
    for slots in (None, 1):
        dp = fsq.parallel.data_parallel(
            loss, tx, num_workers=W, backend="vmap", gradient_slots=slots
        )
        state = dp.init(start())
        for t in range(14):
            state, _ = dp.step(state, {k: v[t] for k, v in ys.items()})
        runs.append(jax.tree.map(np.asarray, state.params))
    for k in SHAPES:
        np.testing.assert_allclose(runs[0][k], runs[1][k], rtol=1e-6, atol=1e-7)
    assert np.abs(runs[0]["a"] - np.asarray(start()["a"])).max() > 1e-3  # it trained


@hypothesis.given(sizes=st.lists(st.integers(1, 1000), min_size=1, max_size=12), data=st.data())
def test_fragments_are_runs_of_consecutive_leaves_none_empty(sizes, data):
    fragments = data.draw(st.integers(1, len(sizes)))
    params = [np.zeros(s) for s in sizes]
    labels = fsq.fragment_labels(params, fragments)
    assert labels[0] == 0 and labels[-1] == fragments - 1
    assert all(b - a in (0, 1) for a, b in zip(labels, labels[1:], strict=False))
    # Balanced where the leaves allow: no fragment exceeds an equal share by more than
    # its largest leaf.
    for f in range(fragments):
        size = sum(s for s, lab in zip(sizes, labels, strict=True) if lab == f)
        assert size <= sum(sizes) / fragments + 2 * max(sizes)
