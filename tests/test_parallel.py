"""fsq.parallel: the same run on every layout of workers onto devices."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsq
from fsq import delays

STEPS = 6
DELAY = delays.uniform(4)
SEED = 3


def mlp_loss(params, shard):
    x, y = shard
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] - y) ** 2)


def init_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "w1": jax.random.normal(k1, (3, 4)) * 0.5,
        "b1": jnp.zeros(4),
        "w2": jax.random.normal(k2, (4,)) * 0.5,
    }


def make_data(num_workers):
    rng = np.random.default_rng(num_workers)
    x = rng.normal(size=(num_workers, 5, 3)).astype(np.float32)
    y = rng.normal(size=(num_workers, 5)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def squirrel(num_workers, axis_name, delay=DELAY):
    return fsq.flying_squirrel(
        fsq.adam(0.05), num_workers=num_workers, axis_name=axis_name, delay=delay, seed=SEED
    )


def run_plain_vmap(num_workers, delay=DELAY, steps=STEPS):
    """Reference layout: one jax.vmap over a single axis, written by hand."""
    tx = squirrel(num_workers, "workers", delay)
    data = make_data(num_workers)

    def worker(params, state, shard):
        updates, state = tx.update(jax.grad(mlp_loss)(params, shard), state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(jax.vmap(worker, in_axes=(None, None, 0), out_axes=None, axis_name="workers"))
    params = init_params()
    state = jax.vmap(
        tx.init, in_axes=None, out_axes=None, axis_size=num_workers, axis_name="workers"
    )(params)
    for _ in range(steps):
        params, state = step(params, state, data)
    return params


def run_parallel(num_workers, backend, num_devices=None, delay=DELAY, steps=STEPS):
    tx = squirrel(num_workers, fsq.parallel.AXIS_NAME, delay)
    mesh = None if num_devices is None else fsq.parallel.make_mesh(num_devices)
    dp = fsq.parallel.data_parallel(
        mlp_loss, tx, num_workers=num_workers, backend=backend, mesh=mesh
    )
    state = dp.init(init_params())
    data = make_data(num_workers)
    for _ in range(steps):
        state, losses = dp.step(state, data)
    assert losses.shape == (num_workers,)
    return state


@pytest.mark.parametrize(
    ("num_workers", "backend", "num_devices"),
    [
        (8, "vmap", None),
        (32, "vmap", None),
        (8, "shard_map", 8),
        (32, "shard_map", 8),
        (8, "shard_map", 4),
        (8, "shard_map", 1),  # no collective: the due row is read in place
        (8, "pmap", 8),
        (32, "pmap", 8),
    ],
)
def test_every_layout_gives_the_same_run(num_workers, backend, num_devices):
    want = run_plain_vmap(num_workers)
    assert not np.allclose(want["w2"], init_params()["w2"])
    state = run_parallel(num_workers, backend, num_devices)
    # Summation order differs between layouts: equal up to float reassociation.
    for got, ref in zip(jax.tree.leaves(state.params), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # One ring of max_delay + 1 = 5 rows per device, the devices' rings concatenated.
    ring = state.opt_state.in_flight.slots.channels[0]["w1"]
    assert ring.shape == (5 * (1 if backend == "vmap" else num_devices), 1, 3, 4)


@pytest.mark.parametrize("choices", [(0, 3, 5), (1, 2, 5)], ids=["from-0", "never-0"])
@pytest.mark.parametrize("num_devices", [8, 1])
def test_one_worker_per_device_over_whole_cycles(choices, num_devices):
    # One worker per device adds each part of its message into its row where it is
    # computed. All workers of a step share its delay, so rows stay empty for whole
    # cycles after they were delivered (never 0: the due row is read a step early).
    per_step = np.random.default_rng(5).choice(choices, size=(9, 1))
    delay = delays.trace(np.broadcast_to(per_step, (9, num_devices)))
    want = run_plain_vmap(num_devices, delay, steps=20)
    state = run_parallel(num_devices, "shard_map", num_devices, delay, steps=20)
    for got, ref in zip(jax.tree.leaves(state.params), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_delay_zero_shard_map_equals_single_device_full_batch():
    num_workers = 8
    tx = fsq.flying_squirrel(fsq.momentum(0.1), num_workers=8, axis_name=fsq.parallel.AXIS_NAME)
    dp = fsq.parallel.data_parallel(mlp_loss, tx, num_workers=num_workers)
    state = dp.init(init_params())
    x, y = make_data(num_workers)
    inner = fsq.momentum(0.1)
    params, inner_state = init_params(), inner.init(init_params())
    full = (x.reshape(-1, 3), y.reshape(-1))
    for _ in range(4):
        state, _ = dp.step(state, (x, y))
        updates, inner_state = inner.update(jax.grad(mlp_loss)(params, full), inner_state)
        params = optax.apply_updates(params, updates)
    for got, ref in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def collectives(text):
    """The collectives of a compiled program's HLO text, by kind."""
    return {
        name: len(re.findall(rf"{name.replace('_', '-')}(?:-start)?\(", text))
        for name in ("all_reduce", "all_gather", "all_to_all", "collective_permute")
    }


