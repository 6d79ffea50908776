"""optax's own contract for a GradientTransformation, over every fsq transformation.

The assertions are those of optax's battery (``optax/contrib/_common_test.py``, which
every contributed optimizer must pass, and ``optax/_src/sharding_test.py``): extra
arguments accepted, no recompilation, ``optax.tree.map_params``, convergence on optax's
targets, ``inject_hyperparams``, dtype preservation, ``optax.MultiSteps`` around it,
state shape, dtype and sharding stable through ``lax.cond``, schedules, abstract
``init``, and sharding types preserved on an explicit mesh. The harness is fsq's: a
transformation used per worker runs under :func:`fsq.parallel.vmap_workers` (``W = 2``
workers given the same gradient, stacked), the catalogue and the wrappers as they are.
A case that does not apply says why, in its skip reason.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsq

W = 2
U = fsq.delays.uniform


class Subject:
    """A transformation under test: ``make(**hyperparameters)`` builds it, per worker
    (``workers``) or as it is; ``factory`` and ``hyperparameters`` for injection."""

    def __init__(self, factory, hyperparameters, workers=False, static=(), steps=3000):
        self.factory, self.hyperparameters = factory, hyperparameters
        self.workers, self.static, self.steps = workers, static, steps

    def make(self, **overrides):
        return self.harness(self.factory(**{**self.hyperparameters, **overrides}))

    def harness(self, tx):
        return fsq.parallel.vmap_workers(tx, num_workers=W) if self.workers else tx


def squirrel(inner, **options):
    return fsq.flying_squirrel(inner, num_workers=W, seed=1, **options)


def local(preset, outer_learning_rate, **options):
    """A local-steps preset with plain SGD inside and 4 local steps, per worker."""
    return Subject(
        lambda outer_learning_rate: preset(
            optax.sgd(0.05),
            num_workers=W,
            steps=4,
            outer_learning_rate=outer_learning_rate,
            **options,
        ),
        {"outer_learning_rate": outer_learning_rate},
        workers=True,
    )


SUBJECTS = {
    "sgd": Subject(fsq.sgd, {"learning_rate": 0.1}),
    "momentum": Subject(fsq.momentum, {"learning_rate": 0.02}),
    "nesterov": Subject(fsq.nesterov, {"learning_rate": 0.02}),
    "adagrad": Subject(fsq.adagrad, {"learning_rate": 0.5}),
    "rmsprop": Subject(fsq.rmsprop, {"learning_rate": 0.01}),
    "adam": Subject(fsq.adam, {"learning_rate": 0.02}),
    "bgd": Subject(
        fsq.bgd, {"learning_rate": 0.1, "num_microbatches": 2}, static=("num_microbatches",)
    ),
    "accumulate": Subject(
        lambda learning_rate: fsq.accumulate(optax.adam(learning_rate), 2),
        {"learning_rate": 0.02},
    ),
    "flying_squirrel, delay 0": Subject(
        lambda learning_rate: squirrel(fsq.adam(learning_rate)),
        {"learning_rate": 0.02},
        workers=True,
    ),
    "flying_squirrel, uniform(4), defaults": Subject(
        lambda learning_rate, compensation: squirrel(
            fsq.momentum(learning_rate), delay=U(4), compensation=compensation
        ),
        {"learning_rate": 0.01, "compensation": 0.01},
        workers=True,
    ),
    "flying_squirrel, uniform(4), plain": Subject(
        lambda learning_rate: squirrel(
            fsq.sgd(learning_rate), delay=U(4), staleness=None, compensation=None
        ),
        {"learning_rate": 0.05},
        workers=True,
    ),
    "flying_squirrel, top-k + EF, median, worker momentum": Subject(
        lambda learning_rate, worker_momentum: squirrel(
            fsq.sgd(learning_rate),
            delay=U(2),
            compression=fsq.compression.top_k(0.5, per_leaf=True),
            aggregation="median",
            worker_momentum=worker_momentum,
        ),
        {"learning_rate": 0.05, "worker_momentum": 0.5},
        workers=True,
    ),
    "look_ahead": Subject(
        lambda learning_rate: fsq.look_ahead(squirrel(fsq.momentum(learning_rate), delay=U(4))),
        {"learning_rate": 0.01},
        workers=True,
    ),
    "diloco": local(fsq.diloco, 0.5),
    # optax's targets have one leaf: a fragment never cuts one.
    "streaming_diloco": local(fsq.streaming_diloco, 0.5, fragments=1),
    "async_local_sgd": local(fsq.async_local_sgd, 0.3),
    "asynchronous": Subject(
        lambda learning_rate: fsq.asynchronous(
            fsq.sgd(learning_rate),
            num_workers=W,
            send=[fsq.transforms.reject_non_finite(), optax.clip_by_global_norm(10.0)],
            line=fsq.transforms.delay_line(U(3)),
        ),
        {"learning_rate": 0.05},
        workers=True,
    ),
}
NAMES = sorted(SUBJECTS)


def stacked(tree):
    """Every worker's gradient: the same, stacked ``[W, ...]``."""
    return jax.tree.map(lambda g: jnp.stack([g] * W), tree)


