"""The interface every task implements: a model, its data, its loss and its metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

Params = Any
Batch = Any


class Task(NamedTuple):
    """A learning problem as pure functions, ready to ``vmap`` over runs and workers.

    Attributes:
      name: the task's name in records and reports.
      init: ``key -> params``, a pytree of arrays.
      loss: ``(params, batch) -> [batch size]`` per-example losses (the trainer averages).
      sample: ``(key, batch size) -> batch``: one worker's minibatch; the trainer derives
        the key from ``(seed, step, worker)``.
      evaluate: ``params -> {metric: scalar}``: always ``"test_loss"``, plus
        ``"test_accuracy"`` for classifiers.
      metric: the headline metric, ``"test_accuracy"`` (higher is better) or
        ``"test_loss"`` (lower is better).
      loss_floor: the exact minimum of the expected loss where it is known (the quadratic's
        noise, the Markov chain's entropy rate), else ``None``.
      sample_shard: ``(key, batch size, worker, num_workers) -> batch``: worker's minibatch
        from its own shard of the data (non-i.i.d. workers); ``None``: every worker samples
        from all of it with ``sample``.
    """

    name: str
    init: Callable[[jax.Array], Params]
    loss: Callable[[Params, Batch], jax.Array]
    sample: Callable[[jax.Array, int], Batch]
    evaluate: Callable[[Params], dict[str, jax.Array]]
    metric: str = "test_loss"
    loss_floor: float | None = None
    sample_shard: Callable[[jax.Array, int, jax.Array, int], Batch] | None = None
