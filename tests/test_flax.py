"""The Flax training loop: NNX trainer, aux outputs, per-worker keys, model state,
evaluation, per-step metrics and their writer. Every check is against a hand-written
single-device loop, a numpy simulation or a recomputation, not the trainer itself."""

import csv
import os
import pathlib
import struct
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training.train_state import TrainState
from tensorboardX.proto import event_pb2

import fsq
from tests import reference

W, SEED, LR = 8, 3, 0.01
AXIS = fsq.parallel.AXIS_NAME


class CNN(nnx.Module):
    """A convolution, BatchNorm, ReLU, dropout and a linear read-out."""

    def __init__(self, rngs: nnx.Rngs):
        # No bias before BatchNorm: its gradient is rounding noise, which Adam would amplify.
        self.conv = nnx.Conv(1, 4, kernel_size=(3, 3), use_bias=False, rngs=rngs)
        self.norm = nnx.BatchNorm(4, momentum=0.8, rngs=rngs)
        self.dropout = nnx.Dropout(0.3, rngs=rngs)
        self.out = nnx.Linear(6 * 6 * 4, 3, rngs=rngs)

    def __call__(self, x):
        h = self.dropout(nnx.relu(self.norm(self.conv(x))))
        return self.out(h.reshape(h.shape[0], -1))


def cnn():
    return CNN(nnx.Rngs(params=0, dropout=1))