@pytest.mark.parametrize(("num_workers", "num_devices"), [(8, 8), (32, 8), (8, 1)])
def test_one_collective_per_step_for_the_whole_model(num_workers, num_devices):
    tx = squirrel(num_workers, fsq.parallel.AXIS_NAME)
    mesh = fsq.parallel.make_mesh(num_devices)
    dp = fsq.parallel.data_parallel(mlp_loss, tx, num_workers=num_workers, mesh=mesh)
    state = dp.init(init_params())
    text = dp.step.lower(state, make_data(num_workers)).compile().as_text()
    # Three parameter leaves, yet one all-reduce (XLA combines the row's leaves); gathering
    # local workers costs nothing; over one device there is nothing to reduce.
    assert collectives(text) == {
        "all_reduce": int(num_devices > 1),
        "all_gather": 0,
        "all_to_all": 0,
        "collective_permute": 0,
    }


def test_composes_in_optax_chain():
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        fsq.flying_squirrel(fsq.sgd(0.1), num_workers=8, axis_name=fsq.parallel.AXIS_NAME, delay=2),
    )
    dp = fsq.parallel.data_parallel(mlp_loss, tx, num_workers=8)
    state = dp.init(init_params())
    assert state.opt_state[1].in_flight.filled.shape[0] == 2 * 8  # 2 rows per device
    before = np.asarray(state.params["w2"])  # the step donates (reuses) the state's buffers
    for _ in range(3):
        state, _ = dp.step(state, make_data(8))
    assert int(state.opt_state[1].step) == 3
    assert int(state.opt_state[1].delivered) == 8
    assert int(optax.tree.get(state.opt_state, "delivered")) == 8  # as the README says
    assert not np.allclose(state.params["w2"], before)


@pytest.mark.parametrize("backend", ["vmap", "shard_map"])
def test_a_loss_with_metrics_is_refused_with_the_fix(backend):
    """``(loss, metrics)`` would fail deep in JAX's grad ("Gradient only defined for
    scalar-output functions"): the step names what to return instead."""
    tx = squirrel(8, fsq.parallel.AXIS_NAME)
    dp = fsq.parallel.data_parallel(
        lambda p, b: (mlp_loss(p, b), {"accuracy": 0.0}), tx, num_workers=8, backend=backend
    )
    with pytest.raises(TypeError, match="loss_fn must return one scalar loss"):
        dp.step(dp.init(init_params()), make_data(8))


