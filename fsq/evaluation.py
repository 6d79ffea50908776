r"""Evaluation over the devices of a mesh: any batch size, metrics weighted by examples.

The batch is split over the devices along its leading (example) axis and padded to a
multiple of their number by repeating its last example; the padding is masked out, so a
metric is the mean over the :math:`n` real examples whatever :math:`n`:

.. math:: \bar m = \frac{1}{n} \sum_{j=1}^{n} m(x_j)

:mod:`fsq.parallel` exports :func:`evaluator`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fsq._layout import make_mesh
from fsq._sharding import DEVICE_AXIS, check_mesh, model_axes

MetricFn = Callable[[Any, Any], dict[str, jax.Array]]


def evaluator(
    metric_fn: MetricFn, *, mesh: jax.sharding.Mesh | None = None
) -> Callable[[Any, Any], dict[str, jax.Array]]:
    """The jitted evaluation of ``metric_fn`` over ``mesh``.

    Args:
      metric_fn: ``(params, batch) -> {name: [n] per-example values}`` (for example the
        cross-entropy and the correctness of each example); ``params`` is whatever the
        evaluation is given (parameters, or parameters and model state).
      mesh: a mesh from :func:`fsq.parallel.make_mesh` (default: all devices), such as a
        :class:`fsq.parallel.DataParallel`'s ``mesh``. The examples are split over its
        worker axis; with model axes, the parameters are used as they are sharded (the
        state of a :class:`fsq.parallel.DataParallel`), else replicated.

    Returns:
      ``evaluate(params, batch) -> {name: mean over the examples}``. ``batch`` is a
      pytree of arrays with the same leading size :math:`n \\ge 1`, given whole (in a
      multi-process job, the same on every process); each distinct :math:`n` compiles
      once.

    Example:
      >>> import jax.numpy as jnp, numpy as np, fsq
      >>> evaluate = fsq.parallel.evaluator(
      ...     lambda w, b: {"error": jnp.abs(b["x"] @ w - b["y"])},
      ...     mesh=fsq.parallel.make_mesh(4))
      >>> batch = {"x": np.ones((5, 2), np.float32), "y": np.arange(5, dtype=np.float32)}
      >>> print(evaluate(jnp.ones(2), batch)["error"])  # the mean of |2 - y| over the 5 examples
      1.2
    """
    mesh = make_mesh() if mesh is None else check_mesh(mesh)
    num_devices = mesh.shape[DEVICE_AXIS]
    split, whole = NamedSharding(mesh, P(DEVICE_AXIS)), NamedSharding(mesh, P())
    # With model axes the parameters keep their own sharding (None: the argument's).
    on_params = None if model_axes(mesh) else whole

    def sums(params, batch, real):
        values = metric_fn(params, batch)
        if not isinstance(values, dict):
            raise TypeError(
                f"metric_fn must return a dict of per-example values, got {type(values).__name__}"
            )
        for name, value in values.items():
            if jnp.ndim(value) != 1 or jnp.shape(value)[0] != real.shape[0]:
                raise ValueError(
                    f"metric {name!r} must hold one value per example, shape "
                    f"[{real.shape[0]}], got {jnp.shape(value)}: return per-example values "
                    "(e.g. no .mean()), which the evaluation weights by example"
                )
        total = {name: jnp.sum(jnp.where(real, v, 0)) for name, v in values.items()}
        return total, jnp.sum(real)

    run = jax.jit(sums, in_shardings=(on_params, split, split), out_shardings=whole)

    def evaluate(params: Any, batch: Any) -> dict[str, jax.Array]:
        leaves = [np.asarray(x) for x in jax.tree.leaves(batch)]
        sizes = {x.shape[0] if x.ndim else None for x in leaves}
        if len(sizes) != 1 or None in sizes or 0 in sizes:
            raise ValueError(
                "batch leaves must share one leading (example) axis of size >= 1, got "
                f"shapes {[x.shape for x in leaves]}"
            )
        (n,) = sizes
        padded = -(-n // num_devices) * num_devices
        rows = np.minimum(np.arange(padded), n - 1)  # the last example repeated

        def put(x):
            return jax.make_array_from_callback(x.shape, split, lambda index: x[index])

        batch = jax.tree.unflatten(jax.tree.structure(batch), [put(x[rows]) for x in leaves])
        total, count = run(params, batch, put(np.arange(padded) < n))
        return {name: value / count for name, value in total.items()}

    return evaluate