def cross_entropy(model, batch):
    logits = model(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def images(step, n=6):
    rng = np.random.default_rng(step)
    x = rng.normal(size=(W, n, 6, 6, 1)).astype(np.float32)
    return {"x": x, "y": rng.integers(0, 3, (W, n))}


def worker_key(step, worker, stream):
    """The documented key of a worker's stream, written out."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(SEED), step), worker)
    return jax.random.fold_in(key, zlib.crc32(stream.encode()))


def reference_loop(steps):
    """Synchronous training on one device, worker by worker: each worker's copy reseeded
    with its key, its gradient and its batch statistics; their means applied by Adam."""
    model, opt = cnn(), optax.adam(LR)
    params = nnx.state(model, nnx.Param)
    opt_state = opt.init(params)
    for t in range(steps):
        batch = images(t)
        grads, stats = [], []
        for i in range(W):
            copy = nnx.clone(model)
            copy.train()
            nnx.reseed(copy, dropout=worker_key(t, i, "dropout"))
            shard = jax.tree.map(lambda x, i=i: x[i], batch)
            grads.append(nnx.grad(cross_entropy)(copy, shard))
            stats.append(nnx.state(copy, nnx.BatchStat))
        mean = lambda trees: jax.tree.map(lambda *x: sum(x) / len(x), *trees)  # noqa: E731
        updates, opt_state = opt.update(mean(grads), opt_state, params)
        params = optax.apply_updates(params, updates)
        nnx.update(model, params, mean(stats))
    return model


@pytest.mark.parametrize("backend", ["vmap", "shard_map"])
def test_nnx_trainer_with_dropout_and_batchnorm_equals_a_single_device_loop(backend):
    model = cnn()
    tx = fsq.flying_squirrel(fsq.adam(LR), num_workers=W, delay=0, axis_name=AXIS)
    trainer = fsq.nnx.DataParallel(
        model, tx, cross_entropy, num_workers=W, backend=backend, seed=SEED
    )
    assert trainer.data_parallel.mesh.devices.size == (1 if backend == "vmap" else 8)
    for t in range(3):
        losses = trainer.step(images(t))
        assert losses.shape == (W,)
    want = reference_loop(3)
    for kind in (nnx.Param, nnx.BatchStat):  # the user's module itself was updated
        got, expected = nnx.state(model, kind), nnx.state(want, kind)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, expected
        )
    # The statistics moved, and dropout drew a mask per worker (not one for all).
    assert not np.allclose(model.norm.mean[...], 0)
    first = cnn()
    first.train()
    shard = jax.tree.map(lambda x: x[0], images(0))
    nnx.reseed(first, dropout=worker_key(0, 1, "dropout"))
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(
            nnx.grad(cross_entropy)(nnx.clone(first), shard)["out"]["kernel"][...],
            nnx.grad(cross_entropy)(reseeded(cnn(), 0, 0), shard)["out"]["kernel"][...],
        )


def reseeded(model, step, worker):
    model.train()
    nnx.reseed(model, dropout=worker_key(step, worker, "dropout"))
    return model


def nnx_optimizer_steps(model, tx, loss, batch, steps):
    """The one-device NNX idiom: an nnx.Optimizer stepped inside nnx.vmap over the workers."""
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        def worker(model, optimizer, shard):
            optimizer.update(model, nnx.grad(loss)(model, shard))

        axes = dict(in_axes=(None, None, 0), out_axes=None, axis_name="workers")
        nnx.vmap(worker, **axes)(model, optimizer, batch)

    for _ in range(steps):
        step(model, optimizer, batch)
        yield


def trainer_steps(model, tx, loss, batch, steps):
    trainer = fsq.nnx.DataParallel(model, tx, loss, num_workers=W)
    for _ in range(steps):
        trainer.step(batch)
        yield


def train_state_steps(model, tx, loss, batch, steps):
    """Flax's TrainState (the Linen idiom) under jax.vmap over the workers."""
    graphdef, params = nnx.split(model)
    state = TrainState.create(apply_fn=None, params=params, tx=tx)

    @jax.jit
    def step(state, batch):
        def worker(shard):
            grads = jax.grad(lambda p: loss(nnx.merge(graphdef, p), shard))(state.params)
            return state.apply_gradients(grads=grads)

        return jax.vmap(worker, axis_name="workers", out_axes=None)(batch)

    for _ in range(steps):
        state = step(state, batch)
        nnx.update(model, state.params)
        yield


@pytest.mark.parametrize("loop", [trainer_steps, nnx_optimizer_steps, train_state_steps])
def test_with_delays_matches_the_event_simulation(loop):
    dim, steps, lr = 4, 12, 0.1
    rng = np.random.default_rng(0)
    x = rng.normal(size=(W, 5, dim)).astype(np.float32)
    y = rng.normal(size=(W, 5, 1)).astype(np.float32)
    table = rng.integers(0, 4, (5, W))
    model = nnx.Linear(dim, 1, use_bias=False, rngs=nnx.Rngs(0))
    nnx.update(model, {"kernel": jnp.zeros((dim, 1))})
    axis = AXIS if loop is trainer_steps else "workers"
    tx = fsq.flying_squirrel(
        fsq.sgd(lr),
        num_workers=W,
        delay=fsq.delays.trace(table),
        staleness=None,
        compensation=None,
        axis_name=axis,
    )
    loss = lambda m, b: 0.5 * jnp.mean((m(b["x"]) - b["y"]) ** 2)  # noqa: E731
    path = [
        np.asarray(model.kernel[...])[:, 0] for _ in loop(model, tx, loss, {"x": x, "y": y}, steps)
    ]

    def grad(i, w):
        return x[i].T @ (x[i] @ w - y[i, :, 0]) / len(x[i])

    want, *_ = reference.simulate(grad, num_workers=W, steps=steps, lr=lr, dim=dim, table=table)
    np.testing.assert_allclose(np.stack(path), want, rtol=1e-5, atol=1e-6)


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(6, 8, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def mlp_batch(step):
    rng = np.random.default_rng(step)
    return {
        "x": rng.normal(size=(W, 5, 6)).astype(np.float32),
        "y": rng.integers(0, 3, (W, 5)),
    }


def with_metrics(model, batch):
    logits = model(batch["x"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    correct = jnp.argmax(logits, -1) == batch["y"]
    return loss, {"accuracy": correct.mean(), "correct": correct.sum()}


def test_aux_outputs_are_each_workers_recomputed_values():
    model = MLP(nnx.Rngs(0))
    tx = fsq.flying_squirrel(fsq.sgd(0.5), num_workers=W, delay=2, axis_name=AXIS)
    trainer = fsq.nnx.DataParallel(model, tx, with_metrics, num_workers=W, has_aux=True)
    for t in range(3):
        before = nnx.clone(model)
        batch = mlp_batch(t)
        losses, aux = trainer.step(batch)
        assert aux["accuracy"].shape == (W,) and aux["correct"].dtype == jnp.int32
        for i in range(W):
            loss, want = with_metrics(before, jax.tree.map(lambda x, i=i: x[i], batch))
            np.testing.assert_allclose(losses[i], loss, rtol=1e-6)
            np.testing.assert_allclose(aux["accuracy"][i], want["accuracy"])
            assert int(aux["correct"][i]) == int(want["correct"])
    assert not np.allclose(nnx.state(before, nnx.Param)["out"]["kernel"][...], 0)


def test_idle_workers_report_nan_aux_and_model_state_averages_the_active_ones():
    """A clock keeps worker 1 busy every other step (2 ticks per job), worker 3 for 3:
    their aux reads NaN (0 for integers) while busy, and the model state is the mean of
    the workers that computed, by hand."""
    ticks = [1, 2, 1, 3]
    tx = fsq.flying_squirrel(
        fsq.sgd(0.1), num_workers=4, compute=fsq.timing.fixed(ticks), axis_name=AXIS
    )

    def loss_fn(w, batch, *, model_state):
        new_state = {"mean": jnp.mean(batch), "count": model_state["count"] + 1}
        return jnp.sum((w - batch) ** 2), ({"seen": jnp.sum(batch), "n": 1}, new_state)

    dp = fsq.parallel.data_parallel(
        loss_fn,
        tx,
        num_workers=4,
        backend="shard_map",
        mesh=fsq.parallel.make_mesh(2),
        has_aux=True,
    )
    state = dp.init(jnp.zeros(2), {"mean": jnp.float32(0), "count": jnp.int32(0)})
    free_at = np.zeros(4, int)
    for t in range(6):
        batch = np.arange(8, dtype=np.float32).reshape(4, 2) + t
        state, (losses, aux) = dp.step(state, batch)
        active = free_at <= t
        free_at = np.where(active, t + np.array(ticks), free_at)
        np.testing.assert_array_equal(np.isnan(losses), ~active)
        np.testing.assert_array_equal(np.isnan(aux["seen"]), ~active)
        np.testing.assert_array_equal(aux["n"], active.astype(int))
        np.testing.assert_allclose(state.model_state["mean"], batch.mean(1)[active].mean())
        assert int(state.model_state["count"]) == t + 1  # averaged ints stay whole
    assert int(state.step) == 6


@pytest.mark.parametrize("backend, devices", [("vmap", 1), ("shard_map", 8), ("shard_map", 2)])
def test_worker_keys_are_a_function_of_seed_step_and_logical_worker(backend, devices):
    tx = fsq.flying_squirrel(fsq.sgd(0.1), num_workers=W, axis_name=AXIS)

    def loss_fn(w, batch, *, key):
        return jnp.sum(w * batch), jax.random.key_data(key)

    dp = fsq.parallel.data_parallel(
        loss_fn,
        tx,
        num_workers=W,
        backend=backend,
        mesh=fsq.parallel.make_mesh(devices),
        has_aux=True,
        seed=SEED,
    )
    state = dp.init(jnp.zeros(2))
    for t in range(2):
        state, (_, keys) = dp.step(state, np.ones((W, 2), np.float32))
        for i in range(W):
            want = jax.random.fold_in(jax.random.fold_in(jax.random.key(SEED), t), i)
            np.testing.assert_array_equal(keys[i], jax.random.key_data(want))


def test_evaluation_equals_one_device_with_an_uneven_last_batch():
    model = cnn()
    tx = fsq.flying_squirrel(fsq.sgd(0.1), num_workers=W, axis_name=AXIS)
    trainer = fsq.nnx.DataParallel(model, tx, cross_entropy, num_workers=W, seed=SEED)
    trainer.step(images(0))  # statistics that are not the initial ones

    def per_example(model, batch):
        logits = model(batch["x"])
        return {
            "loss": optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]),
            "accuracy": (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32),
        }

    data = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), images(7, n=5))
    eval_model = nnx.clone(model)
    eval_model.eval()
    for size in (40, 13, 1):  # 13 and 1 do not divide into 8 devices
        batch = jax.tree.map(lambda x, size=size: x[:size], data)
        got = trainer.evaluate(per_example, batch)
        want = per_example(eval_model, batch)
        for name in ("loss", "accuracy"):
            np.testing.assert_allclose(got[name], np.mean(want[name]), rtol=1e-5)
    # Evaluation mode: the running statistics, not the batch's.
    train_model = nnx.clone(model)
    train_model.train()
    batch = jax.tree.map(lambda x: x[:13], data)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(
            trainer.evaluate(per_example, batch)["loss"],
            np.mean(per_example(nnx.clone(train_model), batch)["loss"]),
            rtol=1e-5,
        )


