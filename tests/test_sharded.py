"""Models larger than one device: a worker group is a slice of the mesh, the model sharded
over its model axes; the run equals the replicated one, every per-parameter buffer is
sharded like its parameter, and bad layouts are named."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import fsq

W = 8
STEPS = 6
AXIS = fsq.parallel.AXIS_NAME
U = fsq.delays.uniform


def init_params():
    """Leaves of distinct shapes, each dimension divisible by 8 but the output's."""
    rng = np.random.default_rng(0)
    return {
        "w1": jnp.asarray(rng.normal(size=(16, 32)) * 0.4, jnp.float32),
        "b1": jnp.full(32, 0.1, jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(32, 3)) * 0.4, jnp.float32),
    }


def loss(params, batch):
    x, y = batch
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] - y) ** 2)


def batch(step):
    rng = np.random.default_rng(step)
    return (
        rng.normal(size=(W, 4, 16)).astype(np.float32),
        rng.normal(size=(W, 4, 3)).astype(np.float32),
    )


def flying(**options):
    return fsq.flying_squirrel(fsq.adam(0.02), num_workers=W, axis_name=AXIS, seed=4, **options)


FEATURES = {
    "defaults, uniform delays": lambda: flying(delay=U(4)),
    "top-k per leaf with error feedback": lambda: flying(
        delay=U(3), compression=fsq.compression.top_k(0.25, per_leaf=True)
    ),
    # 97 pairs a message: 4 shards hold 25 each, the last three padding.
    "top-k held as pairs, a count the shards do not divide": lambda: flying(
        delay=U(3), compression=fsq.compression.top_k(0.15, per_leaf=True), in_flight="pairs"
    ),
    "median": lambda: flying(delay=U(2), aggregation="median", compensation=None),
    "crashes and drops": lambda: flying(
        delay=U(3), faults=[fsq.faults.drops(0.25), fsq.faults.crash([5], at=2)]
    ),
    "compute model, synchronous": lambda: flying(
        compute=fsq.timing.fixed([1, 2, 1, 3, 1, 1, 2, 1]), policy="synchronous"
    ),
    "compute model, asynchronous": lambda: flying(
        compute=fsq.timing.fixed([1, 2, 1, 3, 1, 1, 2, 1]), policy="asynchronous"
    ),
    "DiLoCo, H = 4": lambda: fsq.diloco(
        optax.adamw(0.02), num_workers=W, steps=4, axis_name=AXIS, seed=4
    ),
    "worker momentum": lambda: flying(delay=U(2), worker_momentum=0.5),
    "bfloat16 in flight": lambda: flying(delay=U(2), in_flight_dtype=jnp.bfloat16),
}


def run(make_tx, model_axes=None, steps=STEPS):
    mesh = fsq.parallel.make_mesh(8, model_axes=model_axes)
    dp = fsq.parallel.data_parallel(loss, make_tx(), num_workers=W, mesh=mesh)
    state = dp.init(init_params())
    for t in range(steps):
        state, _ = dp.step(state, batch(t))
    return dp, state


@pytest.fixture(scope="module")
def replicated():
    return {}


def reference(name, replicated):
    if name not in replicated:
        replicated[name] = run(FEATURES[name])[1]
    return replicated[name]


def padded(spec, ndim):
    return tuple(spec) + (None,) * (ndim - len(spec))