def test_a_batch_without_its_worker_axis_suggests_the_layout():
    """8 examples of 3 features, no worker axis: its leading size happens to be W, so
    each worker gets one example and the model fails on its shape; the error says why."""

    def batched_loss(params, shard):  # a model that wants [examples, features]
        x, y = shard
        hidden = jnp.tanh(jnp.einsum("bi,ih->bh", x, params["w1"]) + params["b1"])
        return jnp.mean((hidden @ params["w2"] - y) ** 2)

    tx = squirrel(8, fsq.parallel.AXIS_NAME)
    dp = fsq.parallel.data_parallel(batched_loss, tx, num_workers=8, backend="vmap")
    x, y = make_data(8)
    dp.step(dp.init(init_params()), (x, y))  # with the worker axis: trains
    with pytest.raises(ValueError, match=r"lacks its worker axis.*\[num_workers, examples per"):
        dp.step(dp.init(init_params()), (x[:, 0], y[:, 0]))


def test_workers_must_divide_evenly_over_devices():
    tx = squirrel(12, fsq.parallel.AXIS_NAME)
    with pytest.raises(ValueError, match="num_workers=12 must be a multiple"):
        fsq.parallel.data_parallel(mlp_loss, tx, num_workers=12)


def test_bad_arguments_raise():
    tx = squirrel(8, fsq.parallel.AXIS_NAME)
    with pytest.raises(ValueError, match="backend"):
        fsq.parallel.data_parallel(mlp_loss, tx, num_workers=8, backend="threads")
    with pytest.raises(ValueError, match="num_devices"):
        fsq.parallel.make_mesh(9)
    dp = fsq.parallel.data_parallel(mlp_loss, tx, num_workers=8)
    with pytest.raises(ValueError, match="leading axis of num_workers=8"):
        x, y = make_data(4)
        dp.step(dp.init(init_params()), (x, y))


def test_transform_built_for_another_axis_is_told_what_to_use():
    tx = squirrel(8, "workers")  # the default axis name, but fsq.parallel nests two axes
    dp = fsq.parallel.data_parallel(mlp_loss, tx, num_workers=8)
    with pytest.raises(ValueError, match="fsq.parallel.AXIS_NAME"):
        dp.step(dp.init(init_params()), make_data(8))


def test_make_mesh_uses_all_devices_by_default():
    mesh = fsq.parallel.make_mesh()
    assert mesh.axis_names == (fsq.parallel.DEVICE_AXIS,)
    assert mesh.devices.size == jax.device_count() == 8


COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kwargs: COMPILES.append(event) if "backend_compile" in event else None
)


@pytest.mark.parametrize("backend", ["shard_map", "pmap", "vmap"])
@pytest.mark.parametrize(
    "extras",
    [{}, {"compression": fsq.compression.top_k(0.3), "worker_momentum": 0.5}, {"delay": 0}],
    ids=["defaults", "per-worker-state", "no-delay"],
)
def test_the_step_compiles_once(backend, extras):
    """``init`` gives the state the shardings the step returns it with (empty buffers and
    one-device meshes included), so the second step reuses the first one's program."""
    tx = fsq.flying_squirrel(
        fsq.adam(0.1), num_workers=8, axis_name=fsq.parallel.AXIS_NAME, **{"delay": 3, **extras}
    )
    dp = fsq.parallel.data_parallel(mlp_loss, tx, num_workers=8, backend=backend)
    state, _ = dp.step(dp.init(init_params()), make_data(8))
    before = len(COMPILES)
    for _ in range(3):
        state, _ = dp.step(state, make_data(8))
    assert len(COMPILES) == before


def test_multisteps_around_the_transform_names_the_fix():
    tx = optax.MultiSteps(squirrel(8, fsq.parallel.AXIS_NAME), every_k_schedule=2)
    dp = fsq.parallel.data_parallel(mlp_loss, tx, num_workers=8)
    with pytest.raises(ValueError, match=r"MultiSteps.*fsq.accumulate\(inner, k\)"):
        dp.step(dp.init(init_params()), make_data(8))
