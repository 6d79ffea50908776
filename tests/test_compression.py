"""Compression: operators against numpy, error feedback conserves mass, the sparse
collective equals the dense simulation, byte accounting, the overlapped exchange."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsq
from fsq import compression, delays

W = 4
PLAIN = {"staleness": None, "compensation": None}
SIZES = (30, 3)  # a [10, 3] matrix and a [3] bias, in leaf order


def random_vector(seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=sum(SIZES)), jnp.float32)


def as_tree(x):
    """The flat vector ``x`` as the gradient it stands for: a [10, 3] matrix and a [3] bias."""
    return (jnp.asarray(x)[:30].reshape(10, 3), jnp.asarray(x)[30:])


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree.leaves(tree)])


def compressed(operator, x, key=None):
    """``operator`` on the gradient ``x`` stands for, flattened back."""
    return flat(operator.compress(as_tree(x), key))


# --- Operators -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_top_k_keeps_the_largest_magnitudes(seed):
    x = random_vector(seed)
    got = compressed(compression.top_k(0.1), x)
    want = np.zeros(33)
    largest = np.argsort(-np.abs(np.asarray(x)))[:4]  # ceil(0.1 * 33) = 4
    want[largest] = np.asarray(x)[largest]
    np.testing.assert_array_equal(got, want)
    got = compressed(compression.top_k(0.1, per_leaf=True), x)
    want = np.zeros(33)
    for start, stop, k in ((0, 30, 3), (30, 33, 1)):
        seg = np.asarray(x)[start:stop]
        keep = start + np.argsort(-np.abs(seg))[:k]
        want[keep] = np.asarray(x)[keep]
    np.testing.assert_array_equal(got, want)


def test_random_k_keeps_k_entries_chosen_by_the_key():
    x = random_vector(0)
    rk = compression.random_k(0.25)
    a = compressed(rk, x, jax.random.key(1))
    b = compressed(rk, 2 * x, jax.random.key(1))
    kept = np.flatnonzero(a)
    assert len(kept) == 9  # ceil(0.25 * 33)
    np.testing.assert_array_equal(a[kept], np.asarray(x)[kept])
    np.testing.assert_array_equal(np.flatnonzero(b), kept)  # same key: same positions
    c = compressed(rk, x, jax.random.key(2))
    assert set(np.flatnonzero(c)) != set(kept)


def test_scaled_sign_per_leaf():
    x = np.asarray(random_vector(3))
    got = compressed(compression.sign(), x)
    want = np.concatenate(
        [np.mean(np.abs(x[:30])) * np.sign(x[:30]), np.mean(np.abs(x[30:])) * np.sign(x[30:])]
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stochastic_quantization_is_unbiased_on_its_grid(bits):
    x = np.asarray(random_vector(4))
    q = compression.quantize(bits)
    draws = np.asarray(
        jax.vmap(lambda k: jnp.concatenate([jnp.ravel(v) for v in q.compress(as_tree(x), k)]))(
            jax.random.split(jax.random.key(0), 4000)
        )
    )
    for start, stop in ((0, 30), (30, 33)):
        step = np.abs(x[start:stop]).max() / (2 ** (bits - 1) - 1)
        levels = draws[:, start:stop] / step
        np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)  # on the grid
        assert np.all(np.abs(draws[:, start:stop] - x[start:stop]) <= step * (1 + 1e-5))
        # Unbiased: the mean of 4000 draws is within 5 standard errors of x.
        np.testing.assert_array_less(
            np.abs(draws[:, start:stop].mean(0) - x[start:stop]), 5 * step / 2 / np.sqrt(4000)
        )


# --- Inside Flying Squirrel ----------------------------------------------------------------


def run_updates(tx, grads, params):
    """Feeds ``grads`` ``[steps, W, P]`` to ``tx`` under vmap; returns updates and state."""
    workers = fsq.parallel.vmap_workers(tx, num_workers=W)

    def body(state, g):
        u, state = workers.update(g, state, params)
        return state, u

    state, updates = jax.lax.scan(body, workers.init(params), grads)
    return np.asarray(updates), state


@pytest.mark.parametrize(
    "operator",
    [
        compression.top_k(0.1),
        compression.top_k(0.1, per_leaf=True),
        compression.random_k(0.2),
        compression.sign(),
        compression.quantize(4),
    ],
)
@pytest.mark.parametrize("max_delay", [0, 3])
def test_error_feedback_conserves_mass(operator, max_delay):
    # What was sent (delivered: read off the updates of SGD with lr 1; or still in flight)
    # plus what is left in the residuals equals every gradient ever computed.
    steps = 12
    grads = np.random.default_rng(max_delay).normal(size=(steps, W, 33)).astype(np.float32)
    tx = fsq.flying_squirrel(
        fsq.sgd(1.0), num_workers=W, delay=delays.uniform(max_delay), compression=operator, **PLAIN
    )
    updates, state = run_updates(tx, jnp.asarray(grads), jnp.zeros(33))
    # In flight: the ring rows marked as holding messages (not yet delivered).
    pending = state.in_flight.pending().channels[0]  # [rows, 1, P]
    in_flight = np.asarray(pending).sum(axis=(0, 1)) if max_delay else 0
    sent = -W * updates.sum(axis=0) + in_flight
    residual = np.asarray(optax.tree.get(state, "residual")).sum(axis=0)
    np.testing.assert_allclose(sent + residual, grads.sum(axis=(0, 1)), rtol=1e-4, atol=1e-4)
    assert np.abs(residual).max() > 1e-3  # compression really left something behind


def test_without_error_feedback_the_rest_is_lost():
    grads = np.random.default_rng(0).normal(size=(5, W, 33)).astype(np.float32)
    tx = fsq.flying_squirrel(
        fsq.sgd(1.0), num_workers=W, compression=compression.top_k(0.1, error_feedback=False)
    )
    updates, state = run_updates(tx, jnp.asarray(grads), jnp.zeros(33))
    assert optax.tree.get(state, "residual") is None  # no residual is kept
    top = compression.top_k(0.1, error_feedback=False)
    want = np.stack([[compressed(top, g) for g in s] for s in grads])
    np.testing.assert_allclose(-W * updates, want.sum(axis=1), rtol=1e-5, atol=1e-6)


def mlp_loss(params, batch):
    return jnp.mean((jnp.tanh(batch["x"] @ params["w"]) @ params["v"] - batch["y"]) ** 2)


def given_gradients(params, batch):
    """A linear loss: the gradients are the batch's, the same bits on any layout."""
    return sum(jnp.sum(params[k] * batch[k]) for k in params)


