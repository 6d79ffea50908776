r"""The delay line: every message travels for its delay, and what is due is delivered.

This is the only stage of the pipeline that knows devices from workers and that
communicates. Each worker's message is drawn a delay :math:`d_i(t)` from a
:mod:`fsq.delays` model (a pure function of ``(seed, t, i)``), written into the
in-flight buffer of its device (:mod:`fsq.transforms.ring`) and delivered at step
:math:`t + d_i(t)`; at each step every worker receives the same sum of what is due,
over all workers. Two exchanges:

- ``"dense"`` (default): messages travel as dense rows; the workers of a device share
  one ring of partial sums, and delivery is one all-reduce of the due row over the
  device-spanning axes (none over one device: the row is then read in place). With
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

Example:
  >>> import fsq
  >>> line = fsq.transforms.delay_line(fsq.delays.uniform(4))
  >>> ring = line.init(width=10, dtype="float32", span=(0, line.model.max_delay))
  >>> ring.slots.shape  # max_delay + 1 rows
  (5, 10)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from jax import lax

from fsq import _axes, _random, delays
from fsq.transforms import ring, wire
from fsq.transforms.message import Arrival, Context, DeliverTransformation, Message, Totals

EXCHANGES = ("dense", "sparse", "ordered")


@dataclasses.dataclass(frozen=True)
class DelayLine:
    """A delay line: the delay model and how messages are exchanged (see the module).

    Attributes:
      model: the :mod:`fsq.delays` model.
      exchange: ``"dense"``, ``"sparse"`` or ``"ordered"``.
    """

    model: delays.DelayModel
    exchange: str = "dense"

    def delay(self, context: Context) -> jax.Array:
        """The delay of this worker's message at this step (int32 scalar)."""
        key = context.key(_random.Stream.DELAY)
        return jnp.asarray(self.model(key, context.step, context.worker), jnp.int32)

    def init(
        self, width: int, dtype: jnp.dtype, span: tuple[int, int], segments: int = 1
    ) -> ring.InFlight:
        """An empty buffer for rows of ``width`` entries (``segments`` workers' messages
        side by side) and delays in ``span`` = ``(min, max)``."""
        low, high = span
        return ring.init(high, width, dtype, early=low > 0, segments=segments)

    def send(
        self,
        message: Message,
        in_flight: ring.InFlight,
        step: jax.Array,
        axes: _axes.WorkerAxes,
        apart: bool = False,
    ) -> tuple[ring.Due, ring.InFlight]:
        """Sends this worker's message; returns what is due at ``step`` (over every
        worker; each worker's sums side by side when ``apart``) and the buffer."""
        dtype = in_flight.slots.dtype
        if self.exchange == "sparse":
            return _exchange_sparse(message, in_flight, step, axes, dtype)
        return _exchange_dense(message, in_flight, step, axes, dtype, apart)


def delay_line(delay: int | delays.DelayModel = 0, *, exchange: str = "dense") -> DelayLine:
    """A delay line with ``delay`` (an int: constant; or a :mod:`fsq.delays` model).

    Args:
      delay: the delay model.
      exchange: ``"dense"``, ``"sparse"`` or ``"ordered"`` (see the module; sparse
        needs a sparse compressor on the worker side, and the mean aggregation).
    """
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    return DelayLine(delays.as_delay_model(delay), exchange)


def _exchange_dense(message, in_flight, step, axes, dtype, apart):
    num_local = _axes.local_count(axes.local)
    # Over one device the collective would only copy the row: skip it.
    spanned = tuple(a for a in axes.device if lax.axis_size(a) > 1)

    def gathered():
        """The parts of the device's workers' messages, ``[num_local, n]`` each (free
        under vmap: every worker of the device gets the whole batch)."""
        return [_axes.stack(p, axes.local) for p in wire.parts(message, dtype)]

    if in_flight.slots.shape[0]:
        delays = _axes.stack(message.delay, axes.local)
        write = ring.add_messages(gathered(), delays, step, apart)
        due, in_flight = ring.advance(in_flight, step, write)
    elif num_local == 1 and not spanned:  # no delays: the message just sent, as it is
        due = ring.Due(lambda: tuple(gathered()), jnp.int32(0))
    elif apart:  # no delays: each worker's message is due now
        due = ring.as_due(jnp.ravel(jnp.concatenate(gathered(), axis=1)))
    else:  # no delays: the sum of the device's messages is due now, part by part
        # A product with ones sums the rows in one pass; XLA's reduction over the leading
        # axis was 50x slower on CPU.
        due = ring.Due(tuple((jnp.ones(num_local, dtype) @ p)[None] for p in gathered()), 0)
    if spanned:
        row = ring.read(due)
        row = lax.all_gather(row, spanned, tiled=True) if apart else lax.psum(row, spanned)
        due = ring.as_due(row)
    return due, in_flight


