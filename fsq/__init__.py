"""fsq — Flying Squirrel: fast, delay-tolerant, reproducible distributed gradient descent."""

from fsq import (
    aggregation,
    checkpoint,
    compensation,
    compression,
    delays,
    faults,
    parallel,
    placement,
    staleness,
    timing,
    transforms,
)
from fsq.accumulation import AccumulationState, accumulate
from fsq.assembly import FlyingSquirrelState, asynchronous
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
from fsq.squirrel import flying_squirrel
from fsq.transforms.ring import InFlight

__version__ = "0.1.0"

__all__ = [
    "AccumulationState",
    "FlyingSquirrelState",
    "InFlight",
    "accumulate",
    "adagrad",
    "adam",
    "aggregation",
    "asynchronous",
    "bgd",
    "checkpoint",
    "compensation",
    "compression",
    "delays",
    "faults",
    "flying_squirrel",
    "get_optimizer",
    "momentum",
    "nesterov",
    "parallel",
    "placement",
    "rmsprop",
    "sgd",
    "staleness",
    "timing",
    "transforms",
]
