"""fsq — Flying Squirrel: fast, delay-tolerant, reproducible distributed gradient descent."""

from fsq import checkpoint, delays, parallel
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
from fsq.squirrel import FlyingSquirrelState, flying_squirrel
from fsq.transforms import aggregation, compensation, compression, faults, staleness
from fsq.transforms.accumulation import AccumulationState, accumulate
from fsq.transforms.delivery import InFlight

__version__ = "0.1.0"

__all__ = [
    "AccumulationState",
    "FlyingSquirrelState",
    "InFlight",
    "accumulate",
    "adagrad",
    "adam",
    "aggregation",
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
    "rmsprop",
    "sgd",
    "staleness",
]