def assert_sharded_like_the_params(state, specs):
    """Every leaf of the optimizer state that ends with a parameter's shape (the longest
    such) carries that parameter's spec on those dimensions; every other leaf is small
    bookkeeping, or divided among all 8 devices (sparse messages held as pairs)."""
    shapes = [np.shape(p) for p in jax.tree.leaves(init_params())]
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        ends = [i for i, s in enumerate(shapes) if s and leaf.shape[-len(s) :] == s]
        if not leaf.size:  # empty (a ring without delays): XLA replicates it
            continue
        if not ends:
            share = leaf.addressable_shards[0].data.size
            assert leaf.size <= 64 * W or share * 8 == leaf.size, (
                jax.tree_util.keystr(path),
                leaf.shape,
                leaf.sharding.spec,
            )
            continue
        i = max(ends, key=lambda i: len(shapes[i]))
        got = padded(leaf.sharding.spec, leaf.ndim)[leaf.ndim - len(shapes[i]) :]
        assert got == padded(specs[i], len(shapes[i])), (jax.tree_util.keystr(path), got)


@pytest.mark.parametrize(
    "name, model_axes",
    [
        ("defaults, uniform delays", {"fsdp": 2}),
        ("defaults, uniform delays", {"fsdp": 4}),
        ("defaults, uniform delays", {"fsdp": 2, "tensor": 2}),
        ("top-k per leaf with error feedback", {"fsdp": 2}),
        ("top-k held as pairs, a count the shards do not divide", {"fsdp": 4}),
        ("median", {"fsdp": 4}),
        ("crashes and drops", {"fsdp": 2}),
        ("compute model, synchronous", {"fsdp": 4}),
        ("compute model, asynchronous", {"fsdp": 2}),
        ("DiLoCo, H = 4", {"fsdp": 4}),
        ("worker momentum", {"fsdp": 2}),
        ("bfloat16 in flight", {"fsdp": 4}),
    ],
)
def test_a_sharded_run_equals_the_replicated_run(name, model_axes, replicated):
    want = reference(name, replicated)
    dp, got = run(FEATURES[name], model_axes)
    assert not np.allclose(want.params["w1"], init_params()["w1"])  # the run moves
    # Float32 rounding; a bfloat16 buffer rounds each stored sum to 2^-8, so a float32
    # difference can move a stored sum by one bfloat16 step.
    rtol = 2e-2 if "bfloat16" in name else 2e-5
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol / 10)
    for metric in ("delivered", "staleness", "lost", "bytes_sent"):
        np.testing.assert_array_equal(
            optax.tree.get(got.opt_state, metric), optax.tree.get(want.opt_state, metric)
        )
    specs = fsq.parallel.fsdp(init_params(), dp.mesh)
    assert any(len(s) for s in jax.tree.leaves(specs))  # something is sharded
    for leaf, spec in zip(jax.tree.leaves(got.params), jax.tree.leaves(specs), strict=True):
        assert padded(leaf.sharding.spec, leaf.ndim) == padded(spec, leaf.ndim)
    assert_sharded_like_the_params(got, jax.tree.leaves(specs))


def test_checkpoint_resumes_a_sharded_run_bitwise(tmp_path):
    make = FEATURES["defaults, uniform delays"]
    _, whole = run(make, {"fsdp": 2})
    _, half = run(make, {"fsdp": 2}, steps=3)
    fsq.checkpoint.save(tmp_path, 3, half)
    # A fresh process's view: a new step, its state restored into a fresh init's layout.
    mesh = fsq.parallel.make_mesh(8, model_axes={"fsdp": 2})
    dp = fsq.parallel.data_parallel(loss, make(), num_workers=W, mesh=mesh)
    state = fsq.checkpoint.restore(tmp_path, dp.init(init_params()))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(half), strict=True):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(a, b)
    for t in range(3, STEPS):
        state, _ = dp.step(state, batch(t))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(whole), strict=True):
        np.testing.assert_array_equal(a, b)


