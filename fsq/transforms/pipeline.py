"""The pieces of an assembly checked against each other at construction (:func:`pipeline`).

Example:
  >>> import fsq
  >>> T = fsq.transforms
  >>> p = T.pipeline.pipeline(
  ...     4, [T.reject_non_finite(), T.compensation_channels()], T.delay_line(3),
  ...     [T.compensate(fsq.compensation.adaptive())])
  >>> p.num_channels, p.span(fsq.delays.constant(3)), len(p.deliver)  # normalise added
  (3, (3, 3), 2)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import optax

from fsq.compression import dense_bytes
from fsq.delays import DelayModel
from fsq.transforms import line as _line
from fsq.transforms.message import DeliverTransformation, SendTransformation, on_gradient
from fsq.transforms.normalise import normalise


def _as_send(piece: Any) -> SendTransformation:
    return piece if isinstance(piece, SendTransformation) else on_gradient(piece)


class Pipeline(NamedTuple):
    """The pieces of an assembly, and what they make of a message, resolved at construction.

    Attributes:
      send: the worker-side pieces.
      deliver: the delivery-side pieces, the last one normalising.
      delays: the pieces' changes to the range of delays, in order.
      num_channels: the channels of a message.
      wire_bytes: ``(leaf sizes, channels) -> bytes`` of a message on the wire.
      apart: whether the delay line keeps each worker's sums apart.
      support: ``leaf sizes -> (k, per leaf)`` for sparse messages, else ``None``
        (:attr:`~fsq.transforms.SendTransformation.support`).
    """

    send: tuple[SendTransformation, ...]
    deliver: tuple[DeliverTransformation, ...]
    delays: tuple[Callable[[tuple[int, int]], tuple[int, int]], ...]
    num_channels: int
    wire_bytes: Callable[[Sequence[int], int], int]
    apart: bool
    support: Callable[[Sequence[int]], tuple[int, tuple[int, ...] | None]] | None = None

    def span(self, link: DelayModel) -> tuple[int, int]:
        """``(min, max)`` delay a message can travel with over ``link`` (resolved for the
        size of a message): the link's, as the pieces change it."""
        span = (link.min_delay, link.max_delay)
        for change in self.delays:
            span = change(span)
        return span


def pipeline(
    num_workers: int,
    send: Sequence[SendTransformation | optax.GradientTransformation],
    line: _line.DelayLine,
    deliver: Sequence[DeliverTransformation],
) -> Pipeline:
    """Checks the pieces against each other and the line; raises what does not fit."""
    if not isinstance(line, _line.DelayLine):
        raise TypeError(f"line must be a fsq.transforms.delay_line(...), got {line!r}")
    model = line.model
    if model.num_workers is not None and model.num_workers != num_workers:
        raise ValueError(
            f"delay model is defined for {model.num_workers} workers but num_workers={num_workers}"
        )
    send = tuple(_as_send(piece) for piece in send)
    num_channels, wire_bytes, support = 1, dense_bytes, None
    for piece in send:
        num_channels = piece.channels or num_channels
        wire_bytes = piece.wire_bytes or wire_bytes
        support = piece.support or support
    delays = tuple(piece.delays for piece in send if piece.delays)
    deliver = tuple(deliver)
    for piece in deliver:
        if not isinstance(piece, DeliverTransformation):
            raise TypeError(
                f"deliver pieces must be fsq.transforms.DeliverTransformation, got {piece!r}"
            )
    if not deliver or not deliver[-1].normalises:
        deliver += (normalise("workers"),)
    arriving = num_channels
    for piece in deliver:
        if piece.normalises and arriving != 1:
            raise ValueError(
                f"the messages carry {arriving} channels, but normalise needs one: add "
                "fsq.transforms.compensate(...) to deliver (delay compensation's channels)"
            )
        arriving = piece.channels or arriving
    if sum(piece.normalises for piece in deliver) != 1:
        raise ValueError("deliver must end with its one normalise(...) piece")
    apart = any(piece.workers_apart for piece in deliver)
    if any(piece.workers_apart for piece in deliver[1:]):
        raise ValueError("a piece that keeps the workers apart (robust) must come first in deliver")
    if line.exchange == "ordered" and not apart:  # the mean, added in worker order
        deliver, apart = (_line.merge_in_order(), *deliver), True
    if apart and line.exchange == "sparse":
        raise ValueError('exchange="sparse" works with the mean aggregation only')
    pipeline = Pipeline(send, deliver, delays, num_channels, wire_bytes, apart, support)
    # The pieces check the range of delays (a bound above the largest, say) at once, on a
    # link of the message's size: the size is known later, so at the smallest.
    _, high = pipeline.span(model.for_message(0))
    # Delivery counts and delay sums travel as floats; keep them exact in float32.
    if num_workers * (high + 1) > 2**24:
        raise ValueError(
            f"num_workers * (max_delay + 1) must be at most 2**24, got {num_workers} * {high + 1}"
        )
    return pipeline
