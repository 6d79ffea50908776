"""The plain MLP the benchmarks train: a list of (weight, bias) layers, ReLU, softmax CE."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax


def init(sizes: Sequence[int], seed: int = 0) -> list[tuple[jax.Array, jax.Array]]:
    """He-style scaled Gaussian weights and zero biases for layer widths ``sizes``."""
    keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
    return [
        (jax.random.normal(k, (a, b)) / a**0.5, jnp.zeros(b))
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def num_params(params: list[tuple[jax.Array, jax.Array]]) -> int:
    return sum(w.size + b.size for w, b in params)


def loss(params: list[tuple[jax.Array, jax.Array]], batch: tuple[jax.Array, jax.Array]):
    """Mean softmax cross-entropy of ``batch = (inputs, integer labels)``."""
    x, y = batch
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    logits = x @ params[-1][0] + params[-1][1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