def run_layout(backend, num_devices, steps=8, loss=mlp_loss, **kwargs):
    tx = fsq.flying_squirrel(
        fsq.sgd(0.2),
        num_workers=8,
        delay=delays.uniform(3),
        axis_name=fsq.parallel.AXIS_NAME,
        seed=5,
        **kwargs,
    )
    mesh = None if backend == "vmap" else fsq.parallel.make_mesh(num_devices)
    dp = fsq.parallel.data_parallel(loss, tx, num_workers=8, backend=backend, mesh=mesh)
    rng = np.random.default_rng(0)
    state = dp.init({"w": rng.normal(size=(5, 6)) / 2, "v": rng.normal(size=6) / 2})
    for step in range(steps):
        data = np.random.default_rng(step)
        if loss is given_gradients:  # magnitudes over 4 decades: the order of a sum shows
            scale = 10.0 ** data.integers(-2, 2, size=(8, 1))
            batch = {
                "w": data.normal(size=(8, 5, 6)) * scale[..., None],
                "v": data.normal(size=(8, 6)) * scale,
            }
        else:
            batch = {"x": data.normal(size=(8, 4, 5)), "y": data.normal(size=(8, 4))}
        state, _ = dp.step(state, batch)
    return state


@pytest.mark.parametrize("operator", [compression.top_k(0.2), compression.random_k(0.3)])
@pytest.mark.parametrize(
    "backend, num_devices", [("vmap", None), ("shard_map", 8), ("shard_map", 2)]
)
def test_sparse_collective_equals_dense_simulation(operator, backend, num_devices):
    dense = run_layout("vmap", None, compression=operator)
    sparse = run_layout(backend, num_devices, compression=operator, exchange="sparse")
    for got, want in zip(
        jax.tree.leaves(sparse.params), jax.tree.leaves(dense.params), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    plain = run_layout("vmap", None)
    assert not np.allclose(plain.params["w"], dense.params["w"], atol=1e-4)


@pytest.mark.parametrize("kwargs", [{}, {"compression": compression.top_k(0.3)}])
def test_ordered_exchange_delivers_the_same_bits_on_every_layout(kwargs):
    """Added in worker order, the sums do not depend on how workers sit on devices (the
    dense all-reduce's do: the power of this test); the same math as the dense exchange.
    The gradients are given (a linear loss): a gradient computed by a model can round
    differently with the number of workers vectorized on a device, on some CPUs (and all
    eight workers on one device compute delay compensation in another rounding)."""
    layouts = [("shard_map", 8), ("shard_map", 4), ("shard_map", 2)]

    def run(layout, **more):
        return run_layout(*layout, loss=given_gradients, **kwargs, **more).params

    ordered = [run(layout, exchange="ordered") for layout in layouts]
    for params in ordered[1:]:
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ordered[0]), strict=True):
            np.testing.assert_array_equal(got, want)
    dense = [run(layout)["w"] for layout in layouts]
    assert any(not np.array_equal(d, dense[0]) for d in dense[1:])
    np.testing.assert_allclose(ordered[0]["w"], dense[0], rtol=1e-5, atol=1e-6)


