"""Multinomial logistic regression on MNIST-1D (Flax Linen): 40 inputs, 10 classes."""

from __future__ import annotations

import flax.linen as nn

from experiments import mnist1d
from experiments.tasks.base import Task


def task(data: mnist1d.Dataset | None = None) -> Task:
    """The MNIST-1D paper's linear baseline (about 32% test accuracy)."""
    return mnist1d.classifier("logistic", nn.Dense(10), data)