def gradients(subject, grads):
    return stacked(grads) if subject.workers else grads


def parabola(dtype):
    target = jnp.array([1.0, -1.0, 1.0], dtype)
    return jnp.array([-1.0, 10.0, 1.0], dtype), target, lambda p: jnp.sum((p - target) ** 2)


def rosenbrock(dtype):
    start, target = jnp.zeros(2, dtype), jnp.array([1.0, 1.0], dtype)
    return start, target, lambda p: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2


def matrix_parabola(dtype):
    target = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype)
    return jnp.zeros((2, 2), dtype), target, lambda p: jnp.sum((p - target) ** 2)


def mixed_tensors(dtype):
    target = (jnp.array([1.0, -1.0, 2.0], dtype), jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype))
    start = jax.tree.map(jnp.zeros_like, target)

    def objective(p):
        return sum(jnp.sum((a - b) ** 2) for a, b in zip(p, target, strict=True))

    return start, target, objective


def stepper(subject, tx, objective, **extra):
    @jax.jit
    def step(params, state):
        grads = jax.grad(objective)(params)
        updates, state = tx.update(gradients(subject, grads), state, params, **extra)
        return optax.apply_updates(params, updates), state

    return step


@pytest.mark.parametrize("name", NAMES)
def test_accepts_extra_args_and_does_not_recompile(name):
    subject = SUBJECTS[name]
    tx = subject.make()
    start, _, objective = rosenbrock(jnp.float32)
    step = stepper(subject, tx, objective, unexpected_extra_args_your_optimizer_doesnt_expect=1)
    params, state = start, tx.init(start)
    for _ in range(2):
        params, state = step(params, state)
    compiles = []
    listener = lambda event, *a, **k: compiles.append(event) if "compile" in event else None  # noqa: E731
    jax.monitoring.register_event_listener(listener)
    try:
        step(params, state)
    finally:
        jax.monitoring.unregister_event_listener(listener)
    assert not compiles, "the update recompiles on its second call"


@pytest.mark.parametrize("target", [parabola, matrix_parabola, mixed_tensors])
@pytest.mark.parametrize("name", NAMES)
def test_optimizes_optax_targets(name, target):
    subject = SUBJECTS[name]
    tx = subject.make()
    start, final, objective = target(jnp.float32)
    state = tx.init(start)
    state = optax.tree.map_params(tx, lambda v: v, state)  # a no-op map works
    step = stepper(subject, tx, objective)
    (params, _), _ = jax.lax.scan(
        lambda carry, _: (step(*carry), None), (start, state), length=subject.steps
    )
    np.testing.assert_allclose(
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)]),
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(final)]),
        rtol=3e-2,
        atol=3e-2,
    )


