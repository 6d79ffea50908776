"""Tests run on 8 simulated CPU devices; this must happen before JAX's backend starts.

Hypothesis draws its examples from a fixed seed (``derandomize``), so that a run of the
suite, in CI or here, is the same run every time.
"""

import os

# Compiling is most of the suite's time on CPU, and LLVM's optimizations most of compiling:
# without them the suite takes three quarters of the time (subprocesses inherit the flag).
# Optimized code rounds differently in the last bits; the recorded trajectories hold one
# recording for each (tests/test_trajectories.py). XLA_FLAGS with a level of its own (3 is
# what runs otherwise) tests the optimized code instead.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_backend_optimization_level=0".strip()

import hypothesis  # noqa: E402
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

hypothesis.settings.register_profile("deterministic", derandomize=True, database=None)
hypothesis.settings.load_profile("deterministic")
