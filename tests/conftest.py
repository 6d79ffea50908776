"""Tests run on 8 simulated CPU devices, compiled unoptimized (:mod:`tests._compile`); both
must happen before JAX's backend starts.

Hypothesis draws its examples from a fixed seed (``derandomize``), so that a run of the
suite, in CI or here, is the same run every time.
"""

import hypothesis
import jax

from tests import _compile

_compile.unoptimized()
jax.config.update("jax_num_cpu_devices", 8)

hypothesis.settings.register_profile("deterministic", derandomize=True, database=None)
hypothesis.settings.load_profile("deterministic")