@pytest.mark.parametrize("name", NAMES)
def test_can_be_wrapped_in_inject_hyperparams(name):
    """Every float hyperparameter injected (as ``optax.inject_hyperparams`` does, traced
    under jit); the same updates and states as the plain transformation."""
    subject = SUBJECTS[name]
    injected = optax.inject_hyperparams(subject.factory, static_args=subject.static)
    plain, wrapped = subject.make(), subject.harness(injected(**subject.hyperparameters))
    params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
    grads = gradients(subject, [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))])
    updates, state = jax.jit(plain.update)(grads, jax.jit(plain.init)(params), params)
    got, got_state = jax.jit(wrapped.update)(grads, jax.jit(wrapped.init)(params), params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(updates), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    inner = got_state.inner_state
    for a, b in zip(jax.tree.leaves(inner), jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert set(got_state.hyperparams) >= {
        k for k, v in subject.hyperparameters.items() if isinstance(v, float)
    }


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_updates_keep_the_parameters_dtype(name, dtype):
    subject = SUBJECTS[name]
    tx = subject.make()
    params = jnp.array([1.0, 2.0], dtype)
    grads = gradients(subject, jax.grad(lambda x: jnp.sum(x**2))(params))
    state = jax.jit(tx.init)(params)
    for _ in range(3):  # through delays too
        updates, state = jax.jit(tx.update)(grads, state, params)
        assert updates.dtype == params.dtype


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_multisteps_around_it_accumulates(name, dtype):
    """``optax.MultiSteps`` around the transformation: zeros until the ``k``-th call."""
    subject = SUBJECTS[name]
    if subject.workers:
        pytest.skip(
            "by design: optax.MultiSteps accumulates gradients shaped like the parameters, "
            "and a transformation used per worker gets every worker's, stacked [W, ...]; "
            "accumulate in the inner optimizer instead (fsq.accumulate(inner, k), or an "
            "optax.MultiSteps inner: test_a_multisteps_inner_is_accepted)"
        )
    tx = optax.MultiSteps(subject.make(), every_k_schedule=4)
    params = jnp.array([1.0, 2.0], dtype)
    grads = gradients(subject, jax.grad(lambda x: jnp.sum(x**2))(params))
    state = jax.jit(tx.init)(params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    np.testing.assert_array_equal(updates, jnp.zeros_like(params))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_state_shape_dtype_and_sharding_are_stable(name, dtype):
    subject = SUBJECTS[name]
    with jax.enable_x64(dtype == "float64"):
        dtype = jnp.dtype(dtype)
        tx = subject.make()
        start, _, objective = parabola(dtype)

        @jax.jit
        def step(params, state):
            grads = gradients(subject, jax.grad(objective)(params))
            cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
            updates, state = jax.lax.cond(
                cond, lambda: tx.update(grads, state, params), lambda: (params, state)
            )
            return optax.apply_updates(params, updates), state

        params, state = start, tx.init(start)
        for _ in range(2):
            params, new_state = step(params, state)
            assert jax.tree.leaves(params)[0].dtype == dtype
            assert jax.tree.map(jax.typeof, new_state) == jax.tree.map(jax.typeof, state)
            state = new_state


@pytest.mark.parametrize("name", NAMES)
def test_a_learning_rate_schedule_equals_the_constant(name):
    subject = SUBJECTS[name]
    rate = next(k for k in subject.hyperparameters if k.endswith("learning_rate"))
    signature = inspect.signature(subject.factory).parameters
    if rate not in signature:
        pytest.skip(f"{name} takes no {rate}")
    value = subject.hyperparameters[rate]
    start, _, objective = parabola(jnp.float32)
    runs = []
    for given in (value, optax.constant_schedule(value)):
        tx = subject.make(**{rate: given})
        step = stepper(subject, tx, objective)
        params, state = start, tx.init(start)
        for _ in range(10):
            params, state = step(params, state)
        runs.append(params)
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_init_takes_abstract_parameters(name):
    subject = SUBJECTS[name]
    params = jax.ShapeDtypeStruct((2, 4, 8), jnp.float32)
    state = subject.make().init(params)
    assert state is not None
    concrete = subject.make().init(jnp.zeros((2, 4, 8)))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == jax.tree.map(
        lambda x: (x.shape, x.dtype), concrete
    )


def explicit(devices):
    mesh = jax.make_mesh(
        (devices,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,),
        devices=jax.devices()[:devices],
    )  # fmt: skip
    return mesh, jax.sharding.NamedSharding(mesh, jax.P(None, "x"))


@pytest.mark.parametrize("devices", [2, 8])
@pytest.mark.parametrize("name", NAMES)
def test_sharding_types_of_an_explicit_mesh_are_kept(name, devices):
    """On a mesh of explicit axes (``jax.make_mesh``'s default) with parameters sharded
    ``P(None, "x")``: the state's types (sharding included) after an update are those of
    ``init``, and a jitted ``init`` and ``update`` type them the same."""
    subject = SUBJECTS[name]
    mesh, sharding = explicit(devices)
    tx = subject.make()
    with jax.set_mesh(mesh):
        params = jnp.zeros((2, 8, 4), jnp.float16, out_sharding=sharding)
        grads = gradients(subject, params)
        state0 = tx.init(params)
        _, state1 = tx.update(grads, state0, params)
        types = functools.partial(jax.tree.map, jax.typeof)
        assert types(state0) == types(state1)
        assert types(jax.jit(tx.init)(params)) == types(state0)
        _, state2 = jax.jit(tx.update)(grads, state0, params)
        assert types(state2) == types(state1)
        for leaf in jax.tree.leaves(state1):  # per-parameter buffers stay sharded
            if leaf.shape[-3:] == (2, 8, 4):
                assert jax.typeof(leaf).sharding.spec[-2] == "x"


F, T = False, True


@pytest.mark.parametrize(
    "wrap, workers, moves",
    [
        # Delay 1: the inner's steps on gradients 2, 4, 6 are applied a step later.
        (lambda inner: fsq.flying_squirrel(inner, num_workers=W, delay=1), True, [F, F, T, F, T]),
        (lambda inner: fsq.accumulate(inner, 1), False, [F, T, F, T, F]),
        # The look-ahead extrapolates once the inner has stepped: its first move is what counts.
        (
            lambda inner: fsq.look_ahead(fsq.flying_squirrel(inner, num_workers=W, delay=1)),
            True,
            [F, F, T],
        ),
        # Plain outer SGD at rate 1 every step: the update is the workers' local step.
        (
            lambda inner: fsq.diloco(
                inner, num_workers=W, steps=1, outer_learning_rate=1.0, outer_momentum=0.0
            ),
            True,
            [F, T, F, T, F],
        ),
    ],
    ids=["flying_squirrel", "accumulate", "look_ahead", "diloco (local)"],
)
def test_a_multisteps_inner_is_accepted(wrap, workers, moves):
    """An ``optax.MultiSteps`` object as the inner (or local) optimizer: its
    ``gradient_transformation()``, stepping on every 2nd gradient it gets."""
    tx = wrap(optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2))
    if workers:
        tx = fsq.parallel.vmap_workers(tx, num_workers=W)
    params = jnp.zeros(2)
    state = tx.init(params)
    moved = []
    for _ in range(len(moves)):
        grads = stacked(jnp.ones(2)) if workers else jnp.ones(2)
        updates, state = tx.update(grads, state, params)
        moved.append(bool(jnp.any(updates != 0)))
    assert moved == moves


def test_an_nnx_optimizer_passes_the_loss_to_bgd():
    """``nnx.Optimizer(model, fsq.bgd(...)).update(model, grads, value=loss)``: the extra
    argument reaches an update that ignores it, and the step is the hand-computed one."""
    from flax import nnx

    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, fsq.bgd(0.5, num_microbatches=1), wrt=nnx.Param)
    kernel = np.asarray(model.kernel[...])

    def loss_fn(model):
        return jnp.sum(model(jnp.ones((1, 2))))

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, value=loss)
    np.testing.assert_allclose(model.kernel[...], kernel - 0.5, rtol=1e-6)


def test_multisteps_around_stacked_workers_names_the_fix():
    """optax.MultiSteps around a transformation used per worker cannot work (it
    accumulates parameter-shaped gradients); the error names fsq.accumulate."""
    tx = optax.MultiSteps(fsq.flying_squirrel(fsq.sgd(0.1), num_workers=W), every_k_schedule=2)
    workers = fsq.parallel.vmap_workers(tx, num_workers=W)
    state = workers.init(jnp.zeros(2))
    with pytest.raises(ValueError, match=r"fsq\.accumulate\(inner, k\)"):
        workers.update(stacked(jnp.ones(2)), state, jnp.zeros(2))
