"""A small causal transformer language model (Flax NNX) on Markov-chain tokens.

The model is written in NNX style (a mutable ``nnx.Module``); the trainer needs pure
functions of a pytree, so the task splits it once into a static graph definition and
its parameter state, a plain pytree that any optax transformation (Flying Squirrel
included) updates, and merges them back inside the loss::

    graphdef, state = nnx.split(model)      # state: an nnx.State pytree of arrays
    logits = nnx.merge(graphdef, state)(tokens)

The data are fresh sequences of a random first-order Markov chain
(:mod:`experiments.tasks.markov`), so the test loss has an exact floor: the chain's
entropy rate.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from experiments.tasks import markov
from experiments.tasks.base import Task

VOCAB, CONCENTRATION, CHAIN_SEED = 16, 0.5, 0
LENGTH, WIDTH, HEADS, LAYERS = 16, 16, 2, 2
TEST_SEQUENCES = 1024


class Block(nnx.Module):
    """Pre-norm residual block: causal self-attention, then a GELU MLP (4x wide)."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        self.attention_norm = nnx.LayerNorm(width, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=heads, in_features=width, decode=False, rngs=rngs
        )
        self.mlp_norm = nnx.LayerNorm(width, rngs=rngs)
        self.mlp_in = nnx.Linear(width, 4 * width, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
        h = h + self.attention(self.attention_norm(h), mask=mask)
        return h + self.mlp_out(nnx.gelu(self.mlp_in(self.mlp_norm(h))))


class Transformer(nnx.Module):
    """Token and learned position embeddings, ``layers`` blocks, a linear head."""

    def __init__(
        self, vocab: int, length: int, width: int, heads: int, layers: int, *, rngs: nnx.Rngs
    ):
        self.token = nnx.Embed(vocab, width, rngs=rngs)
        self.position = nnx.Embed(length, width, rngs=rngs)
        self.blocks = nnx.List([Block(width, heads, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, vocab, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``[batch, length]`` tokens -> ``[batch, length, vocab]`` next-token logits."""
        h = self.token(tokens) + self.position(jnp.arange(tokens.shape[-1]))
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.norm(h))


def pure(make: Callable[[nnx.Rngs], nnx.Module]) -> tuple[Callable, Callable]:
    """``(init, apply)``: an NNX module as functions of its state, a plain pytree.

    ``init(key)`` builds the module from ``key`` and returns its state; ``apply(state,
    *args)`` merges it with the graph definition (taken once, abstractly) and calls it.
    """
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(nnx.Rngs(0))))

    def init(key: jax.Array) -> nnx.State:
        return nnx.state(make(nnx.Rngs(key)))

    def apply(state: nnx.State, *args: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(*args)

    return init, apply


def task(
    vocab: int = VOCAB,
    length: int = LENGTH,
    width: int = WIDTH,
    heads: int = HEADS,
    layers: int = LAYERS,
    test_sequences: int = TEST_SEQUENCES,
) -> Task:
    """Next-token cross-entropy on sequences of ``length`` tokens of a random chain.

    Every position but the last predicts the following token; the loss floor is the
    chain's entropy rate (:func:`experiments.tasks.markov.entropy_rate`).
    """
    chain = markov.random_chain(vocab, CONCENTRATION, CHAIN_SEED)
    init, apply = pure(lambda rngs: Transformer(vocab, length - 1, width, heads, layers, rngs=rngs))
    test_tokens = markov.sample(chain, jax.random.key(2**31 - 1), test_sequences, length)

    def sample(key, size):
        return markov.sample(chain, key, size, length)

    def loss(params, tokens):
        logits = apply(params, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean(-1)

    def evaluate(params):
        return {"test_loss": loss(params, test_tokens).mean()}

    return Task(
        "transformer", init, loss, sample, evaluate, "test_loss", markov.entropy_rate(chain)
    )
