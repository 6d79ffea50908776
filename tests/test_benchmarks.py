"""The benchmarks' measuring helpers (the benchmarks themselves are scripts, not tests)."""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing


def test_profile_finds_the_operations_of_the_compiled_program():
    step = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jnp.ones((128, 128))
    hlo = step.lower(x).compile().as_text()
    rows = timing.profile(lambda: step(x), steps=4)
    names = [row["operation"] for row in rows]
    # Some operation of the compiled program is listed, and it ran once per call.
    ran = [row for row in rows if f"%{row['operation']} " in hlo]
    assert ran, names
    np.testing.assert_allclose([row["runs_per_call"] for row in ran], 1.0)
    assert all(row["ms_per_call"] >= 0 for row in rows)


def test_median_seconds_times_every_candidate():
    calls = {"a": 0, "b": 0}

    def count(name):
        calls[name] += 1
        return jnp.zeros(())

    medians = timing.median_seconds({n: lambda n=n: count(n) for n in calls}, repeats=5, warmup=2)
    assert set(medians) == {"a", "b"} and all(t >= 0 for t in medians.values())
    assert calls == {"a": 7, "b": 7}
