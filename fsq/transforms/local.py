r"""Local steps: each worker trains its own copy of the parameters and sends what it learnt.

A worker keeps its own parameters :math:`w_i`, takes local steps with a local optimizer
on its own gradients, and every :math:`H_i` local steps sends its *pseudo-gradient*

.. math::

  \Delta_i = a_i - w_i = -\sum_{h=1}^{H_i} u_i^{(h)}, \qquad
  w_i \leftarrow w_i + u_i^{(h)},\quad u_i^{(h)} = \mathrm{local}(g_i(w_i)),

:math:`a_i` the global parameters it last pulled (its *anchor*). The delivered mean of
the :math:`\Delta_i` is what the outer optimizer (the assembly's inner one) steps on
(local SGD; DiLoCo, Douillard et al. 2023). After sending, the worker pulls the global
parameters:

- ``mixing=None`` — at the next tick (asynchronous local SGD, Liu et al. 2024; DiLoCo
  when the pseudo-gradients travel without delay): :math:`w_i \leftarrow w_{t+1}`.
- ``mixing=`` :math:`\alpha` — when its own pseudo-gradient has been applied, :math:`d`
  ticks later (streaming DiLoCo's overlapped communication, Douillard et al. 2025); it
  keeps training meanwhile, and mixes: :math:`w_i \leftarrow \alpha\, w_i + (1 - \alpha)\,
  w_{t+d+1}`.

The state stores :math:`a_i` and the local progress :math:`p_i = w_i - a_i` as the sum of
the local updates, so that :math:`\Delta_i = -p_i` is exact: with :math:`H = 1` and a local
``optax.sgd(1.0)``, :math:`\Delta_i = g_i` bit for bit, and the assembly is the one without
local steps. On ticks without a send the worker's message is *idle* (it carries nothing);
a worker that is down or computed a non-finite gradient takes no local step (place the
piece after :func:`~fsq.transforms.liveness`, :func:`~fsq.transforms.reject_non_finite`
and :func:`~fsq.transforms.clock`).

The training loop computes each worker's gradient at :math:`w_i`: :class:`LocalState`
says where (:meth:`LocalState.worker_params`), and :func:`fsq.parallel.workers_step`
asks every state that can. Memory: :math:`2P` per worker plus the local optimizer's
state (:math:`W/D` of each per device).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fsq import _checks, _sharding
from fsq.transforms.message import (
    SendTransformation,
    Status,
    accumulation_dtype,
    keep_if_sent,
)


def _is_absent(x: Any) -> bool:
    """A leaf this state does not hold (``optax.masked`` / ``multi_transform`` leave these)."""
    return isinstance(x, optax.MaskedNode)


class LocalState(NamedTuple):
    r"""State of :func:`local_steps`, each worker's own.

    Attributes:
      local_state: the local optimizer's state.
      anchor: the global parameters the worker last pulled, :math:`a_i`.
      progress: its local progress since, :math:`p_i = w_i - a_i` (at least float32).
      count: local steps since its last send (int32).
      pull_pending: whether it pulls the global parameters when the countdown is over.
      pull_countdown: ticks until it may pull (int32).
      mixing: :math:`\alpha` of the pull (float32; 0 restarts from the global parameters).
    """

    local_state: optax.OptState
    anchor: optax.Params
    progress: optax.Updates
    count: jax.Array
    pull_pending: jax.Array
    pull_countdown: jax.Array
    mixing: jax.Array

    def pulled(self, params: optax.Params) -> LocalState:
        """The state after the pull due at this tick, if any; ``params`` the global ones."""
        pull = self.pull_pending & (self.pull_countdown == 0)

        def progress_after(anchor, progress, w):
            own = anchor.astype(progress.dtype) + progress
            # Exactly zero when the worker restarts (mixing 0), whatever its progress.
            mixed = jnp.where(self.mixing == 0, 0, self.mixing * (own - w.astype(own.dtype)))
            return jnp.where(pull, mixed, progress)

        return self._replace(
            anchor=jax.tree.map(lambda a, w: jnp.where(pull, w, a), self.anchor, params),
            progress=jax.tree.map(progress_after, self.anchor, self.progress, params),
            pull_pending=self.pull_pending & ~pull,
        )

    def own_params(self) -> optax.Params:
        """The worker's parameters :math:`a_i + p_i`, in the anchor's dtypes."""
        return jax.tree.map(
            lambda a, p: (a.astype(p.dtype) + p).astype(a.dtype), self.anchor, self.progress
        )

    def worker_params(self, params: optax.Params) -> optax.Params:
        """The parameters this worker computes its gradient at, given the global ``params``:
        the leaves it holds its own copy of are replaced, the others passed through.

        This is the protocol :func:`fsq.parallel.workers_step` reads: any state with a
        ``worker_params`` method takes part, and several compose (each replaces its own
        leaves, e.g. the fragments of :func:`fsq.streaming_diloco`)."""
        flat, treedef = jax.tree.flatten(params)
        held, structure = jax.tree.flatten(self.anchor, is_leaf=_is_absent)
        if len(held) != len(flat):
            raise ValueError(
                f"params have {len(flat)} leaves where the local state holds {len(held)}"
            )
        mine = structure.unflatten(
            [h if _is_absent(h) else p for p, h in zip(flat, held, strict=True)]
        )
        own = jax.tree.leaves(self.pulled(mine).own_params(), is_leaf=_is_absent)
        return treedef.unflatten(
            [p if _is_absent(o) else o for p, o in zip(flat, own, strict=True)]
        )


def _steps(steps: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(steps, (int, np.integer)):
        return (_checks.integer("steps", steps, low=1),)
    values = tuple(_checks.integer("steps", s, low=1) for s in steps)
    if not values:
        raise ValueError("steps must be a positive int or a non-empty sequence of them")
    return values


def local_steps(
    local: optax.GradientTransformation,
    steps: int | Sequence[int],
    *,
    offset: int = 0,
    mixing: float | None = None,
) -> SendTransformation:
    r"""Each worker takes ``steps`` local steps with ``local``, then sends its pseudo-gradient.

    See the module for the math.

    Args:
      local: the local (inner) optimizer, any optax transformation; its state is each
        worker's own and persists across rounds (as DiLoCo's AdamW state does).
      steps: :math:`H \ge 1` local steps between sends, or one per worker (a sequence of
        :math:`W`; dynamic local updates give fast workers more).
      offset: the first send comes after ``offset`` local steps (``0``: after
        :math:`H`); streaming DiLoCo staggers its fragments with it. In ``[0, H)``.
      mixing: ``None`` to restart from the global parameters at the tick after sending;
        :math:`\alpha \in [0, 1]` to keep training until the pseudo-gradient is applied
        and then mix (its delay must then be shorter than :math:`H`).

    Returns:
      A :class:`~fsq.transforms.SendTransformation` whose state is :class:`LocalState`.

    Example:
      Two local SGD steps per send: the pseudo-gradient is minus the sum of the two
      updates, :math:`0.5 \cdot 1 + 0.5 \cdot 3`; the first tick's message is idle.

      >>> import jax.numpy as jnp, optax, fsq
      >>> piece = fsq.transforms.local_steps(optax.sgd(0.5), steps=2)
      >>> context = fsq.transforms.Context(jnp.int32(0), jnp.int32(0), 1, 0, 0)
      >>> params = jnp.zeros(1)
      >>> state = piece.init(params, context)
      >>> for g in (1.0, 3.0):
      ...     m = fsq.transforms.new_message(jnp.array([g]), 0, jnp.float32)
      ...     m, state = piece.update(m, state, params, context)
      ...     print(fsq.transforms.Status(int(m.status)).name, m.gradient)
      IDLE [0.5]
      SENT [2.]
    """
    local = _checks.transformation("local", local)
    per_worker = _steps(steps)
    offset = _checks.integer("offset", offset, low=0, high=min(per_worker) - 1)
    alpha = (
        None
        if mixing is None
        else _checks.scalar(_checks.real_in_range("mixing", mixing, 0.0, 1.0))
    )

    def worker_steps(context) -> jax.Array:
        if len(per_worker) == 1:
            return jnp.int32(per_worker[0])
        return jnp.asarray(per_worker, jnp.int32)[context.worker]

    def init(params, context):
        if len(per_worker) not in (1, context.num_workers):
            raise ValueError(
                f"steps must be one int or one per worker ({context.num_workers}), "
                f"got {len(per_worker)}"
            )
        if alpha is not None and min(per_worker) <= context.max_delay:
            raise ValueError(
                f"with mixing, steps ({min(per_worker)}) must exceed the largest delay "
                f"({context.max_delay}): a worker would send again before its last "
                "pseudo-gradient is applied"
            )
        dtype = accumulation_dtype(params)
        progress = jax.tree.map(lambda p: _sharding.zeros((), p, dtype), params)
        first = (min(per_worker) - offset) % min(per_worker)
        return LocalState(
            local_state=local.init(params),
            anchor=jax.tree.map(jnp.asarray, params),
            progress=progress,
            count=jnp.int32(first),
            pull_pending=jnp.bool_(False),
            pull_countdown=jnp.int32(0),
            mixing=jnp.float32(0.0 if alpha is None else alpha),
        )

    def update(message, state, params, context):
        active = message.sent
        pulled = state.pulled(params)
        w = pulled.own_params()
        gradient = jax.tree.map(lambda g, p: g.astype(p.dtype), message.gradient, w)
        local_update, local_state = local.update(gradient, pulled.local_state, w)
        progress = jax.tree.map(lambda p, u: p + u.astype(p.dtype), pulled.progress, local_update)
        count = pulled.count + 1
        send = count >= worker_steps(context)
        delta = jax.tree.map(lambda p, g: (-p).astype(g.dtype), progress, message.gradient)
        countdown = jnp.maximum(pulled.pull_countdown - 1, 0)
        stepped = pulled._replace(
            local_state=local_state,
            progress=progress,
            count=jnp.where(send, 0, count),
            pull_pending=pulled.pull_pending | send,
            pull_countdown=jnp.where(send, 0 if alpha is None else message.delay, countdown),
        )
        # An inactive worker (down, busy, rejected) keeps its state; the countdown runs.
        new_state = keep_if_sent(message, stepped, state._replace(pull_countdown=countdown))
        # A tick without a send carries nothing: it is idle, not lost or rejected.
        message = message.with_gradient(delta).mark(Status.IDLE, ~(send & active))
        return message, new_state

    return SendTransformation(init, update, needs_context=True)