def read_events(logdir):
    """Scalars of the TensorBoard event files, read as TFRecords by hand."""
    scalars = {}
    for name in sorted(os.listdir(logdir)):
        if not name.startswith("events.out.tfevents"):
            continue
        data = pathlib.Path(logdir, name).read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            record = data[offset + 12 : offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_metrics_are_written_to_tensorboard_and_csv(tmp_path):
    tx = fsq.flying_squirrel(
        fsq.sgd(0.1),
        num_workers=W,
        delay=fsq.delays.trace([[0, 1, 2, 3, 0, 1, 2, 3]]),
        axis_name=AXIS,
    )
    dp = fsq.parallel.data_parallel(
        lambda w, x: jnp.sum((w - x) ** 2), tx, num_workers=W, backend="vmap"
    )
    state = dp.init(jnp.zeros(3))
    written = []
    with fsq.MetricWriter(tmp_path) as writer:
        for t in range(5):
            state, losses = dp.step(state, np.ones((W, 3), np.float32))
            metrics = {**fsq.step_metrics(state.opt_state), "loss": losses.mean()}
            writer.write(t, metrics)
            written.append({k: float(v) for k, v in metrics.items()})
    # delays 0..3, two workers each: at step t, the gradients sent at t - d for d <= t.
    for t, row in enumerate(written):
        assert row["delivered"] == 2 * min(t + 1, 4)
        ages = [d for d in range(4) if d <= t]
        assert row["staleness"] == pytest.approx(np.mean(ages))
        assert row["bytes_sent"] == 12 * 3  # the gradient and DC's two channels, float32
    events = read_events(tmp_path)
    assert set(events) == set(written[0])
    for name, values in events.items():
        assert [s for s, _ in values] == list(range(5))
        np.testing.assert_allclose([v for _, v in values], [r[name] for r in written], rtol=1e-6)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(5))
    for row, want in zip(rows, written, strict=True):
        for name, value in want.items():
            assert float(row[name]) == pytest.approx(value, rel=1e-7)


