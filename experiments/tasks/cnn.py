"""The MNIST-1D paper's 1-D convolutional network (Flax Linen).

Three convolutions of 25 channels (kernel 5, then 3 and 3; stride 2, padding 1; ReLU) take
the 40-sample signal to 5 positions, and a linear layer maps the 125 features to 10 classes,
as in the paper's ``ConvBase``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments import mnist1d
from experiments.tasks.base import Task


class StridedConv(nn.Module):
    """A 1-D convolution, stride 2 and zero padding 1, as a dense layer on patches.

    The same function as ``nn.Conv(features, (kernel,), strides=2, padding=((1, 1),))``
    (kernel entry ``[k, c, f]`` at row ``k * channels + c``), written as patches times a
    matrix because the trainer vmaps over runs: a convolution with per-run kernels
    becomes a grouped convolution, which is slower on CPU than a batched matrix product.
    """

    features: int
    kernel: int

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        """``[batch, n, channels]`` -> ``[batch, (n + 2 - kernel) // 2 + 1, features]``."""
        h = jnp.pad(h, ((0, 0), (1, 1), (0, 0)))
        stop = h.shape[1] - self.kernel + 1
        patches = jnp.concatenate([h[:, k : k + stop : 2] for k in range(self.kernel)], -1)
        return nn.Dense(self.features)(patches)


class CNN(nn.Module):
    """Conv(5) -> Conv(3) -> Conv(3), stride 2, ReLU, then a linear classifier."""

    channels: int = 25
    kernels: Sequence[int] = (5, 3, 3)
    classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = x[..., None]  # [batch, length, 1 channel]
        for kernel in self.kernels:
            h = nn.relu(StridedConv(self.channels, kernel)(h))
        return nn.Dense(self.classes)(h.reshape(h.shape[0], -1))


def task(data: mnist1d.Dataset | None = None) -> Task:
    """The CNN on MNIST-1D (about 94% test accuracy in the paper)."""
    return mnist1d.classifier("cnn", CNN(), data)