def test_tensor_parallel_specs_given_by_hand(replicated):
    """Any spec over the model axes: the hidden layer split over "tensor" (columns of w1
    and b1, rows of w2), as tensor parallelism lays out an MLP."""
    specs = {"w1": P(None, "tensor"), "b1": P("tensor"), "w2": P("tensor", None)}
    mesh = fsq.parallel.make_mesh(8, model_axes={"tensor": 4})
    make = FEATURES["defaults, uniform delays"]
    dp = fsq.parallel.data_parallel(loss, make(), num_workers=W, mesh=mesh, param_specs=specs)
    state = dp.init(init_params())
    for t in range(STEPS):
        state, _ = dp.step(state, batch(t))
    want = reference("defaults, uniform delays", replicated)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    assert_sharded_like_the_params(state, [specs[k] for k in sorted(specs)])
    evaluate = fsq.parallel.evaluator(
        lambda p, b: {"loss": jax.vmap(lambda x, y: loss(p, (x[None], y[None])))(*b)},
        mesh=mesh,
    )
    examples = tuple(x.reshape(-1, x.shape[-1])[:11] for x in batch(9))
    got = evaluate(state.params, examples)["loss"]
    np.testing.assert_allclose(got, loss(jax.device_get(state.params), examples), rtol=1e-5)


def test_an_nnx_model_keeps_its_annotated_sharding():
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            split = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "fsdp"))
            self.hidden = nnx.Linear(16, 32, kernel_init=split, rngs=rngs)
            self.out = nnx.Linear(32, 3, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.hidden(x)))

    def mse(model, batch):
        return jnp.mean((model(batch[0]) - batch[1]) ** 2)

    losses = {}
    for model_axes in ({"fsdp": 1}, {"fsdp": 4}):  # replicated: the fsdp axis of size 1
        mesh = fsq.parallel.make_mesh(8, model_axes=model_axes)
        with jax.set_mesh(mesh):
            model = MLP(nnx.Rngs(0))
        trainer = fsq.nnx.DataParallel(model, flying(delay=U(2)), mse, num_workers=W, mesh=mesh)
        for t in range(3):
            losses[str(model_axes)] = trainer.step(batch(t))
        kernel = model.hidden.kernel[...]
        assert kernel.addressable_shards[0].data.shape == (16, 32 // model_axes["fsdp"])
    np.testing.assert_allclose(losses[str({"fsdp": 1})], losses[str({"fsdp": 4})], rtol=1e-5)


def test_vmap_workers_under_a_users_jit_with_sharded_parameters():
    """The transform alone, stepped by a user's own jitted loop (GSPMD, no fsq.parallel),
    its state sharded like the parameters: the same updates as unsharded."""
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    workers = fsq.parallel.vmap_workers(
        fsq.flying_squirrel(fsq.adam(0.02), num_workers=4, delay=U(2), seed=1), num_workers=4
    )
    params = init_params()
    specs = fsq.parallel.fsdp(params, fsq.parallel.make_mesh(8, model_axes={"fsdp": 8}))
    sharded = jax.device_put(
        params, jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs)
    )
    grads = jax.tree.map(lambda p: jnp.stack([p * (i + 1) for i in range(4)]), params)

    def steps(params, grads):
        state = workers.init(params)
        for _ in range(3):
            updates, state = workers.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params

    want = jax.jit(steps)(params, grads)
    got = jax.jit(steps)(sharded, grads)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize(
    "build, error, match",
    [
        (
            lambda: fsq.parallel.data_parallel(
                loss,
                flying(),
                num_workers=W,
                mesh=jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,)),
            ),
            ValueError,
            "mesh must have the worker axis 'devices'",
        ),
        (
            lambda: fsq.parallel.data_parallel(
                loss,
                flying(),
                num_workers=W,
                backend="pmap",
                mesh=fsq.parallel.make_mesh(8, model_axes={"fsdp": 2}),
            ),
            ValueError,
            "backend='shard_map'",
        ),
        (lambda: fsq.parallel.make_mesh(8, model_axes={"fsdp": 3}), ValueError, "divide"),
        (lambda: fsq.parallel.make_mesh(8, model_axes={"devices": 2}), ValueError, "model_axes"),
    ],
)
def test_bad_layouts_are_named_when_built(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    "specs, options, match",
    [
        (
            {"w1": P("devices", None), "b1": P(), "w2": P()},
            {},
            "must not be sharded over the worker axis",
        ),
        ({"w1": P(), "b1": P(), "w2": P(None, "fsdp")}, {}, "does not divide its dimension 1"),
        ({"w1": P(), "b1": P("model"), "w2": P()}, {}, r"names \['model'\]"),
        ({"w1": P(None, None, "fsdp"), "b1": P(), "w2": P()}, {}, "more entries"),
        ({"w1": P(), "b1": P()}, {}, "structure of the params"),
        (None, {"compression": fsq.compression.top_k(0.1)}, "per_leaf=True"),
        (None, {"compression": fsq.compression.random_k(0.1)}, "compression="),
    ],
)
def test_bad_shardings_are_named_at_init(specs, options, match):
    mesh = fsq.parallel.make_mesh(8, model_axes={"fsdp": 4})
    dp = fsq.parallel.data_parallel(
        loss, flying(delay=2, **options), num_workers=W, mesh=mesh, param_specs=specs
    )
    with pytest.raises(ValueError, match=match):
        dp.init(init_params())


