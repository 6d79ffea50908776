r"""The delay line: every message travels for its delay, and what is due is delivered.

This is the only stage of the pipeline that knows devices from workers and that
communicates. Each worker's message is drawn a delay :math:`d_i(t)` from a
:mod:`fsq.delays` model (a pure function of ``(seed, t, i)``), written into the
in-flight buffer of its device (:mod:`fsq.transforms.ring`) and delivered at step
:math:`t + d_i(t)`; at each step every worker receives the same sum of what is due,
over all workers. Two exchanges:

- ``"dense"`` (default): messages travel as dense rows; the workers of a device share
  one ring of partial sums, and delivery is one all-reduce of the due row over the
  device-spanning axes (none over one device: the row is then read in place), in the
  dtype the sums are formed in, whatever the dtype the ring stores them in. With
  compression this simulates the compressed numerics exactly while the state's
  ``bytes_sent`` counts the compressed wire. With a delay model that never gives delay 0
  the all-reduce reads only the buffer, not this step's messages, so XLA can overlap it
  with the backward pass.
- ``"sparse"`` (with a sparse compressor, :func:`fsq.compression.top_k` or
  :func:`~fsq.compression.random_k`): each worker's (position, value) pairs are
  all-gathered over every worker axis *when sent* (the one collective, of :math:`W
  \times k` pairs instead of an all-reduce of the dense row) and added into every
  device's ring, which therefore holds the sums over every worker; delivery needs no
  collective. With positions shared by every worker (random-k) only the values travel.

- ``"ordered"``: as dense, but each worker's messages are summed apart and delivery
  all-gathers the :math:`W` workers' sums, then adds them in worker order. An all-reduce
  adds the devices' rows in an order of its own (another across processes than within
  one); in worker order the sum is the same on every layout, so a job split over
  processes delivers bit for bit what one process delivers. It costs the all-gather of
  :math:`W` rows instead of an all-reduce of one, and a buffer :math:`W/D` times wider.

When the delivery side keeps the workers apart (a robust aggregation), each worker's
messages are summed apart and delivery all-gathers the :math:`W` workers' sums.

With a sparse compressor and the dense exchange, the messages in flight are held as the
wire carries them, (position, value) pairs by send step (:mod:`fsq.transforms.pairs`),
wherever that takes less memory than the dense rows: the due row is formed at delivery,
added in the order the dense rows add it, so the run is the same either way.

Example:
  >>> import fsq
  >>> line = fsq.transforms.delay_line(fsq.delays.uniform(4))
  >>> import jax.numpy as jnp
  >>> ring = line.init(jnp.zeros(10), 1, jnp.float32, span=(0, line.model.max_delay))
  >>> ring.slots.channels[0].shape  # max_delay + 1 rows, one segment, the leaf's shape
  (5, 1, 10)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from fsq import _axes, _random, delays
from fsq._sharding import constrain
from fsq.transforms import pairs, ring, wire
from fsq.transforms.message import (
    Arrival,
    Context,
    DeliverTransformation,
    Message,
    Totals,
    totals_of,
)

EXCHANGES = ("dense", "sparse", "ordered")
HOLDS = ("auto", "rows", "pairs")


@dataclasses.dataclass(frozen=True)
class DelayLine:
    """A delay line: the delay model, how messages are exchanged, and how they are held.

    Attributes:
      model: the :mod:`fsq.delays` model.
      exchange: ``"dense"``, ``"sparse"`` or ``"ordered"``.
      dtype: the dtype messages in flight are stored in (``None``: the dtype their sums
        are formed in, at least float32; e.g. ``jnp.bfloat16`` halves the in-flight
        buffer, each stored sum rounded once).
      hold: how messages in flight are held: ``"rows"`` (the sums due at each step,
        :mod:`fsq.transforms.ring`), ``"pairs"`` (sparse messages as the wire carries
        them, :mod:`fsq.transforms.pairs`) or ``"auto"`` (pairs where they take fewer
        bytes).
    """

    model: delays.DelayModel
    exchange: str = "dense"
    dtype: jnp.dtype | None = None
    hold: str = "auto"

    def delay(self, context: Context) -> jax.Array:
        """The delay of this worker's message at this step (int32 scalar)."""
        key = context.key(_random.Stream.DELAY)
        return jnp.asarray(self.model(key, context.step, context.worker), jnp.int32)

    def init(
        self,
        like: optax.Updates,
        num_channels: int,
        dtype: jnp.dtype,
        span: tuple[int, int],
        segments: int = 1,
        num_local: int | None = None,
        support: tuple[int, tuple[int, ...] | None] | None = None,
    ) -> ring.InFlight | pairs.Pairs:
        """An empty buffer for messages of ``num_channels`` channels shaped like ``like``
        (``segments`` workers' messages side by side), their sums formed in ``dtype``, and
        delays in ``span`` = ``(min, max)``; with sparse messages (``support``, ``(k, per
        leaf)``) from ``num_local`` workers, held as pairs where that is smaller."""
        low, high = span
        row = wire.like(like, num_channels, self.dtype or dtype, dtype)
        if self.as_pairs(row, high, segments, num_local, support):
            return pairs.init(
                high,
                num_local,
                support[0],
                num_channels,
                self.dtype or dtype,
                dtype,
                _axes.model_shards(),
            )
        return ring.init(high, row, early=low > 0, segments=segments)

    def as_pairs(
        self,
        row: wire.Row,
        max_delay: int,
        segments: int,
        num_local: int | None,
        support: tuple[int, tuple[int, ...] | None] | None,
    ) -> bool:
        """Whether sparse messages are held as pairs (:mod:`fsq.transforms.pairs`): with
        the dense exchange and the mean, where that takes fewer bytes than dense rows
        (``hold="auto"``, the bytes one model shard holds of each), or always
        (``"pairs"``)."""
        if self.hold == "rows":
            return False
        possible = support is not None and num_local is not None and max_delay
        if not (possible and self.exchange == "dense" and segments == 1):
            if self.hold == "pairs":
                raise ValueError(
                    'hold="pairs" holds sparse messages (a sparse compressor) of the dense '
                    "exchange with the mean aggregation, with delays, for a transform "
                    "initialized under its worker axes"
                )
            return False
        if self.hold == "pairs":
            return True
        dense = (max_delay + 1) * sum(
            int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(row)
        )
        shards = _axes.model_shards()
        held = pairs.nbytes(
            max_delay, num_local, support[0], len(row.channels), row_dtype(row), shards
        )
        return held < dense / shards

    def sums_dtype(self, in_flight: ring.InFlight | pairs.Pairs) -> jnp.dtype:
        """The dtype sums of messages are formed in (that of their totals)."""
        totals = in_flight.totals if isinstance(in_flight, pairs.Pairs) else in_flight.slots.totals
        return totals.dtype

    def send(
        self,
        message: Message,
        in_flight: ring.InFlight | pairs.Pairs,
        step: jax.Array,
        axes: _axes.WorkerAxes,
        apart: bool = False,
        early: bool = False,
        support: tuple[int, tuple[int, ...] | None] | None = None,
        worker: jax.Array | None = None,
        summed: bool = False,
        alike: bool = False,
    ) -> tuple[ring.Due, ring.InFlight | pairs.Pairs]:
        """Sends this worker's message; returns what is due at ``step`` (over every
        worker; each worker's sums side by side when ``apart``) and the buffer.
        ``early``: no message is due the step it is sent (the smallest delay is above 0);
        ``support``: as for :meth:`init`; ``worker``: this worker's global id;
        ``summed``: the message's channels are the sum over the device's workers that send
        one, whose messages have the same delay and weight (the dense exchange, the mean):
        the sum is written once, and counted for every worker; ``alike``: every message
        travels the same delay (they are added into their one ring row one by one)."""
        dtype = self.sums_dtype(in_flight)
        if isinstance(in_flight, pairs.Pairs):
            slots = _axes.stack(worker, axes.local) % in_flight.due_at.shape[1]
            return _exchange_pairs(message, in_flight, step, axes, dtype, early, support[1], slots)
        if self.exchange == "sparse":
            return _exchange_sparse(message, in_flight, step, axes, dtype)
        return _exchange_dense(message, in_flight, step, axes, dtype, apart, summed, alike)