def test_step_metrics_add_up_the_assemblies_of_a_multi_transform():
    def half(delay):
        return fsq.flying_squirrel(
            fsq.sgd(0.1), num_workers=2, delay=delay, compensation=None, axis_name="workers"
        )

    params = {"a": jnp.zeros(2), "b": jnp.zeros(5)}
    # "a": both workers 1 step late; "b": worker 0 on time, worker 1 two steps late.
    tx = optax.multi_transform(
        {"a": half(1), "b": half(fsq.delays.trace([[0, 2]]))}, {"a": "a", "b": "b"}
    )
    workers = fsq.parallel.vmap_workers(tx, num_workers=2)
    state = workers.init(params)
    grads = jax.tree.map(lambda x: jnp.ones((2,) + x.shape), params)
    # By hand: (delivered, mean staleness over both assemblies) at steps 0, 1, 2.
    for want in [(1, 0.0), (2 + 1, (2 * 1 + 0) / 3), (2 + 2, (2 * 1 + 0 + 2) / 4)]:
        _, state = workers.update(grads, state, params)
        metrics = fsq.step_metrics(state)
        assert int(metrics["delivered"]) == want[0]
        assert float(metrics["staleness"]) == pytest.approx(want[1])
        assert float(metrics["bytes_sent"]) == 4 * (2 + 5)