def test_sum_in_order_adds_rows_one_after_the_other():
    """Bitwise the float32 sum ((x0 + x1) + x2) + ..., not a pairwise or blocked sum."""
    rows = np.random.default_rng(3).normal(size=(37, 50)).astype(np.float32) * 10.0 ** (
        np.arange(37) % 7
    )[:, None].astype(np.float32)
    want = rows[0].copy()
    for row in rows[1:]:
        want = want + row
    got = np.asarray(jax.jit(fsq.transforms.line.sum_in_order)(jnp.asarray(rows)))
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(np.sum(rows[::-1], axis=0, dtype=np.float32), want)


def test_sparse_exchange_gathers_pairs_instead_of_reducing_the_dense_row():
    tx = fsq.flying_squirrel(
        fsq.sgd(0.1),
        num_workers=8,
        delay=fsq.delays.uniform(2),
        axis_name=fsq.parallel.AXIS_NAME,
        compression=compression.top_k(0.05),
        exchange="sparse",
        **PLAIN,
    )
    dp = fsq.parallel.data_parallel(mlp_loss, tx, num_workers=8)
    state = dp.init({"w": jnp.ones((40, 50)), "v": jnp.ones(50)})
    batch = {"x": jnp.ones((8, 4, 40)), "y": jnp.ones((8, 4))}
    text = jax.jit(dp.step).lower(state, batch).compile().as_text()
    assert "all-reduce(" not in text
    gathered = re.findall(r"= (\w+)\[([\d,]+)\][^=]*all-gather\(", text)
    # One all-gather of one row per worker: the k = ceil(0.05 * 2050) = 103 kept values,
    # 7 totals, the delay and the k positions.
    assert [int(np.prod([int(d) for d in shape.split(",")])) for _, shape in gathered] == [
        8 * (103 + 7 + 1 + 103)
    ]


