"""The MNIST-1D paper's MLP (Flax Linen, :class:`experiments.mnist1d.MLP`): 40-100-100-10."""

from __future__ import annotations

from experiments import mnist1d
from experiments.tasks.base import Task


def task(data: mnist1d.Dataset | None = None) -> Task:
    """The MLP on MNIST-1D (about 68% test accuracy in the paper)."""
    return mnist1d.classifier("mlp", mnist1d.MLP(), data)
