r"""A random first-order Markov chain over a small vocabulary, and its exact entropy rate.

For a chain with transition matrix :math:`P` and stationary distribution :math:`\pi`
(:math:`\pi P = \pi`), started from :math:`\pi`, the cross-entropy of any predictor of the
next token given the past is at least the entropy rate

.. math::

  H = -\sum_i \pi_i \sum_j P_{ij} \log P_{ij} \quad \text{nats per token,}

reached by the predictor :math:`P_{x_t, \cdot}`: the exact loss floor of a language model
trained on the chain's sequences.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class MarkovChain(NamedTuple):
    """Attributes: ``transition`` ``[V, V]`` (rows sum to 1), ``stationary`` ``[V]``."""

    transition: np.ndarray
    stationary: np.ndarray


def stationary_distribution(transition: np.ndarray) -> np.ndarray:
    """The left eigenvector of ``transition`` for eigenvalue 1, normalized to sum to 1."""
    values, vectors = np.linalg.eig(transition.T)
    v = np.real(vectors[:, np.argmin(np.abs(values - 1.0))])
    return v / v.sum()


def random_chain(vocab: int, concentration: float, seed: int) -> MarkovChain:
    """A chain whose rows are drawn from a symmetric Dirichlet(``concentration``)."""
    rng = np.random.default_rng(seed)
    transition = rng.dirichlet(np.full(vocab, concentration), size=vocab)
    return MarkovChain(transition, stationary_distribution(transition))


def entropy_rate(chain: MarkovChain) -> float:
    """:math:`H` in nats per token (with :math:`0 \\log 0 = 0`)."""
    p = chain.transition
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return float(-chain.stationary @ plogp.sum(axis=1))


def sample(chain: MarkovChain, key: jax.Array, num_sequences: int, length: int) -> jax.Array:
    """``[num_sequences, length]`` int32 tokens, each sequence started from :math:`\\pi`."""
    log_p = jnp.log(jnp.asarray(chain.transition, jnp.float32))
    first_key, key = jax.random.split(key)
    first = jax.random.categorical(
        first_key, jnp.log(jnp.asarray(chain.stationary, jnp.float32)), shape=(num_sequences,)
    )

    def step(tokens, step_key):
        following = jax.random.categorical(step_key, log_p[tokens])
        return following, following

    _, rest = jax.lax.scan(step, first, jax.random.split(key, length - 1))
    return jnp.concatenate([first[:, None], rest.T], axis=1).astype(jnp.int32)