# --- Byte accounting ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "operator, channels, want",
    [
        (None, 1, 4 * 33),
        (None, 3, 3 * 4 * 33),
        (compression.top_k(0.1), 1, 4 * (4 + 4)),  # k = ceil(3.3) = 4 (index, value) pairs
        (compression.top_k(0.1, per_leaf=True), 1, 4 * (3 + 1) * 2),  # 3 + 1 entries
        (compression.top_k(0.1), 3, 4 * (4 + 3 * 4)),  # one index, three values
        (compression.random_k(0.1), 1, 4 * 4),  # values only
        (compression.sign(), 1, (4 + 4) + (1 + 4)),  # ceil(30 / 8) + scale, ceil(3 / 8) + scale
        (compression.quantize(8), 1, (30 + 4) + (3 + 4)),
        (compression.quantize(4), 1, (15 + 4) + (2 + 4)),
    ],
)
def test_bytes_sent_equal_a_hand_computation(operator, channels, want):
    extras = {**PLAIN, "compensation": 0.5 if channels == 3 else None}
    tx = fsq.flying_squirrel(fsq.sgd(1.0), num_workers=W, delay=1, compression=operator, **extras)
    init = jax.vmap(tx.init, in_axes=None, out_axes=None, axis_size=W, axis_name="workers")
    state = init({"w": jnp.zeros((10, 3)), "b": jnp.zeros(3)})
    assert float(state.bytes_sent) == want


# --- Overlapped exchange -------------------------------------------------------------------


def ancestors(text, name):
    """Names the HLO instruction ``name`` depends on, within the entry computation."""
    entry = text[text.index("ENTRY") :]
    entry = entry[: entry.index("\n}")]
    operands = {}
    for line in entry.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?\((.*)", line)
        if match:
            operands[match[1]] = re.findall(r"%([\w.\-]+)", match[2])
    seen, todo = set(), [name]
    while todo:
        for parent in operands.get(todo.pop(), []):
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen, entry


@pytest.mark.parametrize("delay, overlaps", [(1, True), (0, False)])
def test_with_delay_one_the_all_reduce_does_not_wait_for_the_gradient(delay, overlaps):
    tx = fsq.flying_squirrel(
        fsq.sgd(0.1), num_workers=8, delay=delay, axis_name=fsq.parallel.AXIS_NAME, **PLAIN
    )
    dp = fsq.parallel.data_parallel(mlp_loss, tx, num_workers=8)
    state = dp.init({"w": jnp.ones((5, 6)), "v": jnp.ones(6)})
    batch = {"x": jnp.ones((8, 4, 5)), "y": jnp.ones((8, 4))}
    text = jax.jit(dp.step).lower(state, batch).compile().as_text()
    # One all-reduce (of a tuple of the row's leaves, which XLA combines).
    (reduce,) = re.findall(r"%?([\w.\-]+) = (?:\([^)]*\)|\S+) all-reduce\(", text)
    parents, entry = ancestors(text, reduce)
    batch_params = set(re.findall(r"%([\w.\-]+) = \S+ parameter\(\d+\).*op_name=\"batch", entry))
    assert len(batch_params) == 2  # x and y
    assert bool(parents & batch_params) is not overlaps


# --- Bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: compression.top_k(0.0), ValueError, "density"),
        (lambda: compression.top_k(1.5), ValueError, "density"),
        (lambda: compression.random_k(-0.1), ValueError, "density"),
        (lambda: compression.quantize(1), ValueError, "bits"),
        (lambda: compression.quantize(17), ValueError, "bits"),
        (
            lambda: fsq.flying_squirrel(fsq.sgd(1.0), num_workers=2, compression="top_k"),
            TypeError,
            "compression",
        ),
        (
            lambda: fsq.flying_squirrel(
                fsq.sgd(1.0), num_workers=2, compression=compression.sign(), exchange="sparse"
            ),
            ValueError,
            "sparse",
        ),
        (
            lambda: fsq.flying_squirrel(fsq.sgd(1.0), num_workers=2, exchange="fast"),
            ValueError,
            "exchange",
        ),
        (
            lambda: fsq.flying_squirrel(
                fsq.sgd(1.0),
                num_workers=2,
                compression=compression.top_k(0.1),
                exchange="sparse",
                aggregation="median",
            ),
            ValueError,
            "mean",
        ),
    ],
)
def test_bad_values_raise(make, error, match):
    with pytest.raises(error, match=match):
        make()


# --- Messages in flight held as pairs -------------------------------------------------------


