"""Per-step metrics to disk: TensorBoard event files (via tensorboardX) and a CSV.

TensorBoard's event files are what Flax's, optax's and most JAX training loops are read
with; tensorboardX writes them with numpy and protobuf alone (no TensorFlow), and the
CSV beside them is for pandas and spreadsheets. In a multi-process job only process 0
writes; the others' calls do nothing, so every process runs the same loop.

Example:
  >>> import tempfile, jax.numpy as jnp, fsq
  >>> logdir = tempfile.mkdtemp()
  >>> with fsq.MetricWriter(logdir) as writer:
  ...     writer.write(1, {"loss": jnp.float32(0.5), "delivered": 8})
  ...     writer.write(2, {"loss": 0.25, "delivered": 8})
  >>> print(open(f"{logdir}/metrics.csv").read().strip())
  step,delivered,loss
  1,8,0.5
  2,8,0.25
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


class MetricWriter:
    """Writes scalar metrics per step to ``logdir``: TensorBoard events and ``metrics.csv``.

    Args:
      logdir: the directory (created if missing); TensorBoard reads it with
        ``tensorboard --logdir``.
      tensorboard: also write TensorBoard event files (needs ``tensorboardX``, installed
        by ``pip install fsq[metrics]``); ``False``: the CSV only.

    The CSV's columns are ``step`` and the names of the first :meth:`write`, sorted; a
    later write with other names raises, so that no column is silently dropped. A NaN or
    infinite value is written to the CSV only (TensorBoard has no point to draw).
    """

    def __init__(self, logdir: str | os.PathLike, *, tensorboard: bool = True):
        self.logdir = os.fspath(logdir)
        self.active = jax.process_index() == 0
        self._columns: list[str] | None = None
        self._csv = self._rows = self._events = None
        if not self.active:
            return
        os.makedirs(self.logdir, exist_ok=True)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as e:
                raise ImportError(
                    "MetricWriter(tensorboard=True) needs tensorboardX: pip install "
                    "'fsq[metrics]' (or pass tensorboard=False for the CSV alone)"
                ) from e
            self._events = SummaryWriter(self.logdir)
        self._csv = open(os.path.join(self.logdir, "metrics.csv"), "w", newline="")  # noqa: SIM115
        self._rows = csv.writer(self._csv)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Writes the scalars ``metrics`` (Python numbers or size-1 arrays) at ``step``."""
        if not self.active:
            return
        if self._csv is None:
            raise ValueError("the MetricWriter is closed")
        values = {name: _scalar(name, value) for name, value in metrics.items()}
        if self._columns is None:
            self._columns = sorted(values)
            self._rows.writerow(["step", *self._columns])
        elif sorted(values) != self._columns:
            raise ValueError(
                f"metrics names {sorted(values)} differ from the first write's "
                f"{self._columns}: write the same names every step (or use another writer)"
            )
        self._rows.writerow([int(step), *(_text(values[c]) for c in self._columns)])
        if self._events is not None:
            for name, value in values.items():
                if math.isfinite(value):  # TensorBoard draws no point for NaN or inf
                    self._events.add_scalar(name, value, int(step))

    def flush(self) -> None:
        """Writes what is buffered to disk."""
        if self._csv is not None:
            self._csv.flush()
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        """Flushes and closes the files; further writes raise."""
        if self._csv is not None:
            self._csv.close()
            self._csv = None
        if self._events is not None:
            self._events.close()
            self._events = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _scalar(name: str, value: Any) -> float | int:
    array = np.asarray(jax.device_get(value))
    if array.size != 1:
        raise ValueError(
            f"metric {name!r} must be a scalar, got shape {array.shape}: reduce it first "
            "(e.g. the mean of the workers' losses)"
        )
    item = array.reshape(()).item()
    if isinstance(item, bool) or not isinstance(item, int | float):
        raise TypeError(f"metric {name!r} must be a real number, got {array.dtype}")
    return item


def _text(value: float | int) -> str:
    return repr(value) if isinstance(value, int) or math.isfinite(value) else str(value)
