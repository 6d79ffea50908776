"""Delay models against their defining formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fsq
from fsq import delays

NUM_DRAWS = 40_000


def draw(model, step=0, worker=0, n=NUM_DRAWS):
    keys = jax.random.split(jax.random.key(123), n)
    return np.asarray(jax.jit(jax.vmap(lambda k: model(k, step, worker)))(keys))


def frequencies(samples, max_delay):
    return np.bincount(samples, minlength=max_delay + 1) / samples.size


def test_constant():
    assert delays.constant(3).max_delay == 3
    np.testing.assert_array_equal(draw(delays.constant(3), n=10), 3)


@pytest.mark.parametrize(
    ("model", "probabilities"),
    [
        (delays.uniform(4), np.full(5, 0.2)),
        (delays.geometric(2.0, 6), (2 / 3) ** np.arange(7)),
        (delays.heavy_tailed(8, alpha=1.5), np.arange(1, 10) ** -1.5),
        (delays.heavy_tailed(64), np.arange(1, 66) ** -1.5),
    ],
)
def test_categorical_models_follow_their_formula(model, probabilities):
    samples = draw(model)
    assert samples.dtype == np.int32
    assert samples.min() >= 0 and samples.max() <= model.max_delay
    expected = probabilities / probabilities.sum()
    # Each frequency within 5 binomial standard errors of its probability, bin by bin: a
    # fixed tolerance would pass any error in the tail, where most bins have p < 0.01.
    error = np.sqrt(expected * (1 - expected) / samples.size)
    got = frequencies(samples, model.max_delay)
    assert np.all(np.abs(got - expected) <= 5 * error + 1e-12), np.abs(got - expected) / error


def test_heavy_tailed_documented_shape():
    samples = draw(delays.heavy_tailed(64))
    assert abs((samples == 0).mean() - 0.42) < 0.01
    assert abs(samples.mean() - 5.2) < 0.2
    assert abs((samples >= 30).mean() - 0.05) < 0.01


def test_same_key_same_delay_and_keys_matter():
    model = delays.uniform(16)
    key = jax.random.key(7)
    assert int(model(key, 3, 1)) == int(model(key, 3, 1))
    assert len(set(draw(model, n=50).tolist())) > 5


def test_speeds_mean_delay_is_slowdown_minus_one():
    slowdowns = (1.0, 1.5, 3.0, 4.25)
    model = delays.speeds(slowdowns)
    assert model.max_delay == 4 and model.num_workers == 4
    for worker, k in enumerate(slowdowns):
        samples = draw(model, worker=worker, n=20_000)
        assert set(np.unique(samples)) <= {int(np.floor(k - 1)), int(np.ceil(k - 1))}
        assert abs(samples.mean() - (k - 1)) < 0.02


MODELS = [
    delays.constant(3),
    delays.uniform(4),
    delays.geometric(2.0, 6),
    delays.heavy_tailed(8, alpha=1.5),
    delays.speeds((1.0, 1.5, 3.0, 4.25)),
    delays.trace([[0, 2], [1, 0], [3, 1]]),
]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: type(m).__name__)
def test_mean_and_min_delay_are_those_of_the_draws(model):
    """mean_delay (delay_adaptive's threshold) and min_delay (when the due row is read
    early) against the delays the model draws, over workers and steps."""
    workers = model.num_workers or 1
    keys = jax.random.split(jax.random.key(5), 4000)
    steps = jnp.arange(keys.shape[0])
    samples = np.stack(
        [
            np.asarray(jax.vmap(lambda k, t, i=i: model(k, t, i))(keys, steps))
            for i in range(workers)
        ]
    )
    assert model.min_delay == samples.min()
    error = samples.std() / np.sqrt(samples.size)
    assert abs(model.mean_delay - samples.mean()) <= 5 * error + 1e-9


def test_trace_replays_the_table_cyclically():
    table = np.array([[0, 2], [1, 0], [3, 1]])
    model = delays.trace(table)
    assert model.max_delay == 3 and model.num_workers == 2
    key = jax.random.key(0)
    for step in range(7):
        for worker in range(2):
            assert int(model(key, step, worker)) == table[step % 3, worker]


def test_models_are_hashable_and_comparable():
    assert delays.uniform(4) == delays.uniform(4)
    assert hash(delays.geometric(1.0, 3)) == hash(delays.geometric(1.0, 3))


@pytest.mark.parametrize(
    ("build", "error", "argument"),
    [
        (lambda: delays.constant(-1), ValueError, "tau"),
        (lambda: delays.constant(1.5), TypeError, "tau"),
        (lambda: delays.constant(True), TypeError, "tau"),
        (lambda: delays.uniform(-2), ValueError, "max_delay"),
        (lambda: delays.uniform(1 << 20), ValueError, "max_delay"),
        (lambda: delays.geometric(0.0, 4), ValueError, "mean"),
        (lambda: delays.geometric(1.0, -1), ValueError, "max_delay"),
        (lambda: delays.heavy_tailed(4, alpha=0.0), ValueError, "alpha"),
        (lambda: delays.speeds([1.0, 0.5]), ValueError, "slowdowns"),
        (lambda: delays.speeds([]), ValueError, "slowdowns"),
        (lambda: delays.trace([[0, 5]], max_delay=3), ValueError, "max_delay=3"),
        (lambda: delays.trace([[0, -1]]), ValueError, r"\[0, max_delay"),
        (lambda: delays.trace([0, 1]), ValueError, "delays"),
        (lambda: delays.trace([[0.5]]), ValueError, "delays"),
        (
            lambda: fsq.flying_squirrel(fsq.sgd(0.1), num_workers=2, delay=-1),
            ValueError,
            r"delay must be an int in \[0, 65536\], got -1",
        ),
        (
            lambda: fsq.flying_squirrel(fsq.sgd(0.1), num_workers=2, delay=70000),
            ValueError,
            r"delay must be an int in \[0, 65536\]",
        ),
        (lambda: fsq.flying_squirrel(fsq.sgd(0.1), num_workers=2, delay=1.0), TypeError, "delay"),
    ],
)
def test_bad_arguments_raise(build, error, argument):
    with pytest.raises(error, match=argument):
        build()


def test_models_run_under_jit_with_traced_step_and_worker():
    model = delays.speeds((1.0, 2.0))
    f = jax.jit(lambda k, t, i: model(k, t, i))
    assert int(f(jax.random.key(0), jnp.int32(5), jnp.int32(0))) == 0
    assert int(f(jax.random.key(0), jnp.int32(5), jnp.int32(1))) == 1