def delay_line(
    delay: int | delays.DelayModel = 0,
    *,
    exchange: str = "dense",
    dtype: jnp.dtype | None = None,
    hold: str = "auto",
) -> DelayLine:
    """A delay line with ``delay`` (an int: constant; or a :mod:`fsq.delays` model).

    Args:
      delay: the delay model.
      exchange: ``"dense"``, ``"sparse"`` or ``"ordered"`` (see the module; sparse
        needs a sparse compressor on the worker side, and the mean aggregation).
      dtype: the floating dtype messages in flight are stored in (``None``: that of their
        sums, at least float32).
      hold: ``"auto"``, ``"rows"`` or ``"pairs"`` (see :class:`DelayLine`).
    """
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    if hold not in HOLDS:
        raise ValueError(f"hold must be one of {HOLDS}, got {hold!r}")
    if dtype is not None:
        dtype = jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"dtype must be a floating dtype (e.g. jnp.bfloat16), got {dtype}")
    return DelayLine(delays.as_delay_model(delay), exchange, dtype, hold)


def _in(dtype: jnp.dtype, row: wire.Row) -> wire.Row:
    """``row`` with its channels in ``dtype`` (sums leave a narrower buffer widened)."""
    channels = tuple(jax.tree.map(lambda x: x.astype(dtype), c) for c in row.channels)
    return row._replace(channels=channels)