def test_checkpoint_of_an_nnx_trainer_in_a_chain_resumes_bitwise(tmp_path):
    def trainer_of(model):
        tx = optax.chain(
            optax.clip_by_global_norm(1.0),
            fsq.flying_squirrel(fsq.adam(LR), num_workers=W, delay=3, axis_name=AXIS),
        )
        return fsq.nnx.DataParallel(model, tx, cross_entropy, num_workers=W, seed=SEED)

    straight = trainer_of(cnn())
    for t in range(4):
        straight.step(images(t))
    resumed = trainer_of(cnn())
    for t in range(2):
        resumed.step(images(t))
    fsq.checkpoint.save(tmp_path, 2, resumed.state)
    fresh = trainer_of(cnn())
    fresh.state = fsq.checkpoint.restore(tmp_path, fresh.state)
    assert int(fresh.state.step) == 2
    # The model itself holds the restored values at once, before any step.
    for kind in (nnx.Param, nnx.BatchStat):
        jax.tree.map(
            np.testing.assert_array_equal,
            nnx.state(fresh.model, kind),
            nnx.state(resumed.model, kind),
        )
    for t in range(2, 4):
        fresh.step(images(t))
    for kind in (nnx.Param, nnx.BatchStat):
        jax.tree.map(
            np.testing.assert_array_equal,
            nnx.state(fresh.model, kind),
            nnx.state(straight.model, kind),
        )


def test_nnx_optimizer_fails_when_built_where_it_cannot_work_and_names_the_trainer():
    # Worker momentum is each worker's own state, which one nnx.Optimizer cannot hold.
    tx = fsq.flying_squirrel(fsq.adam(LR), num_workers=W, worker_momentum=0.9)
    with pytest.raises(ValueError, match=r"fsq\.nnx\.DataParallel"):
        nnx.Optimizer(MLP(nnx.Rngs(0)), tx, wrt=nnx.Param)
    # Without per-worker state it builds; stepped outside nnx.vmap, the error says so.
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, fsq.flying_squirrel(fsq.adam(LR), num_workers=W), wrt=nnx.Param
    )
    grads = nnx.grad(lambda m: with_metrics(m, jax.tree.map(lambda x: x[0], mlp_batch(0)))[0])(
        model
    )
    with pytest.raises(ValueError, match=r"not bound.*fsq\.nnx\.DataParallel.*nnx\.vmap"):
        optimizer.update(model, grads)


@pytest.mark.parametrize(
    ("loss_fn", "has_aux", "match"),
    [
        (with_metrics, False, r"pass has_aux=True"),
        (lambda m, b: with_metrics(m, b)[0], True, r"has_aux=True, loss_fn must return a pair"),
        (lambda m, b: m(b["x"]), False, r"one scalar loss"),
    ],
)
def test_a_loss_of_the_wrong_form_names_the_fix(loss_fn, has_aux, match):
    tx = fsq.flying_squirrel(fsq.sgd(0.1), num_workers=W, axis_name=AXIS)
    trainer = fsq.nnx.DataParallel(
        MLP(nnx.Rngs(0)), tx, loss_fn, num_workers=W, has_aux=has_aux, backend="vmap"
    )
    with pytest.raises(TypeError, match=match):
        trainer.step(mlp_batch(0))


