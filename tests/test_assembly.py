"""fsq.asynchronous: assembling a variant that is no preset, and what it refuses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsq
from fsq import compression, delays
from tests import reference, simulation

T = fsq.transforms
W, DIM, STEPS, LR = 4, 6, 20, 0.1
RNG = np.random.default_rng(31)
A = np.stack([np.diag(RNG.uniform(0.5, 2.0, DIM)) for _ in range(W)])
C = RNG.normal(size=(W, DIM))
TABLE = RNG.integers(0, 3, size=(5, W))


def gradients(w, step):
    del step
    return jnp.einsum(
        "wij,wj->wi", jnp.asarray(A, jnp.float32), w[None] - jnp.asarray(C, jnp.float32)
    )


def test_the_preset_is_its_assembly():
    """flying_squirrel with options equals the pieces assembled by hand, bitwise."""
    options = {"worker_momentum": 0.9, "compression": compression.top_k(0.5)}
    preset = fsq.flying_squirrel(
        fsq.sgd(LR),
        num_workers=W,
        delay=delays.trace(TABLE),
        aggregation="median",
        staleness=None,
        compensation=None,
        **options,
    )
    assembled = fsq.asynchronous(
        fsq.sgd(LR),
        num_workers=W,
        send=[
            T.reject_non_finite(),
            T.worker_momentum(0.9),
            T.compress(compression.top_k(0.5)),
        ],
        line=T.delay_line(delays.trace(TABLE)),
        deliver=[T.robust(fsq.aggregation.median())],
    )
    want, *_ = simulation.run(preset, gradients, jnp.zeros(DIM), STEPS, W)
    got, *_ = simulation.run(assembled, gradients, jnp.zeros(DIM), STEPS, W)
    np.testing.assert_array_equal(got, want)
    assert not np.allclose(got[-1], 0)


def test_an_optax_transform_per_worker_and_a_staleness_rule_without_compensation():
    """A variant no preset offers: each worker clips its gradient to norm 1 before it is
    sent, the inverse staleness rule weighs it, the step scope normalises."""
    tx = fsq.asynchronous(
        fsq.sgd(LR),
        num_workers=W,
        send=[optax.clip_by_global_norm(1.0), T.scale_by_staleness(fsq.staleness.inverse())],
        line=T.delay_line(delays.trace(TABLE)),
        deliver=[T.normalise("weight")],
    )
    got, *_ = simulation.run(tx, gradients, jnp.zeros(DIM), STEPS, W)

    def clipped(i, w):
        g = A[i] @ (w - C[i])
        return g * min(1.0, 1.0 / np.linalg.norm(g))

    want, *_ = reference.simulate(
        clipped,
        num_workers=W,
        steps=STEPS,
        lr=LR,
        dim=DIM,
        table=TABLE,
        rule=lambda d: 1.0 / max(1, d),
        scope="step",
    )
    np.testing.assert_allclose(got, want, rtol=5e-5, atol=5e-6)


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (
            lambda: fsq.asynchronous(fsq.sgd(LR), num_workers=W, send=[T.compensation_channels()]),
            ValueError,
            "add fsq.transforms.compensate",
        ),
        (
            lambda: fsq.asynchronous(
                fsq.sgd(LR),
                num_workers=W,
                deliver=[T.normalise(), T.robust(fsq.aggregation.median())],
            ),
            ValueError,
            "end with its one normalise",
        ),
        (
            lambda: fsq.asynchronous(
                fsq.sgd(LR),
                num_workers=W,
                send=[T.compress(compression.top_k(0.5))],
                line=T.delay_line(2, exchange="sparse"),
                deliver=[T.robust(fsq.aggregation.median())],
            ),
            ValueError,
            "sparse",
        ),
        (
            lambda: fsq.asynchronous(
                fsq.sgd(LR), num_workers=W, send=[T.bound_staleness(5)], line=T.delay_line(3)
            ),
            ValueError,
            "max_staleness",
        ),
        (lambda: fsq.asynchronous(fsq.sgd(LR), num_workers=W, send=[len]), TypeError, "optax"),
        (lambda: fsq.asynchronous(fsq.sgd(LR), num_workers=W, deliver=[len]), TypeError, "deliver"),
        (lambda: fsq.asynchronous(fsq.sgd(LR), num_workers=W, line=3), TypeError, "delay_line"),
        (lambda: T.delay_line(2, exchange="gossip"), ValueError, "exchange"),
        (lambda: fsq.asynchronous(optax.sgd, num_workers=W), TypeError, "inner"),
    ],
)
def test_bad_assemblies_raise_at_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_a_sparse_exchange_without_a_sparse_compressor_says_so():
    tx = fsq.asynchronous(fsq.sgd(LR), num_workers=W, line=T.delay_line(2, exchange="sparse"))
    workers = fsq.parallel.vmap_workers(tx, num_workers=W)
    state = workers.init(jnp.zeros(DIM))
    with pytest.raises(ValueError, match="sparse compressor"):
        workers.update(jnp.ones((W, DIM)), state, jnp.zeros(DIM))


def test_extra_arguments_reach_the_inner_optimizer():
    """The inner optimizer gets the extra arguments of update (here: the loss value that
    optax.contrib's reduce_on_plateau reads)."""
    inner = optax.chain(
        fsq.sgd(1.0), optax.contrib.reduce_on_plateau(factor=0.5, patience=0, cooldown=0)
    )
    tx = fsq.asynchronous(inner, num_workers=2)
    workers = fsq.parallel.vmap_workers(tx, num_workers=2)
    state = workers.init(jnp.zeros(1))
    for loss in (1.0, 2.0):  # no improvement: the scale halves
        updates, state = workers.update(jnp.ones((2, 1)), state, jnp.zeros(1), value=loss)
    np.testing.assert_allclose(updates, [-0.5])
    assert jax.tree.leaves(state)  # a state came back


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda tx: fsq.asynchronous(tx, num_workers=2), "inner"),
        (lambda tx: fsq.flying_squirrel(tx, num_workers=2), "inner"),
        (lambda tx: fsq.accumulate(tx, 2), "inner"),
        (lambda tx: fsq.look_ahead(tx), "inner"),
        (lambda tx: fsq.local_sgd(tx, fsq.sgd(0.1), num_workers=2, steps=2), "outer"),
        (lambda tx: fsq.local_sgd(fsq.sgd(1.0), tx, num_workers=2, steps=2), "local"),
        (lambda tx: fsq.diloco(tx, num_workers=2, steps=2), "local"),
    ],
)
def test_a_wrapper_names_the_transformation_it_was_given_when_built(build, name):
    """An optimizer's name, or the factory instead of the transformation, fails at once."""
    for wrong in ("sgd", fsq.sgd):
        with pytest.raises(TypeError, match=f"^{name} must be an optax.GradientTransformation"):
            build(wrong)