@pytest.mark.parametrize(
    "operator",
    [compression.top_k(0.2), compression.top_k(0.3, per_leaf=True), compression.random_k(0.3)],
)
@pytest.mark.parametrize(
    "backend, num_devices", [("vmap", None), ("shard_map", 8), ("shard_map", 2)]
)
def test_pairs_hold_the_same_sums_as_rows(operator, backend, num_devices):
    """Held as (position, value) pairs by send step, the sums due are added in the order
    the dense rows add them when the rows are written worker by worker (at most as many
    workers on a device as rows, 4): plain asynchronous SGD gives the same bits. Rows
    that sum more workers by a product, and the defaults' compensation (which XLA fuses
    differently around the sums), round differently."""
    by_rows = backend != "vmap"  # 8 workers on one device: more than the 4 rows
    for extras, exact in ((PLAIN, by_rows), ({}, False)):
        rows, held = (
            run_layout(backend, num_devices, compression=operator, in_flight=hold, **extras)
            for hold in ("rows", "pairs")
        )
        assert isinstance(held.opt_state.in_flight, fsq.transforms.pairs.Pairs)
        assert isinstance(rows.opt_state.in_flight, fsq.transforms.ring.InFlight)
        for got, want in zip(
            jax.tree.leaves(held.params), jax.tree.leaves(rows.params), strict=True
        ):
            if exact:
                np.testing.assert_array_equal(got, want)
            else:
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_pairs_with_a_clock_that_maps_only_the_starting_workers():
    """With a compute model and ``gradient_slots``, only the workers that start a job are
    mapped: the others leave no message in their slot."""

    def run(hold):
        tx = fsq.flying_squirrel(
            fsq.sgd(0.2),
            num_workers=4,
            compute=fsq.timing.fixed([1, 2, 3, 4]),
            axis_name=fsq.parallel.AXIS_NAME,
            compression=compression.top_k(0.2),
            in_flight=hold,
            seed=5,
            **PLAIN,
        )
        dp = fsq.parallel.data_parallel(
            mlp_loss, tx, num_workers=4, backend="vmap", gradient_slots=2
        )
        rng = np.random.default_rng(0)
        state = dp.init({"w": rng.normal(size=(5, 6)) / 2, "v": rng.normal(size=6) / 2})
        for step in range(10):
            data = np.random.default_rng(step)
            state, _ = dp.step(
                state, {"x": data.normal(size=(4, 4, 5)), "y": data.normal(size=(4, 4))}
            )
        return state

    held, rows = run("pairs"), run("rows")
    assert isinstance(held.opt_state.in_flight, fsq.transforms.pairs.Pairs)
    for got, want in zip(jax.tree.leaves(held.params), jax.tree.leaves(rows.params), strict=True):
        np.testing.assert_array_equal(got, want)
    assert int(optax.tree.get(held.opt_state, "delivered")) > 0


def test_pairs_are_held_where_they_take_fewer_bytes():
    """``in_flight="auto"``: pairs for a sparse message well below the dense rows' size."""

    def held(density, num_workers):
        tx = fsq.flying_squirrel(
            fsq.sgd(0.1),
            num_workers=num_workers,
            delay=delays.uniform(4),
            compression=compression.top_k(density),
        )
        init = jax.vmap(tx.init, in_axes=None, axis_size=num_workers, axis_name="workers")
        return type(init({"w": jnp.zeros((40, 50))}).in_flight).__name__

    assert held(0.01, 4) == "Pairs"  # 4 x 20 x (4 + 3 x 4) bytes a row, not 3 x 2000 x 4
    assert held(0.2, 4) == "InFlight"  # 4 x 400 x 16 > 24,000
    with pytest.raises(ValueError, match='hold="pairs"'):
        fsq.flying_squirrel(fsq.sgd(0.1), num_workers=2, delay=2, in_flight="pairs").init(
            jnp.zeros(3)
        )
    with pytest.raises(ValueError, match="hold must be one of"):
        fsq.flying_squirrel(fsq.sgd(0.1), num_workers=2, in_flight="sparse")