def row_dtype(row: wire.Row) -> jnp.dtype:
    """The dtype a row holds its channels in."""
    return jax.tree.leaves(row.channels)[0].dtype if jax.tree.leaves(row.channels) else jnp.float32


def _spanned(axes: _axes.WorkerAxes) -> tuple[str, ...]:
    """The device axes a due row is reduced over (over one device the collective would
    only copy the row: none)."""
    return tuple(a for a in axes.device if lax.axis_size(a) > 1)


def _over_devices(due: ring.Due, axes: _axes.WorkerAxes, dtype, apart: bool) -> ring.Due:
    """The due row over every device: one all-reduce (or all-gather, kept apart) of the
    devices' rows, in the dtype sums are formed in."""
    spanned = _spanned(axes)
    if not spanned:
        return due
    row = _in(dtype, ring.read(due))
    row = lax.all_gather(row, spanned, tiled=True) if apart else lax.psum(row, spanned)
    return ring.as_due(row)


def _summed(message: Message, axes: _axes.WorkerAxes, dtype) -> wire.Row:
    """A message carrying the sum of the gradients of the device's workers that send one,
    as one worker's (leaves ``[1, *shape]``): scaled once by the weight they share (that
    of the first one sent), counted in the totals for each worker."""
    sender = jnp.argmax(_axes.stack(message.sent, axes.local))
    alike = {f: _axes.stack(getattr(message, f), axes.local)[sender] for f in ("weight", "status")}
    counts = jnp.sum(_axes.stack(jnp.stack(totals_of(message, dtype)), axes.local), 0)
    row = wire.parts(message._replace(**alike), dtype)._replace(totals=counts)
    return jax.tree.map(lambda x: x[None], row)


def _exchange_dense(message, in_flight, step, axes, dtype, apart, summed=False, alike=False):
    num_local = 1 if summed else _axes.local_count(axes.local)
    spanned = _spanned(axes)

    def gathered():
        """The device's workers' messages, leaves ``[num_local, *shape]`` (free under vmap:
        every worker of the device gets the whole batch); summed, the one sum."""
        if summed:
            row = _summed(message, axes, dtype)
        else:
            row = jax.tree.map(lambda p: _axes.stack(p, axes.local), wire.parts(message, dtype))
        return row._replace(channels=tuple(constrain(c, leading=1) for c in row.channels))

    if in_flight.filled.shape[0]:
        delays = _axes.stack(message.delay, axes.local)[:num_local]  # alike when summed
        write = ring.add_messages(gathered(), delays, step, apart, alike)
        due, in_flight = ring.advance(in_flight, step, write)
    elif num_local == 1 and not spanned:  # no delays: the message just sent, as it is
        due = ring.Due(lambda: jax.tree.map(lambda x: x[None], gathered()), jnp.int32(0))
    elif apart or summed:  # no delays: each worker's message (or the sum) is due now
        due = ring.as_due(gathered())
    else:  # no delays: the sum of the device's messages is due now, leaf by leaf
        # A product with ones sums the workers in one pass; XLA's reduction over the
        # leading axis was 50x slower on CPU.
        ones = jnp.ones(num_local, dtype)
        due = ring.as_due(jax.tree.map(lambda p: jnp.tensordot(ones, p, axes=1)[None], gathered()))
    return _over_devices(due, axes, dtype, apart), in_flight


def _values(channel: optax.Updates, kept: jax.Array, counts: tuple[int, ...] | None):
    """``channel``'s entries at the flat positions ``kept`` (``[k]``): each leaf's own
    stretch of them, read where the leaf's shards are, when the count per leaf is known."""
    leaves = jax.tree.leaves(channel)
    if counts is None:
        return jnp.concatenate([jnp.ravel(x) for x in leaves])[kept]
    values, start, offset = [], 0, 0
    for x, count in zip(leaves, counts, strict=True):
        local = kept[start : start + count] - offset
        values.append(x[jnp.unravel_index(local, x.shape)] if x.ndim else jnp.repeat(x, count))
        start, offset = start + count, offset + x.size
    return jnp.concatenate(values) if values else jnp.zeros((0,), jnp.float32)


