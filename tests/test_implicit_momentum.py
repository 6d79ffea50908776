"""The momentum asynchrony adds (Mitliagkas et al. 2016): the rule by hand, the step it
keeps against a numpy trace, its errors, and the protocols study's method built on it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fsq


@pytest.mark.parametrize(
    "momentum, staleness, kept",
    [
        (0.9, 0.0, 0.9),  # synchronous: unchanged
        (0.9, 1.0, 0.4),  # 0.9 - 1/2
        (0.9, 2.0, 0.9 - 2 / 3),
        (0.9, 8.0, 0.9 - 8 / 9),
        (0.5, 4.0, 0.0),  # 0.5 - 4/5 < 0: dropped, never negative
        (0.0, 3.0, 0.0),
    ],
)
def test_momentum_under_delay_by_hand(momentum, staleness, kept):
    assert float(fsq.asynchrony_momentum(staleness)) == pytest.approx(staleness / (1 + staleness))
    assert float(fsq.momentum_under_delay(momentum, staleness)) == pytest.approx(kept, abs=1e-6)
    rate = fsq.rate_under_delay(0.01, momentum, staleness)
    assert float(rate) == pytest.approx(0.01 * (1 - kept) / (1 - momentum), rel=1e-5)


def test_the_lowered_momentum_keeps_the_step_of_a_consistent_gradient():
    """A constant gradient g: heavy ball's update tends to -eta g / (1 - mu). With mu and
    eta lowered for a mean staleness of 2, the limit is the synchronous one (numpy)."""
    mu, eta, g = 0.9, 0.01, np.array([1.0, -2.0])
    kept = float(fsq.momentum_under_delay(mu, 2.0))
    tx = fsq.momentum(float(fsq.rate_under_delay(eta, mu, 2.0)), momentum=kept)
    state = tx.init(jnp.zeros(2))
    for _ in range(300):
        update, state = tx.update(jnp.asarray(g, jnp.float32), state)
    np.testing.assert_allclose(np.asarray(update), -eta * g / (1 - mu), rtol=1e-4)
    # The momentum alone, without the rate, would take a step (1 - mu) / (1 - kept) as long.
    alone = fsq.momentum(eta, momentum=kept)
    state = alone.init(jnp.zeros(2))
    for _ in range(300):
        update, state = alone.update(jnp.asarray(g, jnp.float32), state)
    np.testing.assert_allclose(np.asarray(update), -eta * g / (1 - kept), rtol=1e-4)


def test_a_traced_staleness_gives_the_untraced_values():
    got = jax.jit(lambda s: fsq.momentum_under_delay(0.9, s))(jnp.float32(5.226))
    assert float(got) == pytest.approx(float(fsq.momentum_under_delay(0.9, 5.226)), abs=1e-6)


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: fsq.asynchrony_momentum(-1.0), r"mean_staleness must be in \[0.0, inf\)"),
        (lambda: fsq.asynchrony_momentum(float("nan")), "mean_staleness"),
        (lambda: fsq.momentum_under_delay(1.0, 2.0), r"momentum must be in \[0.0, 1.0\)"),
        (lambda: fsq.momentum_under_delay(0.9, -0.5), "mean_staleness"),
        (lambda: fsq.rate_under_delay(-0.1, 0.9, 2.0), "learning_rate"),
    ],
)
def test_bad_arguments_are_named(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


def test_the_hyperparameters_of_a_named_optimizer_by_hand():
    # A mean staleness of 2 adds 2/3: Adam's b1 0.9 -> 0.2333, its other keywords kept.
    adam = fsq.hyperparameters_under_delay("adam", 2.0, learning_rate=1e-3, b2=0.99)
    assert set(adam) == {"learning_rate", "b1", "b2"}
    assert (adam["learning_rate"], adam["b2"]) == (1e-3, 0.99)
    assert float(adam["b1"]) == pytest.approx(0.9 - 2 / 3, abs=1e-6)
    # Nesterov at its default momentum 0.9: the rate keeps eta / (1 - mu).
    nesterov = fsq.hyperparameters_under_delay("nesterov", 2.0, learning_rate=0.01)
    assert float(nesterov["momentum"]) == pytest.approx(0.9 - 2 / 3, abs=1e-6)
    assert float(nesterov["learning_rate"]) == pytest.approx(0.01 * (1 - 0.9 + 2 / 3) / 0.1)
    # An explicit momentum of 0.5 at a staleness of 1 drops to 0, the rate doubles.
    heavy = fsq.hyperparameters_under_delay("momentum", 1.0, learning_rate=0.01, momentum=0.5)
    assert float(heavy["momentum"]) == 0.0
    assert float(heavy["learning_rate"]) == pytest.approx(0.02)
    # Without momentum nothing changes; every result builds its optimizer.
    for name in ("sgd", "adagrad", "rmsprop"):
        assert fsq.hyperparameters_under_delay(name, 8.0, learning_rate=0.1) == {
            "learning_rate": 0.1
        }
    for name, hparams in (("adam", adam), ("nesterov", nesterov), ("momentum", heavy)):
        fsq.get_optimizer(name, **hparams).init(jnp.zeros(2))


def test_a_scheduled_rate_is_scaled_at_every_count():
    schedule = lambda count: 0.01 / (1.0 + count)  # noqa: E731
    got = fsq.hyperparameters_under_delay("momentum", 2.0, learning_rate=schedule)
    for count in (0, 3):
        want = 0.01 / (1 + count) * (1 - 0.9 + 2 / 3) / 0.1
        assert float(got["learning_rate"](count)) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: fsq.hyperparameters_under_delay("lamb", 2.0, learning_rate=0.1), "name must be"),
        (lambda: fsq.hyperparameters_under_delay("nesterov", 2.0), "learning_rate must be given"),
        (
            lambda: fsq.hyperparameters_under_delay("adam", 2.0, learning_rate=0.1, b1=1.0),
            r"b1 must be in \[0.0, 1.0\)",
        ),
        (
            lambda: fsq.hyperparameters_under_delay("adam", -1.0, learning_rate=0.1),
            "mean_staleness",
        ),
    ],
)
def test_bad_hyperparameters_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


METHOD = "flying squirrel, momentum less asynchrony's"


def _updates(tx, steps=4):
    """``tx``'s updates of a few gradients of 8 workers on the trainer's axes (one device)."""

    def on_workers(f):
        inner = jax.vmap(f, axis_name=fsq.parallel.AXIS_NAME[1])
        return jax.vmap(inner, axis_name=fsq.parallel.AXIS_NAME[0])

    params = jnp.ones((1, 8, 3))
    state = on_workers(tx.init)(params)
    out = []
    for t in range(steps):
        grads = jnp.arange(24.0).reshape(1, 8, 3) / 10 + t
        update, state = on_workers(tx.update)(grads, state, params)
        out.append(np.asarray(update))
    return np.stack(out)


@pytest.mark.parametrize(
    "inner, built_by_hand",
    [
        # Under a constant delay of 2, asynchrony adds 2/3 of momentum.
        ("adam", lambda: fsq.adam(0.01, b1=0.9 - 2 / 3)),
        ("nesterov", lambda: fsq.nesterov(0.01 * (1 - (0.9 - 2 / 3)) / 0.1, momentum=0.9 - 2 / 3)),
        ("rmsprop", lambda: fsq.rmsprop(0.01)),  # no momentum: unchanged
    ],
)
def test_the_study_method_lowers_the_inner_momentum_by_the_delay(inner, built_by_hand):
    """The method's transformation equals the defaults around the inner built by hand."""
    from experiments import training
    from experiments.studies import protocols

    got = _updates(protocols.transform(inner, 0.01, METHOD, 2, 0))
    want = _updates(training.flying_squirrel(built_by_hand(), protocols.WORKERS, 0, delay=2))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
    assert np.abs(got).sum() > 0
    if inner != "rmsprop":  # the test can tell: the defaults' inner differs
        plain = _updates(protocols.transform(inner, 0.01, "flying squirrel", 2, 0))
        assert np.abs(plain - got).max() > 1e-4


