r"""Flax NNX models trained by data-parallel (asynchronous) workers.

:class:`DataParallel` is to a data-parallel run what ``nnx.Optimizer`` is to one
device: it holds the model and the optimizer state, and every :meth:`DataParallel.step`
updates the model in place. Underneath, the model is split once into its parameters
(``wrt``), its random streams and the rest of its state (BatchNorm statistics, any
mutable collection), and :func:`fsq.parallel.data_parallel` runs one jitted step of
``W`` workers over the mesh, each computing the gradient of its own shard of the batch
on its own copy of the model.

- **Random streams.** At step :math:`t`, worker :math:`i` reseeds every stream ``name``
  of its copy (``nnx.reseed``) with

  .. math:: k = \operatorname{fold\_in}(k_{t,i}, \operatorname{crc32}(\text{name})),
     \qquad k_{t,i} = \operatorname{fold\_in}(\operatorname{fold\_in}(
     \operatorname{key}(\text{seed}), t), i),

  so dropout masks depend on the seed, the step and the *logical* worker only, never on
  the devices they run on.
- **Model state.** Each worker updates its own copy's state (its batch's statistics);
  after the step the trainer keeps their mean over the workers that computed a gradient
  at this step, as synchronous data parallelism with averaged statistics does. Every
  worker starts the next step from the same state.
- **Modes.** Workers run the model in training mode (``Module.train()``: dropout on,
  batch statistics); :meth:`DataParallel.evaluate` in evaluation mode
  (``Module.eval()``).

``nnx.Optimizer`` cannot hold a Flying Squirrel transform: it calls the transform
outside any worker axis, and the transform says so when the optimizer is built.

Example:
  >>> import jax.numpy as jnp, numpy as np, optax, fsq
  >>> from flax import nnx
  >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  >>> tx = fsq.flying_squirrel(fsq.sgd(0.1), num_workers=4, delay=1,
  ...                          axis_name=fsq.parallel.AXIS_NAME)
  >>> def loss_fn(model, batch):
  ...     return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
  >>> trainer = fsq.nnx.DataParallel(model, tx, loss_fn, num_workers=4, backend="vmap")
  >>> batch = {"x": np.ones((4, 8, 3), np.float32), "y": np.zeros((4, 8, 1), np.float32)}
  >>> losses = trainer.step(batch)   # [4]: each worker's loss
  >>> losses.shape
  (4,)
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fsq import parallel
from fsq._local import check_output
from fsq.evaluation import evaluator
from fsq.metrics import step_metrics

__all__ = ["DataParallel"]

LossFn = Callable[[nnx.Module, Any], Any]


class DataParallel:
    """Trains ``model`` with ``tx`` over ``num_workers`` data-parallel workers.

    Args:
      model: the ``nnx.Module``; updated in place after every step.
      tx: the optimizer, called per worker (a Flying Squirrel transform built with
        ``axis_name=fsq.parallel.AXIS_NAME`` and the same ``num_workers``, or any optax
        transformation).
      loss_fn: ``(model, worker_batch) -> loss``, or ``(loss, aux)`` with ``has_aux``,
        for one worker's shard; ``model`` is that worker's copy, in training mode.
      num_workers: ``W``, a multiple of the number of devices.
      backend: ``"vmap"`` (one device), ``"shard_map"`` or ``"pmap"``.
      mesh: the mesh (default: all devices), see :func:`fsq.parallel.data_parallel`; with
        model axes each worker's copy of the model is sharded over them.
      param_specs: how the parameters are sharded over the mesh's model axes (see
        :func:`fsq.parallel.data_parallel`); ``None``: as the model's variables are (a
        model built under ``jax.set_mesh(mesh)`` with ``nnx.with_partitioning``
        metadata), else :func:`fsq.parallel.fsdp`'s rule.
      wrt: the filter of the variables that are trained (default ``nnx.Param``).
      has_aux: ``loss_fn`` returns ``(loss, aux)``; :meth:`step` returns the workers'
        aux stacked ``[W, ...]``.
      seed: the seed of the workers' random streams (dropout).
      gradient_slots: see :func:`fsq.parallel.data_parallel`.

    Attributes:
      model: the module being trained.
      data_parallel: the underlying :class:`fsq.parallel.DataParallel` (its ``mesh``,
        ``local_workers`` and ``put_batch`` for multi-process jobs).
    """

    def __init__(
        self,
        model: nnx.Module,
        tx: Any,
        loss_fn: LossFn,
        *,
        num_workers: int,
        backend: str = "shard_map",
        mesh: jax.sharding.Mesh | None = None,
        param_specs: Any = None,
        wrt: Any = nnx.Param,
        has_aux: bool = False,
        seed: int = 0,
        gradient_slots: int | None = None,
    ):
        if not isinstance(model, nnx.Module):
            raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.model = model
        self._filters = (wrt, nnx.RngState, ...)
        graphdef, params, streams, model_state = nnx.split(model, *self._filters)
        if not jax.tree.leaves(params):
            raise ValueError(f"the model has no variables of wrt={wrt!r} to train")
        names = sorted(
            {s.key.tag for _, s in nnx.iter_graph(model) if isinstance(s, nnx.RngStream)}
        )

        self._graphdef, self._streams = graphdef, streams

        def worker_loss(params, batch, *, key, model_state=None):
            copy = self._copy(params, model_state)
            copy.train()
            nnx.reseed(copy, **{n: jax.random.fold_in(key, zlib.crc32(n.encode())) for n in names})
            out = loss_fn(copy, batch)
            check_output(out, has_aux)  # before its parts are taken apart below
            if model_state is None:
                return out
            new_state = nnx.split(copy, *self._filters)[3]
            return (out[0], (out[1], new_state)) if has_aux else (out, new_state)

        self.data_parallel = parallel.data_parallel(
            worker_loss,
            tx,
            num_workers=num_workers,
            backend=backend,
            mesh=mesh,
            param_specs=param_specs,
            gradient_slots=gradient_slots,
            has_aux=has_aux,
            seed=seed,
            donate_params=False,  # the module holds them, and so may its clones
        )
        stateful = bool(jax.tree.leaves(model_state))
        self._state = self.data_parallel.init(params, model_state if stateful else None)
        self._evaluators: dict[Callable, Callable] = {}

    @property
    def state(self) -> parallel.TrainState:
        """The whole training state: what :mod:`fsq.checkpoint` saves and restores."""
        return self._state

    @state.setter
    def state(self, state: parallel.TrainState) -> None:
        self._state = state
        self._sync()

    def step(self, batch: Any) -> Any:
        """One step of every worker on ``batch`` (leaves ``[W, ...]``, a shard per worker).

        Returns:
          The ``[W]`` workers' losses before the update (NaN for a worker a clock keeps
          busy), or with ``has_aux`` ``(losses, aux)``.
        """
        self._state, out = self.data_parallel.step(self._state, batch)
        self._sync()
        return out

    def metrics(self) -> dict[str, jax.Array]:
        """The transform's metrics of the last step (:func:`fsq.step_metrics`)."""
        return step_metrics(self._state.opt_state)

    def evaluate(
        self, metric_fn: Callable[[nnx.Module, Any], dict[str, jax.Array]], batch: Any
    ) -> dict[str, jax.Array]:
        """The mean of ``metric_fn``'s per-example values over ``batch``, on the model.

        Jitted and sharded over the trainer's mesh (:func:`fsq.parallel.evaluator`); the
        batch (leaves ``[n, ...]``, any ``n``) need not divide into the devices.

        Args:
          metric_fn: ``(model, batch) -> {name: [n] per-example values}``; ``model`` is
            the trained model in evaluation mode.
          batch: the examples.
        """
        if metric_fn not in self._evaluators:

            def on_model(variables, batch):
                model = self._copy(*variables)
                model.eval()
                return metric_fn(model, batch)

            self._evaluators[metric_fn] = evaluator(on_model, mesh=self.data_parallel.mesh)
        variables = (self._state.params, self._state.model_state)
        return self._evaluators[metric_fn](variables, batch)

    def _copy(self, params: Any, model_state: Any) -> nnx.Module:
        """A copy of the model with these variables (and its random streams), built in
        the current trace, where the model may write them."""
        parts = [self._streams] + ([] if model_state is None else [model_state])
        return nnx.merge(self._graphdef, params, *jax.tree.map(jnp.asarray, parts))

    def _sync(self) -> None:
        """The model's variables become the state's (the arrays themselves, no copy)."""
        parts = [self._state.params]
        if self._state.model_state is not None:
            parts.append(self._state.model_state)
        nnx.update(self.model, *parts)