# --- Memory ------------------------------------------------------------------------------


def memory_features(name):
    import benchmarks.memory as memory

    return next(f for f in memory.feature_sets(fsq, jnp, optax) if f.name == name)


def per_device(tree):
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "name",
    [
        "uniform(16), defaults",
        "uniform(16), top-k 1% + EF, pairs",
        "uniform(16), median",
        "DiLoCo, H = 50 (AdamW inner)",
    ],
)
def test_the_state_per_device_is_the_documented_formula_over_the_shards(name):
    """8 workers on 8 devices in groups of S, S in {1, 2, 4, 8}: the bytes of state one
    device holds, from its shards, against benchmarks.memory's formula (docs)."""
    import benchmarks.memory as memory
    from benchmarks import mlp

    features = memory_features(name)
    params = mlp.init((64, 128, 128, 16))  # every dimension divisible by 8
    num_params = mlp.num_params(params)
    kept = memory.kept_entries(features, params, fsq)
    for shards in (1, 2, 4, 8):
        mesh = fsq.parallel.make_mesh(8, model_axes={"fsdp": shards})
        dp = fsq.parallel.data_parallel(
            mlp.loss, features.make(fsq.adam(1e-3), W), num_workers=W, mesh=mesh
        )
        held = per_device(dp.init(params))
        want = memory.formula(features, num_params, shards, W // (8 // shards), W, kept)
        assert abs(held / want - 1) < 0.05, (shards, held, want)


def test_a_bfloat16_ring_halves_the_ring_and_pairs_take_a_tenth_of_the_rows():
    from benchmarks import mlp

    params = mlp.init((64, 128, 128, 16))

    def ring(mesh, **options):
        tx = fsq.flying_squirrel(
            fsq.adam(1e-3), num_workers=W, axis_name=AXIS, delay=U(16), **options
        )
        dp = fsq.parallel.data_parallel(mlp.loss, tx, num_workers=W, mesh=mesh)
        return per_device(dp.init(params).opt_state.in_flight)

    # 4 workers a group: of one device each, and of 4 model shards each.
    for mesh in fsq.parallel.make_mesh(2), fsq.parallel.make_mesh(8, model_axes={"fsdp": 4}):
        float32, bfloat16 = ring(mesh), ring(mesh, in_flight_dtype=jnp.bfloat16)
        assert 0.5 <= bfloat16 / float32 < 0.501  # the totals and marks stay as they are
        top_k = fsq.compression.top_k(0.01, per_leaf=True)
        plain = {"compression": top_k, "staleness": None, "compensation": None}
        rows = ring(mesh, in_flight="rows", **plain)
        held = ring(mesh, **plain)  # auto: pairs
        assert held / rows <= 0.10, (mesh.shape, held / rows)
