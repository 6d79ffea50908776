"""Training tasks behind one interface (:class:`Task`), built by name with :func:`get`.

=============== ============================================ ==============================
task            model                                        data
=============== ============================================ ==============================
``quadratic``   linear least squares, condition number 100   Gaussian, known optimum
``logistic``    logistic regression (Flax Linen)             MNIST-1D
``mlp``         MLP 40-100-100-10 (Flax Linen)               MNIST-1D
``cnn``         the MNIST-1D paper's 1-D CNN (Flax Linen)    MNIST-1D
``transformer`` causal transformer LM (Flax NNX)             first-order Markov chain
=============== ============================================ ==============================

Building a task generates its data (MNIST-1D takes a few seconds), so :func:`get` imports
and builds each on first use, once.
"""

from __future__ import annotations

import functools
import importlib

from experiments.tasks.base import Batch, Params, Task

NAMES = ("quadratic", "logistic", "mlp", "cnn", "transformer")


@functools.cache
def get(name: str) -> Task:
    """The task called ``name`` (one of :data:`NAMES`) at its default size."""
    if name not in NAMES:
        raise ValueError(f"task must be one of {NAMES}, got {name!r}")
    return importlib.import_module(f"experiments.tasks.{name}").task()


__all__ = ["NAMES", "Batch", "Params", "Task", "get"]
