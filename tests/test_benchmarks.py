"""The benchmarks' measuring helpers, and that the device script runs (the benchmarks
themselves are scripts: no timing is asserted)."""

import json

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


def test_device_script_runs_every_part_and_writes_one_json(tmp_path):
    """``python -m benchmarks.device --smoke`` on the CPU: every part runs in its own
    process, saves its results beside the others (not into benchmarks/results) and lands in
    the one JSON with its device."""
    from benchmarks import device

    checked_in = timing.pathlib.Path(timing.__file__).parent / "results"
    before = {p: p.stat().st_mtime for p in checked_in.glob("*")}
    out = tmp_path / "device.json"
    payload = device.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == payload
    assert payload["device"]["backend"] == jax.default_backend()
    assert set(payload["parts"]) == set(device.FULL)
    for name, part in payload["parts"].items():
        assert part["returncode"] == 0, (name, part.get("output_tail"))
        assert part["seconds"] > 0
    saved = {name: set(part["results"]) for name, part in payload["parts"].items()}
    assert saved["limit"] == {"limit"} and saved["overhead_vmap"] == {"overhead_vmap"}
    assert saved["throughput_time"] == {"throughput_time"}
    rows = payload["parts"]["limit"]["results"]["limit"]["rows"]
    assert {row["step"] for row in rows} >= {"large batch", "delay 0, defaults"}
    assert all(row["median_ms"] > 0 for row in rows)
    assert {p: p.stat().st_mtime for p in checked_in.glob("*")} == before