def test_the_study_reads_the_mean_delay_of_one_of_its_kinds_and_the_sqrt_ticks():
    from experiments.studies import protocols, wallclock

    models = list(protocols.DELAYS.values())
    for i, model in enumerate(models):
        traced = jax.jit(lambda k: protocols.one_of(models, k).mean_delay)(jnp.int32(i))
        assert float(traced) == pytest.approx(model.mean_delay, rel=1e-6)
    sqrt = wallclock.profile("sqrt", protocols.WORKERS, 100, protocols.TICKS_PER_SECOND)
    assert sqrt.compute.ticks == (1, 1, 2, 2, 2, 2, 3, 3)


def test_a_compute_models_mean_staleness_by_hand():
    # Jobs of 1, 1, 2, 2, 2, 2, 3, 3 ticks return 0, 0, 1, 1, 1, 1, 2, 2 steps stale, 1/ticks
    # of them a tick: (4 / 2 + 2 * 2 / 3) / (2 + 4 / 2 + 2 / 3) = 10/3 / 14/3.
    sqrt = fsq.timing.fixed([1, 1, 2, 2, 2, 2, 3, 3])
    assert sqrt.mean_staleness() == pytest.approx(5 / 7)
    assert sqrt.mean_staleness(8) == pytest.approx(5 / 7)
    assert fsq.timing.stragglers(8, [7], factor=10).mean_staleness() == pytest.approx(0.9 / 7.1)
    assert fsq.timing.fixed([1, 1, 1]).mean_staleness() == 0.0  # synchronous speed
    # Random durations: a geometric mean of 4 ticks (truncation far away) is 3 steps stale,
    # 1/4 of a gradient a tick: (0 + 3/4) / (1 + 1/4).
    exponential = fsq.timing.exponential([1.0, 4.0], max_ticks=4096)
    assert exponential.mean_staleness() == pytest.approx(0.6, rel=1e-6)
    with pytest.raises(ValueError, match="num_workers must be the model's 8, got 4"):
        sqrt.mean_staleness(4)
    with pytest.raises(ValueError, match="num_workers must be given"):
        fsq.timing.Fixed(max_ticks=1).mean_staleness()


def test_the_study_method_measures_the_staleness_it_assumes_in_time():
    """Under the straggler profile the run's measured staleness is the rule's estimate
    (``ComputeModel.mean_staleness``): 7 workers of 1 tick are never stale, one of 10 ticks
    is 9 steps stale 1/10 of a tick: 0.9 / 7.1."""
    from experiments.studies import base, protocols

    size = protocols.SIZES["tiny"]._replace(
        tuning=(), methods=(METHOD,), asynchrony=("profile straggler",), retuned=()
    )
    rows = protocols.run(base.Settings(scale="tiny", progress=False, sizes={"protocols": size}))
    (timed,) = [r for r in rows if r.delay == "profile straggler"]
    assert timed.mean_staleness == pytest.approx(0.9 / 7.1, abs=0.02)
    assert not timed.diverged
