"""Save and restore the full training state, gradients in flight included.

Everything a run needs to continue lives in its state pytree: the parameters, the inner
optimizer state, the in-flight buffer (the gradients sent but not yet delivered), delay
compensation's statistics and the logical step, from which every random choice (delays,
faults) is drawn again. Saving that pytree with orbax-checkpoint and restoring it into a
state of the same layout therefore continues the run exactly, bit for bit, in a fresh
process. Sharded arrays (the per-device in-flight blocks of :mod:`fsq.parallel`) are
saved and restored with their shardings, from every process of a multi-host job.

Each save is one numbered step directory, written atomically (orbax writes to a
temporary directory and renames it when complete), and the newest ``max_to_keep`` are
kept: a crash while saving, or a damaged latest checkpoint, leaves the previous ones
readable. A CRC-32 of each array saved beside orbax's files lets ``restore`` refuse
changed bytes, which the array files alone would restore silently.

Example:
  >>> import tempfile, jax.numpy as jnp, fsq
  >>> directory = tempfile.mkdtemp()
  >>> state = {"w": jnp.arange(3.0), "step": jnp.int32(7)}
  >>> fsq.checkpoint.save(directory, 7, state)
  >>> fsq.checkpoint.latest_step(directory)
  7
  >>> restored = fsq.checkpoint.restore(directory, state)
  >>> print(restored["w"])
  [0. 1. 2.]
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fsq import _checks

__all__ = ["all_steps", "latest_step", "restore", "save"]

PathLike = str | os.PathLike
CHECKSUMS = "fsq_checksums.json"  # beside orbax's files in each step's directory


def _manager(directory: PathLike, max_to_keep: int | None = None, create: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=create, enable_async_checkpointing=False
    )
    # The handler named up front lets a fresh process read metadata before any restore.
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_handlers=ocp.StandardCheckpointHandler()
    )


def save(directory: PathLike, step: int, state: Any, *, max_to_keep: int = 3) -> None:
    """Saves ``state`` (any pytree of arrays) as checkpoint ``step`` of ``directory``.

    Call it from every process of a multi-host job. Only the newest ``max_to_keep``
    checkpoints are kept.

    Args:
      directory: the checkpoint directory (created if missing).
      step: the checkpoint's number, an int >= 0 (usually the training step).
      state: the pytree to save, e.g. a :class:`fsq.parallel.TrainState`.
      max_to_keep: how many checkpoints to keep, an int >= 1.
    """
    step = _checks.integer("step", step, low=0)
    max_to_keep = _checks.integer("max_to_keep", max_to_keep, low=1)
    with _manager(directory, max_to_keep, create=True) as manager:
        if step in manager.all_steps():
            raise ValueError(f"checkpoint {step} already exists in {directory}")
        stored = _without_empty(state)
        manager.save(step, args=ocp.args.StandardSave(stored))
        manager.wait_until_finished()
    digests = _digests(stored)
    if jax.process_index() == 0 and digests:
        path = _checksums(directory, step)
        with open(path + ".tmp", "w") as f:
            json.dump(digests, f)
        os.replace(path + ".tmp", path)  # whole or not at all


def all_steps(directory: PathLike) -> list[int]:
    """The checkpoints of ``directory``, oldest first (empty if there are none)."""
    if not os.path.isdir(directory):
        return []
    with _manager(directory) as manager:
        return sorted(manager.all_steps())


def latest_step(directory: PathLike) -> int | None:
    """The newest checkpoint of ``directory``, or ``None``."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


def _without_empty(tree: Any) -> Any:
    """``tree`` with its zero-size arrays (e.g. the in-flight buffer without delays) as
    ``None``: they hold nothing, and orbax cannot save them."""
    return jax.tree.map(lambda x: None if np.size(x) == 0 else x, tree)


def _checksums(directory: PathLike, step: int) -> str:
    """The file of checkpoint ``step``'s checksums, beside orbax's in its directory."""
    return os.path.join(os.path.abspath(directory), str(step), CHECKSUMS)


def _digests(tree: Any) -> dict[str, str]:
    """``{dotted path: CRC-32 of its bytes}`` of the arrays of ``tree`` that this process
    holds whole (all of them in a one-process job)."""
    digests = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            continue
        data = np.ascontiguousarray(np.asarray(leaf)).reshape(-1).view(np.uint8)
        digests[_path_name(path)] = f"{zlib.crc32(data):08x}"
    return digests


