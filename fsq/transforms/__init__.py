"""The pieces Flying Squirrel is assembled from (:func:`fsq.asynchronous`).

Worker side (:class:`SendTransformation`, per worker, own state): :func:`clock` (workers
that compute at their own pace, coordinated by a policy of :mod:`fsq.timing`),
:func:`liveness`, :func:`reject_non_finite`, :func:`local_steps` (each worker trains its
own parameters), :func:`worker_momentum`, :func:`attack`, :func:`bound_staleness`,
:func:`compress`, :func:`scale_by_staleness`, :func:`scale_by_worker`,
:func:`gaussian_noise`, :func:`compensation_channels`, and any
optax transformation (:func:`on_gradient`).

The delay line: :func:`delay_line` (:class:`DelayLine`; its state is :class:`fsq.InFlight`).

Delivery side (:class:`DeliverTransformation`, identical on every worker):
:func:`robust`, :func:`compensate`, :func:`normalise`.

What flows between them: :class:`Message`, :class:`Arrival` (with its :class:`Totals`),
:class:`Context`, :class:`Layout`, :class:`Status`.
"""

from fsq.transforms.attack import attack
from fsq.transforms.bound import bound_staleness
from fsq.transforms.clock import Schedule, clock
from fsq.transforms.delay_compensation import (
    CompensationState,
    compensate,
    compensation_channels,
)
from fsq.transforms.error_feedback import ErrorFeedbackState, compress
from fsq.transforms.line import DelayLine, delay_line
from fsq.transforms.liveness import liveness
from fsq.transforms.local import LocalState, local_steps
from fsq.transforms.message import (
    Arrival,
    Context,
    DeliverTransformation,
    Layout,
    Message,
    SendTransformation,
    Status,
    Totals,
    keep_if_sent,
    new_message,
    on_gradient,
)
from fsq.transforms.momentum import worker_momentum
from fsq.transforms.noise import gaussian_noise
from fsq.transforms.normalise import normalise
from fsq.transforms.rejection import all_finite, reject_non_finite
from fsq.transforms.robust import Votes, robust
from fsq.transforms.weighting import scale_by_staleness, scale_by_worker

__all__ = [
    "Arrival",
    "CompensationState",
    "Context",
    "DelayLine",
    "DeliverTransformation",
    "ErrorFeedbackState",
    "Layout",
    "LocalState",
    "Message",
    "SendTransformation",
    "Status",
    "Schedule",
    "Totals",
    "Votes",
    "all_finite",
    "attack",
    "bound_staleness",
    "clock",
    "compensate",
    "compensation_channels",
    "compress",
    "delay_line",
    "gaussian_noise",
    "keep_if_sent",
    "liveness",
    "local_steps",
    "new_message",
    "normalise",
    "on_gradient",
    "reject_non_finite",
    "robust",
    "scale_by_staleness",
    "scale_by_worker",
    "worker_momentum",
]