def _exchange_pairs(message, in_flight, step, axes, dtype, early, counts, slots):
    row = wire.parts(message, dtype)
    values = [_values(channel, message.support, counts) for channel in row.channels]
    stack = functools.partial(_axes.stack, axes=axes.local)
    sent = (stack(message.support), [stack(v) for v in values], stack(row.totals))
    like = wire.like(message.gradient, len(row.channels), dtype, dtype)

    def write(buffer):
        return pairs.write(buffer, step, *sent, stack(message.delay), slots)

    def local_due(buffer):
        return ring.as_due(jax.tree.map(lambda x: x[None], pairs.due(buffer, step, like, counts)))

    if early:  # nothing sent now is due now: read first, free of this step's gradient
        due, in_flight = local_due(in_flight), write(in_flight)
    else:
        in_flight = write(in_flight)
        due = local_due(in_flight)
    return _over_devices(due, axes, dtype, apart=False), in_flight


def _exchange_sparse(message, in_flight, step, axes, dtype):
    if message.support is None:
        raise ValueError(
            'exchange="sparse" needs a sparse compressor on the worker side '
            "(fsq.transforms.compress(fsq.compression.top_k(...)) or random_k)"
        )
    row = wire.parts(message, dtype)
    kept = message.support
    values = [
        jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(channel)])[kept]
        for channel in row.channels
    ]
    # One all-gather: the totals, the delay and the positions travel bit-cast in the
    # values' row. With positions shared by every worker (random-k with a shared key)
    # only values travel.
    shared = message.shared_support
    integer = jnp.dtype(f"int{8 * dtype.itemsize}")
    pieces = [*values, row.totals, jnp.asarray(message.delay, integer)[None]]
    if not shared:
        pieces.append(kept.astype(integer))
    floats = jnp.concatenate([lax.bitcast_convert_type(p, dtype) for p in pieces])
    gathered = _axes.stack(floats, axes.names)
    k, num_channels = kept.shape[0], len(values)
    values = tuple(gathered[:, c * k : (c + 1) * k] for c in range(num_channels))
    at = num_channels * k
    totals = gathered[:, at : at + wire.NUM_TOTALS]
    integers = lax.bitcast_convert_type(gathered[:, at + wire.NUM_TOTALS :], integer)
    delays = integers[:, 0].astype(jnp.int32)
    positions = kept[None] if shared else integers[:, 1:].astype(jnp.int32)
    positions = jnp.broadcast_to(positions, values[0].shape)
    if not in_flight.filled.shape[0]:  # no delays: everything sent is due now
        empty = jax.tree.map(lambda x: jnp.zeros((1,) + x.shape[1:], x.dtype), in_flight.slots)
        write = ring.scatter_messages(positions, values, totals, jnp.zeros_like(delays), 0)
        return ring.Due(write(empty, jnp.zeros((1, 1), bool), 1)[0], jnp.int32(0)), in_flight
    write = ring.scatter_messages(positions, values, totals, delays, step)
    return ring.advance(in_flight, step, write, lazy=False)


def totals(due: ring.Due, num_workers: int, apart: bool) -> Totals:
    """The :class:`Totals` of what is due, over every worker (read where called)."""
    rows = ring.read(due, lambda row: row.totals)  # [segments, 7]
    if not apart:
        return Totals(*rows[0])
    return Totals(*sum_in_order(rows.reshape(num_workers, wire.NUM_TOTALS)))


def sum_in_order(x):
    """``x[0] + x[1] + ...`` over the leading (worker) axis of every leaf of ``x``, added in
    that order whatever the program around it, so that every layout rounds the same way."""
    zeros = jax.tree.map(lambda leaf: jnp.zeros_like(leaf[0]), x)
    total, _ = lax.scan(lambda acc, row: (jax.tree.map(jnp.add, acc, row), None), zeros, x)
    return total


def merge_in_order() -> DeliverTransformation:
    """The delivery piece of the ``"ordered"`` exchange: the workers' sums, kept apart by
    the line, added in worker order (:func:`sum_in_order`), all channels in one pass."""

    def update(arrival, state, params, context):
        del params, context
        return arrival._replace(channels=sum_in_order(arrival.channels), by_worker=None), state

    return DeliverTransformation(lambda params, layout: optax.EmptyState(), update, True)


def arrival(due: ring.Due, totals: Totals, apart: bool) -> Arrival:
    """What is due as an :class:`Arrival`, read in the current scope (inside the inner
    step's branch, so that XLA fuses the reads into their use), its channels in the dtype
    sums are formed in."""
    row = ring.read(ring.computed(due))
    row = _in(row.totals.dtype, row)
    if apart:
        return Arrival(row.channels, totals, wire.totals(row))
    return Arrival(tuple(jax.tree.map(lambda x: x[0], c) for c in row.channels), totals)