def _check_digests(directory: PathLike, step: int, restored: Any, where: str) -> None:
    """Raises a ``ValueError`` where ``restored`` differs from the checksums saved with it."""
    path = _checksums(directory, step)
    if not os.path.exists(path):
        return  # saved without checksums (or by another tool): nothing to compare
    with open(path) as f:
        saved = json.load(f)
    for name, digest in _digests(restored).items():
        if name in saved and saved[name] != digest:
            raise ValueError(
                f"{where} is damaged: the data of {name} does not match the checksum saved "
                "with it (restore an older checkpoint with step=)"
            )


def _path_name(path: tuple) -> str:
    return ".".join(_key_name(k) for k in path)


def _key_name(key: Any) -> str:
    for attribute in ("name", "key", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _layout(tree: Any, *, saved: bool) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{dotted path: (shape, dtype)}`` of a state, or of a checkpoint's metadata."""
    layout = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        layout[leaf.name if saved else _path_name(path)] = (tuple(leaf.shape), np.dtype(leaf.dtype))
    return layout


def _check_layout(saved: dict, wanted: dict, where: str) -> None:
    missing, extra = sorted(wanted.keys() - saved.keys()), sorted(saved.keys() - wanted.keys())
    if missing or extra:
        raise ValueError(
            f"{where} does not match the state to restore into: missing {missing}, "
            f"unexpected {extra}"
        )
    for name, (shape, dtype) in wanted.items():
        if saved[name] != (shape, dtype):
            raise ValueError(
                f"{where} does not match the state to restore into: {name} is "
                f"{saved[name][0]} {saved[name][1]} in the checkpoint, {shape} {dtype} here. "
                f"Was it saved with another {_likely_cause(name)}?"
            )


def _likely_cause(name: str) -> str:
    """The settings that shape the state's part ``name``, for a mismatch's message."""
    if "in_flight" in name:
        return (
            "largest delay (the messages in flight hold max_delay + 1 rows), number of "
            "workers or devices, compression or in_flight_dtype"
        )
    if name.startswith("params") or name.startswith("model_state"):
        return "model"
    return "optimizer, number of workers or devices"


def restore(directory: PathLike, like: Any, *, step: int | None = None) -> Any:
    """Restores checkpoint ``step`` (default: the newest) of ``directory`` into ``like``'s layout.

    Args:
      directory: the checkpoint directory.
      like: a state of the same structure, shapes and dtypes, e.g. a fresh
        ``dp.init(params)``; its shardings are the restored arrays' shardings.
      step: which checkpoint; ``None`` for the newest.

    Returns:
      The saved state, with the structure and shardings of ``like``.

    Raises:
      FileNotFoundError: there is no such checkpoint.
      ValueError: the checkpoint's tree, shapes or dtypes differ from ``like``'s, or its
        files are damaged: unreadable, or an array's data differs from the CRC-32
        ``save`` stored beside it (arrays one process holds whole; older checkpoints stay
        readable: pass their ``step``).
    """
    steps = all_steps(directory)
    if step is None and not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    step = steps[-1] if step is None else _checks.integer("step", step, low=0)
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint {step} in {directory}; there are {steps}")
    where = f"checkpoint {step} in {directory}"
    with _manager(directory) as manager:
        try:
            saved = _layout(manager.item_metadata(step), saved=True)
        except Exception as e:  # orbax raises many kinds of errors on a damaged directory
            raise ValueError(f"{where} is unreadable (damaged?): {e}") from e
        stored = _without_empty(like)
        if not saved and jax.tree.leaves(stored):
            raise ValueError(
                f"{where} is unreadable: its metadata lists no arrays (a save or a deletion "
                "interrupted? restore an older checkpoint with step=)"
            )
        _check_layout(saved, _layout(stored, saved=False), where)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, stored)
        try:
            restored = manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as e:
            raise ValueError(f"{where} is unreadable (damaged?): {e}") from e
    _check_digests(directory, step, restored, where)
    # The empty arrays come back from ``like``.
    return jax.tree.map(lambda x, r: x if np.size(x) == 0 else r, like, restored)
