"""Tests run on 8 simulated CPU devices; this must happen before JAX's backend starts."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