@pytest.mark.parametrize(
    ("loss_fn", "has_aux", "match"),
    [
        (lambda m, b: (cross_entropy(m, b), jnp.zeros(())), False, r"pass has_aux=True"),
        (cross_entropy, True, r"has_aux=True, loss_fn must return a pair"),
    ],
)
def test_a_loss_of_the_wrong_form_names_the_fix_with_model_state(loss_fn, has_aux, match):
    """The same errors for a model with state of its own (BatchNorm), whose loss the
    trainer takes apart before the step's own check could see it."""
    tx = fsq.flying_squirrel(fsq.sgd(0.1), num_workers=W, axis_name=AXIS)
    trainer = fsq.nnx.DataParallel(cnn(), tx, loss_fn, num_workers=W, has_aux=has_aux)
    with pytest.raises(TypeError, match=match):
        trainer.step(images(0))


def test_bad_arguments_raise_clearly(tmp_path):
    tx = fsq.flying_squirrel(fsq.sgd(0.1), num_workers=W, axis_name=AXIS)
    with pytest.raises(TypeError, match="model must be an nnx.Module"):
        fsq.nnx.DataParallel({"w": jnp.zeros(2)}, tx, cross_entropy, num_workers=W)
    with pytest.raises(ValueError, match="no variables of wrt"):
        fsq.nnx.DataParallel(MLP(nnx.Rngs(0)), tx, with_metrics, num_workers=W, wrt=nnx.BatchStat)
    with pytest.raises(ValueError, match="seed must be an int"):
        fsq.nnx.DataParallel(MLP(nnx.Rngs(0)), tx, with_metrics, num_workers=W, seed=-1)
    evaluate = fsq.parallel.evaluator(lambda w, b: {"loss": jnp.mean(b)})
    with pytest.raises(ValueError, match=r"'loss' must hold one value per example"):
        evaluate(jnp.zeros(1), np.ones(5, np.float32))
    with pytest.raises(ValueError, match="one leading"):
        fsq.parallel.evaluator(lambda w, b: {"x": b[0]})(jnp.zeros(1), (np.ones(3), np.ones(4)))
    dp = fsq.parallel.data_parallel(
        lambda w, b, *, model_state: (jnp.sum(w * b), {"aux": 1.0}),  # forgot the new state
        tx,
        num_workers=W,
        backend="vmap",
        has_aux=True,
    )
    state = dp.init(jnp.zeros(2), {"mean": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"must return \(loss, \(aux, new_model_state\)\)"):
        dp.step(state, np.ones((W, 2), np.float32))
    with pytest.raises(ValueError, match="no fsq.FlyingSquirrelState"):
        fsq.step_metrics(optax.adam(0.1).init(jnp.zeros(2)))
    with fsq.MetricWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="'loss' must be a scalar"):
            writer.write(0, {"loss": np.ones(3)})
        writer.write(0, {"loss": 1.0})
        with pytest.raises(ValueError, match="differ from the first write"):
            writer.write(1, {"accuracy": 1.0})
    with pytest.raises(ValueError, match="closed"):
        writer.write(2, {"loss": 1.0})


def test_an_integer_parameter_is_named():
    class Counted(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones(3))
            self.count = nnx.Param(jnp.zeros((), jnp.int32))

        def __call__(self, x):
            return jnp.sum(self.w * x) + self.count

    tx = fsq.flying_squirrel(fsq.sgd(0.1), num_workers=W, axis_name=AXIS)
    trainer = fsq.nnx.DataParallel(Counted(), tx, lambda m, b: m(b) ** 2, num_workers=W)
    with pytest.raises(TypeError, match=r"'count'.* is int32: .*wrt="):
        trainer.step(jnp.ones((W, 3)))
