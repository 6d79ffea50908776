r"""What flows through Flying Squirrel's pipeline: messages, arrivals, and the pieces' types.

The pipeline (:func:`fsq.asynchronous`) has three stages, each with its own kind of piece:

- **worker side** — per worker, with its own state: a :class:`SendTransformation` turns
  one worker's :class:`Message` (its gradient, the delay it will travel with, its weight
  and its :class:`Status`) into the message it sends. Any ``optax`` transformation can
  run here too, on the gradient (:func:`on_gradient`).
- **the delay line** (:mod:`fsq.transforms.line`) — the only stage with collectives: it
  sums the messages in flight and hands over what is due at each step.
- **delivery side** — identical on every worker: a :class:`DeliverTransformation` turns
  the :class:`Arrival` (the sums of the channels delivered at a step, and their
  :class:`Totals`) into what the inner optimizer steps on.

A message's status says what becomes of it; it is a partition of the gradients of a
step: each is exactly one of *sent* (delivered), *held* (delivered, late by the
staleness bound), *dropped* (by the staleness bound), *discarded* (by a coordination
policy, :mod:`fsq.timing`), *rejected* (not finite) or *lost* (its worker was down); a
worker still busy with an earlier job (or waiting at a barrier) sends nothing at all
(*idle*). A message's fate is the gravest any piece gives it, in the reverse of that
order (idle, lost, rejected, discarded, dropped, held, sent), whatever the order of the
pieces: a down worker's NaN gradient is lost, a late NaN gradient rejected. A piece's own
state advances only for a message that is still sent when it sees it (a worker that
computed nothing usable learns nothing), so rejection comes before the pieces with state.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fsq import _random


class Status(enum.IntEnum):
    """The fate of a message (an int32 in :attr:`Message.status`), graver the larger."""

    SENT = 0
    HELD = 1  # sent, and held back by the staleness bound (on_stale="wait")
    DROPPED = 2  # dropped by the staleness bound (on_stale="drop")
    DISCARDED = 3  # by a coordination policy (fsq.timing)
    REJECTED = 4  # not finite
    LOST = 5  # its worker was down
    IDLE = 6  # no gradient: its worker is busy, or waiting at a barrier


class Context(NamedTuple):
    """Where a piece runs: the logical step, the worker, and the run it belongs to.

    Attributes:
      step: the logical step :math:`t` (int32 scalar).
      worker: the global id of this worker (int32 scalar; 0 on the delivery side).
      num_workers: :math:`W`.
      seed: the run's seed (an int, or a traced int scalar).
      max_delay: the largest delay a message can travel with.
      link: the delay line's link model (:mod:`fsq.delays`), resolved for the size of a
        message, or ``None``.
    """

    step: jax.Array
    worker: jax.Array
    num_workers: int
    seed: int | jax.Array
    max_delay: int
    link: Any = None

    def key(self, stream: _random.Stream, worker: jax.Array | int | None = None) -> jax.Array:
        """The key of event ``stream`` of ``worker`` (default: this one) at this step."""
        worker = self.worker if worker is None else worker
        return _random.event_key(self.seed, stream, self.step, worker)


class Message(NamedTuple):
    r"""What one worker sends at one step.

    Attributes:
      channels: the trees summed in flight, each shaped like the gradient: ``(g,)``, or
        more (delay compensation sends :math:`g`, :math:`g \odot g`, :math:`g \odot g
        \odot w`).
      delay: the steps it travels (int32 scalar).
      weight: the factor its channels are scaled by when sent (staleness rule, liveness
        re-weighting, load balancing); a scalar of the accumulation dtype.
      status: its :class:`Status` (int32 scalar).
      support: the flat positions a sparse compressor kept (``[k]`` int32), else ``None``.
      shared_support: whether every worker keeps the same positions at a step (a Python
        bool: random-k with a shared key), so that they need not travel.
      staleness: the inner steps between the tick its parameters were read and the tick
        it is applied (int32 scalar), known to a clock (:func:`fsq.transforms.clock`);
        ``None``: its delay (every step delivers something in the delay model).
      finite: whether its gradient is finite, where that is known already (a sum of
        gradients whose non-finite terms were left out: a bool scalar), else ``None``
        (:func:`fsq.transforms.reject_non_finite` tests it). A new gradient forgets it.
    """

    channels: tuple[optax.Updates, ...]
    delay: jax.Array
    weight: jax.Array
    status: jax.Array
    support: jax.Array | None = None
    shared_support: bool = False
    staleness: jax.Array | None = None
    finite: jax.Array | None = None

    @property
    def gradient(self) -> optax.Updates:
        """The first channel: the (transformed) gradient."""
        return self.channels[0]

    @property
    def age(self) -> jax.Array:
        """Its staleness, where a clock knows it, else its delay (int32 scalar)."""
        return self.delay if self.staleness is None else self.staleness

    @property
    def sent(self) -> jax.Array:
        """Whether the message carries its gradient to delivery (bool scalar)."""
        return self.status <= Status.HELD

    def with_gradient(self, gradient: optax.Updates) -> Message:
        """The message with its first channel replaced."""
        return self._replace(channels=(gradient, *self.channels[1:]), finite=None)

    def mark(self, status: Status, where: jax.Array) -> Message:
        """The message marked ``status`` where ``where`` holds, unless its fate is graver."""
        graver = jnp.maximum(self.status, jnp.int32(status))
        return self._replace(status=jnp.where(where, graver, self.status))


def new_message(gradient: optax.Updates, delay: jax.Array, dtype: jnp.dtype) -> Message:
    """A sent message of ``gradient`` with ``delay`` and weight 1 (of ``dtype``)."""
    return Message(
        (gradient,),
        jnp.asarray(delay, jnp.int32),
        jnp.ones([], dtype),
        jnp.int32(Status.SENT),
    )


def keep_if_sent(message: Message, new_state: Any, old_state: Any) -> Any:
    """``new_state`` if ``message`` is sent, else ``old_state``: a worker that computed
    nothing usable keeps its state."""
    return jax.tree.map(lambda n, o: jnp.where(message.sent, n, o), new_state, old_state)


DelayRange = tuple[int, int]
WireBytes = Callable[[Sequence[int], int], int]


class SendTransformation(NamedTuple):
    """A worker-side piece: ``update(message, state, params, context) -> (message, state)``.

    ``init(params)`` makes its state, which is each worker's own (batched over the workers
    of a device by :mod:`fsq.parallel`), unless ``shared``. The optional fields tell the
    assembly how the piece changes the message's layout.

    Attributes:
      init: ``params -> state`` (``(params, context) -> state`` with ``needs_context``).
      update: ``(message, state, params, context) -> (message, state)``.
      channels: how many channels its messages have (``None``: unchanged).
      delays: ``(min_delay, max_delay) -> (min_delay, max_delay)``, how it changes the
        range of delays (``None``: unchanged).
      wire_bytes: ``(leaf sizes, channels) -> bytes`` of one of its messages on the wire,
        for a piece that compresses (``None``: unchanged).
      support: for a piece whose messages are sparse, ``leaf sizes -> (k, per leaf)``: how
        many entries a message keeps, and how many of them each leaf holds (``None`` when
        that varies), known before any message is sent.
      shared: its state is the same on every worker (replicated), not each worker's own.
      needs_context: ``init`` takes the :class:`Context` too (its ``step`` 0, ``worker``
        0: the run it belongs to).
      summable: a message may carry the sum of several workers' gradients through it:
        it keeps no state, touches the channels only through the message's weight, and
        gives workers whose messages travel alike (the same delay) the same weight and
        status, whatever their gradients but for being finite. Where every piece is,
        the workers of a device that share a ring row send one sum
        (:meth:`fsq.FlyingSquirrelState.sums_workers`).
    """

    init: Callable[..., optax.OptState]
    update: Callable[
        [Message, optax.OptState, optax.Params | None, Context], tuple[Message, optax.OptState]
    ]
    channels: int | None = None
    delays: Callable[[DelayRange], DelayRange] | None = None
    wire_bytes: WireBytes | None = None
    support: Callable[[Sequence[int]], tuple[int, tuple[int, ...] | None]] | None = None
    shared: bool = False
    needs_context: bool = False
    summable: bool = False


def on_gradient(tx: optax.GradientTransformation) -> SendTransformation:
    """Runs any optax transformation on each worker's gradient before it is sent.

    The transformation sees the gradient as its updates (and ``params``); its state is the
    worker's own, and it advances only for a message that is still sent (a down worker,
    or a rejected gradient, leaves it unchanged).

    Example:
      >>> import jax.numpy as jnp, optax, fsq
      >>> clip = fsq.transforms.on_gradient(optax.clip_by_global_norm(1.0))
      >>> m = fsq.transforms.new_message(jnp.array([3.0, 4.0]), 0, jnp.float32)
      >>> m, _ = clip.update(m, clip.init(jnp.zeros(2)), None, None)
      >>> print(m.gradient)
      [0.6 0.8]
    """
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(
            f"a worker-side piece must be an optax.GradientTransformation or a "
            f"fsq.transforms.SendTransformation, got {type(tx).__name__} {tx!r}"
        )

    def update(message, state, params, context):
        del context
        gradient, new_state = tx.update(message.gradient, state, params)
        return message.with_gradient(gradient), keep_if_sent(message, new_state, state)

    return SendTransformation(tx.init, update)


class Totals(NamedTuple):
    """Sums over the messages due at a step (each a scalar of the accumulation dtype, or
    ``[W]`` per worker); they travel in flight with the channels.

    Attributes:
      count: how many are delivered (status sent or held).
      staleness_sum: the sum of their staleness (:attr:`Message.age`).
      bounded: how many the staleness bound dropped or held back.
      weight: the sum of their weights.
      rejected: how many were rejected for not being finite.
      lost: how many were never sent, their worker being down.
      discarded: how many a coordination policy discarded.
    """

    count: jax.Array
    staleness_sum: jax.Array
    bounded: jax.Array
    weight: jax.Array
    rejected: jax.Array
    lost: jax.Array
    discarded: jax.Array


def totals_of(message: Message, dtype: jnp.dtype) -> Totals:
    """The message's contribution to the :class:`Totals`, in ``dtype``."""
    count = message.sent.astype(dtype)
    status = message.status
    return Totals(
        count,
        count * message.age.astype(dtype),
        ((status == Status.HELD) | (status == Status.DROPPED)).astype(dtype),
        jnp.where(message.sent, message.weight.astype(dtype), 0),
        (status == Status.REJECTED).astype(dtype),
        (status == Status.LOST).astype(dtype),
        (status == Status.DISCARDED).astype(dtype),
    )


