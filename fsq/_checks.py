"""Argument validation shared by every public constructor.

Each check raises at construction time with a message that names the argument and the
accepted range, so a typo never surfaces later as a NaN deep inside a jitted step. Values
that are JAX tracers (e.g. hyperparameters injected with ``optax.inject_hyperparams``)
cannot be inspected and are passed through unchecked.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import optax


def _is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, jax.Array)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return result


def real_in_range(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Any:
    """Checks ``low <(=) value <(=) high``; returns ``value`` unchanged."""
    if _is_traced(value):
        return value
    x = _as_float(name, value)
    too_low = x <= low if low_open else x < low
    too_high = x >= high if high_open else x > high
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {left}{low}, {high}{right}, got {value!r}")
    return value


def positive(name: str, value: Any) -> Any:
    """Checks ``value > 0``."""
    return real_in_range(name, value, 0.0, low_open=True)


def probability_like(name: str, value: Any) -> Any:
    """Checks ``0 <= value < 1`` (decay rates, momentum coefficients)."""
    return real_in_range(name, value, 0.0, 1.0, high_open=True)


def learning_rate(value: Any, name: str = "learning_rate") -> Any:
    """Checks a learning rate: a non-negative finite float, or a schedule (callable)."""
    if callable(value):
        return value
    return real_in_range(name, value, 0.0)


def integer(name: str, value: Any, low: int = 0, high: int | None = None) -> int:
    """Checks that ``value`` is an integer in ``[low, high]`` and returns it as ``int``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        upper = "inf)" if high is None else f"{high}]"
        raise ValueError(f"{name} must be an int in [{low}, {upper}, got {value!r}")
    return int(value)


def scalar(value: Any) -> Any:
    """``value`` as a Python float, unless it is traced (an injected hyperparameter)."""
    return value if _is_traced(value) else float(value)


def transformation(name: str, value: Any) -> optax.GradientTransformation:
    """Checks that ``value`` is an optax transformation (a preset's, a chain, any); an
    ``optax.MultiSteps`` object gives its ``gradient_transformation()``."""
    if isinstance(value, optax.MultiSteps):
        return value.gradient_transformation()
    if not isinstance(value, optax.GradientTransformation):
        raise TypeError(
            f"{name} must be an optax.GradientTransformation, got {type(value).__name__}"
        )
    return value
