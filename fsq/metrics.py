r"""The transform's per-step metrics, read from the optimizer state, as one flat dict.

Every :class:`fsq.FlyingSquirrelState` in the state (several, for an
``optax.multi_transform`` of assemblies such as :func:`fsq.streaming_diloco`'s
fragments) counts what happened at the last step; :func:`step_metrics` adds them up:

.. math::

   \text{staleness} = \frac{\sum_a n_a \bar s_a}{\max(1, \sum_a n_a)}

with :math:`n_a` the gradients assembly :math:`a` delivered and :math:`\bar s_a` their
mean staleness. With a clock (:func:`fsq.transforms.clock`) the simulated ``time`` and
the workers' ``utilisation`` are added.

Example:
  >>> import jax, jax.numpy as jnp, fsq
  >>> tx = fsq.flying_squirrel(fsq.sgd(0.1), num_workers=2, delay=1, compensation=None)
  >>> workers = fsq.parallel.vmap_workers(tx, num_workers=2)
  >>> state = workers.init(jnp.zeros(3))
  >>> for _ in range(2):
  ...     _, state = workers.update(jnp.ones((2, 3)), state, jnp.zeros(3))
  >>> metrics = fsq.step_metrics(state)
  >>> int(metrics["delivered"]), float(metrics["staleness"]), float(metrics["bytes_sent"])
  (2, 1.0, 12.0)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fsq.assembly import FlyingSquirrelState
from fsq.transforms.clock import Schedule

COUNTS = ("delivered", "bounded", "rejected", "lost", "discarded")


def step_metrics(opt_state: Any) -> dict[str, jax.Array]:
    """The metrics of the last step of every Flying Squirrel transform in ``opt_state``.

    Args:
      opt_state: an optimizer state holding one or more :class:`fsq.FlyingSquirrelState`
        (anywhere: inside ``optax.chain``, ``optax.multi_transform``, a
        :class:`fsq.parallel.TrainState`'s ``opt_state``).

    Returns:
      ``delivered``, ``bounded``, ``rejected``, ``lost``, ``discarded`` (counts at the last
      step, summed over the transforms), ``staleness`` (mean over the delivered gradients),
      ``bytes_sent`` (per worker and step, summed over the transforms), and with a clock
      ``time`` (simulated seconds) and ``utilisation``; scalar arrays.

    Raises:
      ValueError: if ``opt_state`` holds no Flying Squirrel state.
    """
    states = _all(opt_state, FlyingSquirrelState)
    if not states:
        raise ValueError(
            "opt_state holds no fsq.FlyingSquirrelState: step_metrics reads the state of a "
            "transform built by fsq.flying_squirrel (or fsq.asynchronous, or a preset on them)"
        )
    metrics = {name: sum(getattr(s, name) for s in states) for name in COUNTS}
    ages = sum(s.staleness * s.delivered for s in states)
    metrics["staleness"] = ages / jnp.maximum(metrics["delivered"], 1)
    metrics["bytes_sent"] = sum(s.bytes_sent for s in states)
    clocks = _all(opt_state, Schedule)
    if clocks:  # one clock times every worker of an assembly: the first one's
        metrics["time"] = clocks[0].time
        metrics["utilisation"] = clocks[0].utilisation
    return metrics


def _all(tree: Any, kind: type) -> list[Any]:
    nodes = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kind))
    return [x for x in nodes if isinstance(x, kind)]
