"""fsq — Flying Squirrel: fast, delay-tolerant, reproducible distributed gradient descent."""

from fsq import (
    aggregation,
    checkpoint,
    compensation,
    compression,
    delays,
    faults,
    nnx,
    parallel,
    placement,
    staleness,
    timing,
    transforms,
)
from fsq.accumulation import AccumulationState, accumulate
from fsq.assembly import FlyingSquirrelState, asynchronous
from fsq.implicit_momentum import (
    asynchrony_momentum,
    hyperparameters_under_delay,
    momentum_under_delay,
    rate_under_delay,
)
from fsq.local_sgd import async_local_sgd, diloco, fragment_labels, local_sgd, streaming_diloco
from fsq.look_ahead import LookAheadState, look_ahead
from fsq.metric_writer import MetricWriter
from fsq.metrics import step_metrics
from fsq.optimizers import (
    adagrad,
    adam,
    bgd,
    get_optimizer,
    momentum,
    nesterov,
    rmsprop,
    sgd,
)
from fsq.outer import DelayedNesterovState, delayed_nesterov
from fsq.squirrel import flying_squirrel
from fsq.transforms.ring import InFlight

__version__ = "0.1.0"

__all__ = [
    "AccumulationState",
    "DelayedNesterovState",
    "FlyingSquirrelState",
    "InFlight",
    "LookAheadState",
    "MetricWriter",
    "accumulate",
    "adagrad",
    "adam",
    "aggregation",
    "async_local_sgd",
    "asynchrony_momentum",
    "asynchronous",
    "bgd",
    "checkpoint",
    "compensation",
    "compression",
    "delayed_nesterov",
    "delays",
    "diloco",
    "faults",
    "flying_squirrel",
    "fragment_labels",
    "get_optimizer",
    "hyperparameters_under_delay",
    "local_sgd",
    "look_ahead",
    "momentum",
    "momentum_under_delay",
    "nesterov",
    "nnx",
    "parallel",
    "placement",
    "rate_under_delay",
    "rmsprop",
    "sgd",
    "staleness",
    "step_metrics",
    "streaming_diloco",
    "timing",
    "transforms",
]
