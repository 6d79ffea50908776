r"""Where a piece of optimizer state lives: replicated, per device, or per worker.

A transform used per worker (one ``update`` call per logical worker, under a mapped axis)
holds three kinds of state, and a layout of workers onto devices (:mod:`fsq.parallel`)
must store each kind differently:

- **replicated** (the default): identical on every worker, e.g. the inner optimizer's
  state. Stored once.
- **per device**: shared by the workers of one device and different across devices, e.g.
  the in-flight buffer that holds the partial sums of a device's workers. Stored as the
  devices' blocks concatenated along axis 0.
- **per worker**: each worker's own, e.g. an error-feedback residual. Under a ``vmap`` over
  the workers of a device it is batched (axis 0); stored as ``[W, ...]`` in global worker
  order.

State declares its placement with the class attribute ``placement``: a ``NamedTuple``
state class sets ``placement = PER_DEVICE`` (or ``PER_WORKER``) in its body, or any
pytree is wrapped in :class:`PerDevice` / :class:`PerWorker`. :mod:`fsq.parallel` reads
the declaration with :func:`placement_of` and never looks at concrete state types, so a
user's own transform can take part.

A per-worker state may also hold its worker's **own parameters** (local steps,
:func:`fsq.transforms.local_steps`): it then defines ``worker_params(params) -> params``,
the parameters its worker computes its gradient at given the global ones (replacing the
leaves it holds, passing the others through), and :func:`fsq.parallel.workers_step`
takes each worker's gradient there. Memory: its copy is per worker, :math:`W/D` copies
per device. Likewise a state that knows which workers compute at the coming step (a
clock, :func:`fsq.transforms.clock`) defines ``starting_workers() -> [W]`` booleans, and
:func:`fsq.parallel.workers_step` computes only those workers' gradients.

On a sharded model (:mod:`fsq.parallel` with model axes) a part of the state shaped like
the parameters is sharded like them. A per-device buffer not shaped like them (sparse
messages held as pairs, :mod:`fsq.transforms.pairs`) may instead name, in the class
attribute ``over_model_shards``, the fields whose leaves' last axis is divided among the
model shards of a worker group (:func:`over_model_shards`).

Example:
  >>> from typing import NamedTuple
  >>> import jax.numpy as jnp, fsq
  >>> class Residual(NamedTuple):
  ...     residual: jnp.ndarray
  ...     placement = fsq.placement.PER_WORKER
  >>> fsq.placement.placement_of(Residual(jnp.zeros(3)))
  'per_worker'
  >>> fsq.placement.placement_of(fsq.placement.PerDevice(jnp.zeros(3)))
  'per_device'
  >>> print(fsq.placement.placement_of(jnp.zeros(3)))
  None
"""

from __future__ import annotations

from typing import Any, NamedTuple

PER_DEVICE = "per_device"
PER_WORKER = "per_worker"
PLACEMENTS = (PER_DEVICE, PER_WORKER)

__all__ = [
    "PER_DEVICE",
    "PER_WORKER",
    "PLACEMENTS",
    "PerDevice",
    "PerWorker",
    "over_model_shards",
    "placement_of",
]


class PerDevice(NamedTuple):
    """Wraps state shared by the workers of a device: ``value``'s leaves are the device's
    blocks, concatenated along axis 0 across devices."""

    value: Any
    placement = PER_DEVICE


class PerWorker(NamedTuple):
    """Wraps state each worker holds its own of: ``value``'s leaves are batched over the
    workers (``[W, ...]`` in global worker order)."""

    value: Any
    placement = PER_WORKER


def placement_of(state: Any) -> str | None:
    """``PER_DEVICE`` or ``PER_WORKER`` if ``state`` declares it, else ``None`` (replicated)."""
    placement = getattr(type(state), "placement", None)
    return placement if placement in PLACEMENTS else None


def is_declared(state: Any) -> bool:
    """Whether ``state`` declares a placement (a leaf for tree maps over placements)."""
    return placement_of(state) is not None


def over_model_shards(state: Any) -> tuple[str, ...]:
    """The fields of ``state`` whose leaves' last axis a worker group's model shards divide
    among them (its class attribute ``over_model_shards``; ``()`` if it has none)."""
    return tuple(getattr(type(state), "over_model_shards", ()))
