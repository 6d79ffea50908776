"""How the test suite compiles: without LLVM's optimizations, unless ``XLA_FLAGS`` sets a
level of its own.

Compiling is most of the suite's time on CPU, and LLVM's optimizations most of compiling:
without them the suite takes three quarters of the time. Optimized code rounds differently
in the last bits, so the recorded trajectories hold one recording for each rounding
(:mod:`tests.trajectories`); ``XLA_FLAGS=--xla_backend_optimization_level=3`` (what runs
otherwise) tests the optimized code. Call before JAX's backend starts; subprocesses
inherit the flag.
"""

import os


def unoptimized() -> None:
    """Adds ``--xla_backend_optimization_level=0`` to ``XLA_FLAGS`` unless it sets a level."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
