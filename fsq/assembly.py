r"""The assembly of an asynchronous data-parallel optimizer from named pieces.

.. code-block:: text

  worker side (per worker, own state)     delay line (the only collectives)   delivery side
  liveness -> reject non-finite ->        ring of due rows, dense or sparse   robust aggregation ->
  worker momentum -> attack ->            exchange, one collective per step   compensation ->
  staleness bound -> compression + EF ->                                      normalise -> inner
  staleness weights -> DC channels

:func:`asynchronous` runs, for each worker and step, the worker-side pieces on the
worker's gradient (any optax transformation may run there too), sends the resulting
:class:`~fsq.transforms.Message` through the delay line, and, at a step where anything
is delivered, runs the delivery-side pieces on the :class:`~fsq.transforms.Arrival` and
steps the inner optimizer on the result. :func:`fsq.flying_squirrel` is a preset over it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fsq import _axes, _checks
from fsq.placement import PerWorker
from fsq.transforms import line as _line
from fsq.transforms import pairs, ring, wire
from fsq.transforms import pipeline as _pipeline
from fsq.transforms.message import (
    Context,
    DeliverTransformation,
    Layout,
    SendTransformation,
    Status,
    accumulation_dtype,
    new_message,
)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class RowSharing:
    """Whether the messages a device's workers send at a step all travel alike (the same
    delay, into one ring row) through pieces that let one sum stand for them
    (:attr:`fsq.transforms.SendTransformation.summable`): static, a pytree without leaves."""

    shared: bool = False


class FlyingSquirrelState(NamedTuple):
    """State of :func:`asynchronous` (and :func:`fsq.flying_squirrel`), held by every worker.

    Attributes:
      step: the logical clock :math:`t` (int32), identical on all workers.
      worker_states: the states of the worker-side pieces, in order: each worker's own
        (:class:`fsq.placement.PerWorker`; e.g. an error-feedback residual), or the same on
        every worker for a piece whose state is shared (the clock's schedule).
      in_flight: the messages in flight from this device's workers
        (:class:`fsq.transforms.InFlight`, per device).
      delivery_states: the states of the delivery-side pieces, in order, identical on all
        workers (e.g. the votes of a robust rule, the mean square of DC-ASGD-a).
      inner_state: state of the inner optimizer, identical on all workers.
      delivered: how many gradients were delivered at the last step (int32).
      staleness: their mean staleness :math:`t - s` in steps (float32; 0 if none).
      bounded: how many gradients due at the last step the staleness bound dropped or
        held back (int32).
      rejected: how many gradients due at the last step were rejected at send time for
        not being finite (int32); they never reach the parameters or any state.
      lost: how many gradients due at the last step were never sent, their worker being
        down (int32).
      discarded: how many gradients due at the last step a coordination policy discarded
        (int32; :func:`fsq.transforms.clock`).
      bytes_sent: the bytes a worker's message takes on the wire per step (float32; the
        dense float32 gradient is ``4 P``), whatever the exchange simulates it with.
      rows: whether a device's workers share a ring row at every step, so that their
        gradients may be sent as one sum (:meth:`sums_workers`; static, no leaves).

    Of the gradients sent at a step (every worker's, or with a clock the jobs started),
    each is delivered, rejected, lost, discarded or (with ``on_stale="drop"``) bounded,
    exactly one of them; with ``on_stale="wait"`` the bounded ones are delivered too
    (counted in both).
    """

    step: jax.Array
    worker_states: tuple[optax.OptState, ...]
    in_flight: ring.InFlight
    delivery_states: tuple[optax.OptState, ...]
    inner_state: optax.OptState
    delivered: jax.Array
    staleness: jax.Array
    bounded: jax.Array
    rejected: jax.Array
    lost: jax.Array
    discarded: jax.Array
    bytes_sent: jax.Array
    rows: RowSharing = RowSharing()

    def sums_workers(self) -> bool:
        """Whether ``update`` may be given the sum of a device's workers' gradients in
        place of each one (``summed=``: which workers' gradients it holds): every
        message of a device's workers at a step goes to the same ring row with the same
        weight, so that the row receives the same sum either way (to float32 rounding).
        A training step then computes one gradient of the workers' summed losses
        (:func:`fsq.parallel.workers_step`)."""
        return self.rows.shared


def _check_updates(updates: optax.Updates, params: optax.Params | None) -> None:
    if params is not None:
        got, want = jax.tree.structure(updates), jax.tree.structure(params)
        if got != want:
            raise ValueError(
                f"updates and params must have the same tree structure: {got} != {want}"
            )
    for path, x in jax.tree_util.tree_flatten_with_path(updates)[0]:
        if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            raise TypeError(
                f"updates must be floating point, but the leaf at {jax.tree_util.keystr(path)} "
                f"is {jnp.result_type(x)}: leave integer parameters out of the optimizer "
                "(e.g. with optax.masked or a separate state)"
            )


def _shapes(tree: Any, leading: int = 0) -> list[tuple[int, ...]]:
    return [tuple(jnp.shape(x))[leading:] for x in jax.tree.leaves(tree)]


def _check_shapes(updates, in_flight, segments, support) -> None:
    """Raises a ``ValueError`` unless ``in_flight`` holds messages shaped like ``updates``."""
    if isinstance(in_flight, pairs.Pairs):
        fits = support is not None and in_flight.positions.shape[2] == pairs.padded(
            support[0], _axes.model_shards()
        )
        holds = f"{in_flight.positions.shape[2]} kept entries a message"
    else:
        fits = in_flight.filled.shape[1] == segments and wire.matches(
            updates, in_flight.slots, leading=2
        )
        holds = (
            f"{_shapes(in_flight.slots.channels[0], leading=2)} for "
            f"{in_flight.filled.shape[1]} worker(s) side by side"
        )
    if not fits:
        raise ValueError(
            "updates must have the shapes of the params given to init, in the same mapped "
            f"context: got {_shapes(updates)}, the in-flight buffer holds {holds}"
        )


def _run(pieces, value, states, params, context):
    """``value`` through ``pieces`` in order (either side's); returns it and their states."""
    new_states = []
    for piece, state in zip(pieces, states, strict=True):
        value, state = piece.update(value, state, params, context)
        new_states.append(state)
    return value, tuple(new_states)


def asynchronous(
    inner: optax.GradientTransformation,
    *,
    num_workers: int,
    axis_name: str | tuple[str, ...] = "workers",
    send: Sequence[SendTransformation | optax.GradientTransformation] = (),
    line: _line.DelayLine | None = None,
    deliver: Sequence[DeliverTransformation] = (),
    seed: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Asynchronous data-parallel training, assembled from pieces; used per worker.

    Every worker calls ``update`` once per logical step :math:`t` with its own gradient.
    Its message :math:`m_i(t)` (its gradient after the ``send`` pieces) travels for the
    delay :math:`d_i(t)` the ``line`` draws; at step :math:`t` every worker receives

    .. math::

      A_t = \sum_{(i, s):\, s + d_i(s) = t} m_i(s), \qquad
      (u_t, S_{t+1}) = \begin{cases} \mathrm{inner}(D(A_t), S_t, w_t) & \text{if anything
      is delivered at } t \\ (0, S_t) & \text{otherwise,} \end{cases}

    with :math:`D` the ``deliver`` pieces, the last of which normalises (by default the
    mean over the :math:`W` workers, :func:`fsq.transforms.normalise`). Call ``init``
    and ``update`` inside a mapped context whose ``axis_name`` axes hold ``num_workers``
    workers (``jax.vmap``, ``jax.shard_map``, ``jax.pmap``, nested), or let
    :mod:`fsq.parallel` lay the workers out.

    Where every worker-side piece is summable
    (:attr:`fsq.transforms.SendTransformation.summable`), the line's delays are the same
    for every message and the exchange is dense with the mean, ``update`` may be handed
    the sum of a device's workers' gradients instead of each one, with ``summed=`` (a
    bool per worker: whether its gradient is in the sum; one left out is rejected as not
    finite); :meth:`FlyingSquirrelState.sums_workers` says so, and :mod:`fsq.parallel`'s
    step then computes one gradient of the workers' summed losses.

    Args:
      inner: the optimizer stepped on what is delivered (any optax transformation).
      num_workers: :math:`W \ge 1`, the number of workers over ``axis_name``.
      axis_name: the mapped axis name, or a tuple of nested names (outermost first) whose
        mixed-radix index is the global worker id.
      send: the worker-side pieces, in order: :class:`fsq.transforms.SendTransformation`
        objects, or any optax transformation, which runs on the gradient
        (:func:`fsq.transforms.on_gradient`).
      line: the delay line (:func:`fsq.transforms.delay_line`; default: no delay).
      deliver: the delivery-side pieces, in order
        (:class:`fsq.transforms.DeliverTransformation`); a normalisation is added last if
        none is given.
      seed: the seed of every random choice; runs are a pure function of it. A traced int
        scalar is accepted too, to ``jit`` or ``vmap`` over seeds.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`FlyingSquirrelState`; extra arguments are passed on to ``inner``.

    Example:
      Worker momentum, top-k compression with error feedback and a median, no
      compensation, on 4 workers:

      >>> import jax, jax.numpy as jnp, fsq
      >>> T = fsq.transforms
      >>> tx = fsq.asynchronous(
      ...     fsq.sgd(0.1),
      ...     num_workers=4,
      ...     send=[T.reject_non_finite(), T.worker_momentum(0.9),
      ...           T.compress(fsq.compression.top_k(0.5))],
      ...     line=T.delay_line(fsq.delays.uniform(2)),
      ...     deliver=[T.robust(fsq.aggregation.median())],
      ... )
      >>> w = fsq.parallel.vmap_workers(tx, num_workers=4)
      >>> params = jnp.zeros(2)
      >>> state = w.init(params)
      >>> updates, state = w.update(jnp.ones((4, 2)), state, params)
      >>> updates.shape
      (2,)
    """
    inner = _checks.transformation("inner", inner)
    num_workers = _checks.integer("num_workers", num_workers, low=1)
    names = _axes.normalize(axis_name)
    if not isinstance(seed, jax.core.Tracer):
        seed = _checks.integer("seed", seed, low=0)
    line = _line.delay_line(0) if line is None else line
    pipeline = _pipeline.pipeline(num_workers, send, line, deliver)
    send, deliver = pipeline.send, pipeline.deliver
    num_channels, apart = pipeline.num_channels, pipeline.apart
    # One sum may stand for the messages of a device's workers that share a row.
    summable = all(piece.summable for piece in send) and not apart and line.exchange == "dense"
    inner = optax.with_extra_args_support(inner)

    def segments(axes: _axes.WorkerAxes | None) -> int:
        """Messages side by side in a ring row: one per local worker if kept apart."""
        return _axes.local_count(axes.local) if apart else 1

    def support(like: optax.Updates):
        """``(k, per leaf)`` of a sparse message shaped like ``like``, else ``None``."""
        if pipeline.support is None:
            return None
        return pipeline.support([int(np.size(x)) for x in jax.tree.leaves(like)])

    def resolved(like: optax.Updates):
        """The bytes of a message shaped like ``like``, the line's link for that size, and
        the range of delays (all static)."""
        num_bytes = pipeline.wire_bytes([x.size for x in jax.tree.leaves(like)], num_channels)
        link = line.model.for_message(num_bytes)
        return num_bytes, link, pipeline.span(link)

    def init_fn(params: optax.Params) -> FlyingSquirrelState:
        # Outside the worker axes (flax's TrainState.create, nnx.Optimizer) one state
        # serves every worker. Kept apart, a row holds the local workers' messages, and
        # sparse messages may be held per local worker: only then does the state depend
        # on the axes.
        bound = _axes.is_bound(names)
        axes = _axes.resolve(names, num_workers) if bound else None
        dtype = accumulation_dtype(params)
        num_bytes, link, span = resolved(params)
        context = Context(jnp.int32(0), jnp.int32(0), num_workers, seed, span[1], link)

        def piece_state(piece):
            state = piece.init(params, context) if piece.needs_context else piece.init(params)
            return state if piece.shared else PerWorker(state)

        worker_states = tuple(piece_state(piece) for piece in send)
        own = [
            type(s.value).__name__
            for s in worker_states
            if isinstance(s, PerWorker) and jax.tree.leaves(s)
        ]
        own += ["the messages, kept apart per worker"] if apart else []
        if not bound and own:
            raise ValueError(
                f"this transform keeps state that is each worker's own ({', '.join(own)}), "
                f"so init must run under the worker axes {names}, which are not bound here: "
                "train with fsq.parallel.data_parallel, or for a Flax "
                "NNX model with fsq.nnx.DataParallel. nnx.Optimizer and flax's "
                "TrainState.create call init outside those axes: they can hold a transform "
                "without per-worker state only (stepped inside jax.vmap / nnx.vmap)"
            )
        layout = Layout(num_workers, num_channels, span[1])
        zero = jnp.zeros([], jnp.int32)
        in_flight = line.init(
            params,
            num_channels,
            dtype,
            span,
            segments(axes),
            num_local=_axes.local_count(axes.local) if axes else None,
            support=support(params),
        )
        shared = summable and span[0] == span[1] and isinstance(in_flight, ring.InFlight)
        return FlyingSquirrelState(
            step=zero,
            worker_states=worker_states,
            in_flight=in_flight,
            delivery_states=tuple(piece.init(params, layout) for piece in deliver),
            inner_state=inner.init(params),
            delivered=zero,
            staleness=jnp.zeros([], jnp.float32),
            bounded=zero,
            rejected=zero,
            lost=zero,
            discarded=zero,
            bytes_sent=jnp.float32(num_bytes),
            rows=RowSharing(shared),
        )

    def update_fn(
        updates: optax.Updates,
        state: FlyingSquirrelState,
        params: optax.Params | None = None,
        *,
        worker_id: jax.Array | None = None,
        summed: jax.Array | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, FlyingSquirrelState]:
        _check_updates(updates, params)
        if summed is not None and not state.sums_workers():
            raise ValueError(
                "summed= sends the sum of a device's workers' gradients, which needs "
                "messages that share a ring row at every step through summable pieces "
                "(state.sums_workers() is False for this transform)"
            )
        # A caller that maps only some of the workers (fsq.parallel skips the busy ones)
        # says which this one is; the axes then hold fewer than W.
        if worker_id is not None and apart:
            raise ValueError(
                "a robust aggregation needs every worker mapped: do not skip busy workers "
                "(gradient_slots) with it"
            )
        axes = _axes.resolve(names, num_workers if worker_id is None else None)
        in_flight = state.in_flight
        _check_shapes(updates, in_flight, segments(axes), support(updates))
        _, link, span = resolved(updates)
        worker = _axes.worker_index(axes.names) if worker_id is None else worker_id
        context = Context(state.step, worker, num_workers, seed, span[1], link)
        here = dataclasses.replace(line, model=link)
        message = new_message(updates, here.delay(context), here.sums_dtype(in_flight))
        if summed is not None:  # a gradient left out of the sum was not finite
            message = message.mark(Status.REJECTED, ~summed)._replace(finite=jnp.bool_(True))
        pieces = list(zip(send, state.worker_states, strict=True))
        states = [s if piece.shared else s.value for piece, s in pieces]
        message, states = _run(send, message, states, params, context)
        worker_states = tuple(
            s if piece.shared else PerWorker(s) for piece, s in zip(send, states, strict=True)
        )
        due, in_flight = here.send(
            message,
            in_flight,
            state.step,
            axes,
            apart,
            early=span[0] > 0,
            alike=span[0] == span[1],
            support=support(updates),
            worker=worker,
            summed=summed is not None,
        )
        totals = _line.totals(due, num_workers, apart)
        delivered = jnp.round(totals.count).astype(jnp.int32)

        # A piece that merges the workers' sums (a robust rule) runs whatever arrives (it
        # changes nothing when nothing does): inside the inner step's branch, XLA would copy
        # its W messages' worth of votes into the conditional.
        merged = deliver[:1] if apart else ()
        arrival = None
        if merged:
            arrival = _line.arrival(due, totals, apart)
            arrival, merged_states = _run(
                merged, arrival, state.delivery_states[:1], params, context
            )
        rest, rest_states = deliver[len(merged) :], state.delivery_states[len(merged) :]

        def step_inner(arrival):
            if arrival is None:  # read the due row here, where it is used
                arrival = _line.arrival(due, totals, apart)
            arrival, states = _run(rest, arrival, rest_states, params, context)
            (mean,) = arrival.channels
            mean = jax.tree.map(lambda s, g: s.astype(g.dtype), mean, updates)
            new_updates, inner_state = inner.update(mean, state.inner_state, params, **extra_args)
            if arrival.step_scale is not None:
                scale = arrival.step_scale
                new_updates = jax.tree.map(lambda u: u * scale.astype(u.dtype), new_updates)
            return new_updates, inner_state, states

        def skip(arrival):
            del arrival
            return optax.tree.zeros_like(updates), state.inner_state, rest_states

        new_updates, inner_state, delivery_states = jax.lax.cond(
            delivered > 0, step_inner, skip, arrival
        )
        if merged:
            delivery_states = merged_states + delivery_states
        return new_updates, FlyingSquirrelState(
            step=state.step + 1,
            worker_states=worker_states,
            in_flight=in_flight,
            delivery_states=delivery_states,
            inner_state=inner_state,
            delivered=delivered,
            staleness=(totals.staleness_sum / jnp.maximum(totals.count, 1.0)).astype(jnp.float32),
            bounded=jnp.round(totals.bounded).astype(jnp.int32),
            rejected=jnp.round(totals.rejected).astype(jnp.int32),
            lost=jnp.round(totals.lost).astype(jnp.int32),
            discarded=jnp.round(totals.discarded).astype(jnp.int32),
            bytes_sent=state.bytes_sent,
            rows=state.rows,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
