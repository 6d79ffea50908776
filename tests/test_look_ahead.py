"""fsq.look_ahead: against the event simulation of tests/reference.py, exactly the wrapped
transformation at horizon 0, and its errors."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsq
from tests import reference, simulation

RNG = np.random.default_rng(5)
DIM, LR = 3, 0.2
A = np.diag(RNG.uniform(0.5, 2.0, DIM))
C = RNG.normal(size=DIM)
# One worker whose delays leave steps 2, 6, 10, ... with nothing delivered.
GAPS = np.array([[1], [3], [1], [1]])


def quadratic(w, step):
    del step
    return (jnp.asarray(A, jnp.float32) @ (w - jnp.asarray(C, jnp.float32)))[None]


def run(tx, steps):
    return simulation.run(tx, quadratic, jnp.zeros(DIM), steps, 1)


def squirrel(**kwargs):
    options = {"staleness": None, "compensation": None, **kwargs}
    return fsq.flying_squirrel(fsq.sgd(LR), num_workers=1, **options)


def test_a_step_that_delivers_nothing_keeps_the_parameters_ahead():
    path, metrics, _ = run(fsq.look_ahead(squirrel(delay=fsq.delays.trace(GAPS)), 2.5), 12)
    want, counts, *_ = reference.simulate(
        lambda i, w: A @ (w - C),
        num_workers=1,
        steps=12,
        lr=LR,
        dim=DIM,
        table=GAPS,
        look_ahead=2.5,
    )
    np.testing.assert_allclose(path, want, rtol=1e-5, atol=1e-6)
    # Steps 2 and 6 deliver nothing, and the parameters stay ahead of where they apply.
    assert counts["delivered"][2] == counts["delivered"][6] == 0
    np.testing.assert_array_equal(metrics["delivered"], counts["delivered"])
    plain, *_ = reference.simulate(
        lambda i, w: A @ (w - C), num_workers=1, steps=12, lr=LR, dim=DIM, table=GAPS
    )
    assert np.abs(path[2] - plain[2]).max() > 1e-3


def test_horizon_zero_is_the_wrapped_transformation_exactly():
    """Bitwise: with delays, delay compensation and the default rule."""
    tx = squirrel(delay=fsq.delays.uniform(3), compensation="adaptive", staleness="weighted_step")
    base, metrics, _ = run(tx, 20)
    ahead, _, _ = run(fsq.look_ahead(tx, 0.0), 20)
    np.testing.assert_array_equal(ahead, base)
    assert metrics["staleness"].max() > 0


def test_without_delay_it_is_synchronous_training_exactly():
    base, _, _ = run(squirrel(), 10)
    ahead, _, _ = run(fsq.look_ahead(squirrel(), 8.0), 10)
    np.testing.assert_array_equal(ahead, base)


@pytest.mark.parametrize(
    "horizon, error, match",
    [
        (-1.0, ValueError, r"horizon must be in \[0.0, inf\]"),
        (float("nan"), ValueError, "horizon must be finite"),
        ("8", TypeError, "horizon must be a real number"),
    ],
)
def test_bad_horizon_is_named(horizon, error, match):
    with pytest.raises(error, match=match):
        fsq.look_ahead(squirrel(), horizon)


def test_an_inner_without_staleness_to_read_is_refused_at_init():
    with pytest.raises(ValueError, match="FlyingSquirrelState"):
        fsq.look_ahead(optax.sgd(0.1)).init(jnp.zeros(2))