def _exchange_sparse(message, in_flight, step, axes, dtype):
    if message.support is None:
        raise ValueError(
            'exchange="sparse" needs a sparse compressor on the worker side '
            "(fsq.transforms.compress(fsq.compression.top_k(...)) or random_k)"
        )
    row = jnp.concatenate(wire.parts(message, dtype))
    num_channels = len(message.channels)
    size = (row.size - wire.NUM_TOTALS) // num_channels
    kept = message.support
    positions = jnp.concatenate(
        [kept + c * size for c in range(num_channels)]
        + [jnp.arange(wire.NUM_TOTALS, dtype=kept.dtype) + num_channels * size]
    )
    values = row[positions]
    # One all-gather: the delay and the positions travel bit-cast in the values' row. With
    # positions shared by every worker (random-k with a shared key) only values travel.
    shared = message.shared_support
    integer = jnp.dtype(f"int{8 * values.dtype.itemsize}")
    pieces = [values, jnp.asarray(message.delay, integer)[None]]
    if not shared:
        pieces.append(positions.astype(integer))
    gathered = _axes.stack(
        jnp.concatenate([lax.bitcast_convert_type(p, values.dtype) for p in pieces]), axes.names
    )
    k = values.shape[0]
    values, integers = gathered[:, :k], lax.bitcast_convert_type(gathered[:, k:], integer)
    delays = integers[:, :1].astype(jnp.int32)
    if not shared:
        positions = integers[:, 1:].astype(jnp.int32)
    positions = jnp.broadcast_to(positions, values.shape)
    if not in_flight.slots.shape[0]:
        return ring.as_due(jnp.zeros(row.size, dtype).at[positions].add(values)), in_flight
    write = ring.scatter_messages(positions, values, delays, step)
    return ring.advance(in_flight, step, write, lazy=False)


def totals(due: ring.Due, num_workers: int, apart: bool) -> Totals:
    """The :class:`Totals` of what is due, over every worker (read where called)."""
    if not apart:
        return Totals(*ring.read(due, -wire.NUM_TOTALS))
    rows = ring.read(due).reshape(num_workers, -1)
    return Totals(*sum_in_order(rows[:, -wire.NUM_TOTALS :]))


def sum_in_order(x: jax.Array) -> jax.Array:
    """``x[0] + x[1] + ...`` over the leading (worker) axis, added in that order whatever
    the program around it, so that every layout rounds the same way."""
    total, _ = lax.scan(lambda acc, row: (acc + row, None), jnp.zeros_like(x[0]), x)
    return total


def merge_in_order() -> DeliverTransformation:
    """The delivery piece of the ``"ordered"`` exchange: the workers' sums, kept apart by
    the line, added in worker order (:func:`sum_in_order`), all channels in one pass."""

    def update(arrival, state, params, context):
        del params, context
        row = sum_in_order(arrival.rows)
        like = jax.tree.map(lambda x: x[0], arrival.channels[0])  # one worker's shapes
        read = lambda start, size: row[start : start + size]  # noqa: E731
        channels = wire.unpack(read, like, len(arrival.channels))
        return arrival._replace(channels=channels, by_worker=None, rows=None), state

    return DeliverTransformation(lambda params, layout: optax.EmptyState(), update, True)


def arrival(
    due: ring.Due,
    like: optax.Updates,
    num_channels: int,
    totals: Totals,
    num_workers: int,
    apart: bool,
) -> Arrival:
    """What is due as an :class:`Arrival`, read in the current scope (inside the inner
    step's branch, so that XLA fuses the reads into their use)."""
    here = ring.computed(due)
    if apart:
        rows = ring.read(here).reshape(num_workers, -1)
        channels, by_worker = wire.unpack_rows(rows, like, num_channels)
        return Arrival(channels, totals, by_worker, rows=rows[:, : -wire.NUM_TOTALS])
    channels = wire.unpack(functools.partial(ring.read, here), like, num_channels)
    return Arrival(channels, totals)