class Layout(NamedTuple):
    """The static shape of a pipeline, known at construction.

    Attributes:
      num_workers: :math:`W`.
      num_channels: the channels of a message.
      max_delay: the largest delay a message can travel with.
    """

    num_workers: int
    num_channels: int
    max_delay: int


class Arrival(NamedTuple):
    """What is delivered at a step, as the delivery side sees it.

    Attributes:
      channels: the sums of the delivered messages' channels, trees in the accumulation
        dtype (each channel scaled by its message's weight); with the workers kept apart
        (:attr:`DeliverTransformation.workers_apart`) every leaf has a leading axis of
        :math:`W`, one sum per worker.
      totals: the :class:`Totals` over every worker.
      by_worker: with the workers kept apart, the :class:`Totals` of each worker
        (``[W]`` leaves), else ``None``.
      step_scale: the factor the inner optimizer's update is scaled by (``None``: 1).
    """

    channels: tuple[optax.Updates, ...]
    totals: Totals
    by_worker: Totals | None = None
    step_scale: jax.Array | None = None


class DeliverTransformation(NamedTuple):
    """A delivery-side piece: ``update(arrival, state, params, context) -> (arrival, state)``.

    It runs only at steps where something is delivered, identically on every worker;
    its state is replicated.

    Attributes:
      init: ``(params, layout) -> state`` (``layout`` a :class:`Layout`).
      update: ``(arrival, state, params, context) -> (arrival, state)``.
      workers_apart: whether it needs each worker's sums apart (a robust aggregation);
        the delay line then keeps them apart, and the piece must merge them.
      channels: how many channels its arrivals have (``None``: unchanged).
      normalises: whether it turns the sums into the inner optimizer's input (one
        channel); the last piece of a pipeline does (:func:`fsq.transforms.normalise`).
    """

    init: Callable[[optax.Params, Layout], optax.OptState]
    update: Callable[
        [Arrival, optax.OptState, optax.Params | None, Context], tuple[Arrival, optax.OptState]
    ]
    workers_apart: bool = False
    channels: int | None = None
    normalises: bool = False


def accumulation_dtype(tree: Any) -> jnp.dtype:
    """The dtype sums of ``tree``'s values are kept in: at least float32, so that sums of
    many low-precision gradients keep their small terms."""
    return jnp.result_type(jnp.float32, *[jnp.result_type(x) for x in jax.tree.leaves(tree)])
