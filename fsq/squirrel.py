r"""Flying Squirrel: asynchronous data-parallel optimization with exactly simulated delays.

Every logical worker :math:`i \in \{0..W-1\}` calls ``update`` once per logical step
:math:`t` with its own gradient :math:`g_i(t)`, computed at the shared parameters
:math:`w_t`. The gradient is delivered at step :math:`t + d_i(t)`, with the delay drawn
from a :mod:`fsq.delays` model as a pure function of ``(seed, t, i)``. At step :math:`t`
the inner optimizer (the "server") is stepped on

.. math::

  G_t = \frac{1}{W} \sum_{(i, s):\, s + d_i(s) = t} g_i(s),

and the same update is returned on every worker. When nothing is delivered, the inner
optimizer is not stepped and the update is zero. With delay 0 this is exactly synchronous
data-parallel training with the inner optimizer.

Per step, a worker *sends* a message (its gradient plus bookkeeping scalars, packed into
one row by :mod:`fsq.transforms.wire`) into the in-flight buffer of its device
(:mod:`fsq.transforms.delivery`), and all workers *deliver* the row that is due, with one
all-reduce for the whole model. The algorithmic pieces act at one end or the other:

- at send time, per worker: faults (:mod:`fsq.transforms.faults`: is the worker live,
  what does it send), the rejection of non-finite gradients, the bounded-staleness
  policy, the staleness-aware scale (:mod:`fsq.transforms.staleness`), the
  load-balancing weight, and the extra channels of delay compensation
  (:mod:`fsq.transforms.compensation`);
- at delivery, identical on every worker: the robust aggregation of the workers'
  messages, if any (:mod:`fsq.transforms.aggregation`), the delay-compensated
  combination of the channels with the current parameters, and the inner step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from fsq import _axes, _checks, _random, delays
from fsq.transforms import aggregation as _aggregation
from fsq.transforms import compensation as dc
from fsq.transforms import compression as _compression
from fsq.transforms import delivery, per_worker, wire
from fsq.transforms import faults as _faults
from fsq.transforms import staleness as _staleness

ON_STALE = ("drop", "wait")
EXCHANGES = ("dense", "sparse")


class Scalars(NamedTuple):
    """The bookkeeping scalars of a message; summed in flight like the gradient.

    Attributes:
      count: 1 for a gradient that will be applied, 0 for one dropped (by the staleness
        bound, or for not being finite).
      delay_sum: its delay (the staleness it will have when delivered), times ``count``.
      bounded: 1 if the staleness bound dropped or held back this gradient.
      weight: the factor the gradient was scaled by (0 if dropped).
      rejected: 1 if the gradient had a NaN or an infinity (it is sent as zeros).
      lost: 1 if the worker was down (a fault) when it should have sent it.
    """

    count: jax.Array
    delay_sum: jax.Array
    bounded: jax.Array
    weight: jax.Array
    rejected: jax.Array
    lost: jax.Array


class FlyingSquirrelState(NamedTuple):
    """State of :func:`flying_squirrel`, held by every worker.

    Attributes:
      step: the logical clock :math:`t` (int32), identical on all workers.
      in_flight: the messages in flight from this device's workers.
      inner_state: state of the inner optimizer, identical on all workers.
      compensation: state of delay compensation (the mean square of DC-ASGD-a).
      delivered: how many gradients were delivered at the last step (int32).
      staleness: their mean staleness :math:`t - s` in steps (float32; 0 if none).
      bounded: how many gradients due at the last step the staleness bound dropped or
        held back (int32).
      rejected: how many gradients due at the last step were rejected at send time for
        holding a NaN or an infinity (int32); they never reach the parameters or the
        inner optimizer state.
      lost: how many gradients due at the last step were never sent, their worker being
        down (:mod:`fsq.faults`) (int32).
      error_feedback: the error-feedback residuals of this device's workers
        (:class:`fsq.transforms.per_worker.PerWorker`), or ``optax.EmptyState()``.
      worker_momentum: the momentum of this device's workers (a ``PerWorker``), or
        ``optax.EmptyState()``.
      votes: with a robust aggregation, every worker's latest vote
        (:class:`fsq.aggregation.Votes`), else ``optax.EmptyState()``.
      bytes_sent: the bytes a worker's message takes on the wire per step (float32; the
        dense float32 gradient is ``4 P``), whatever the exchange simulates it with.
    """

    step: jax.Array
    in_flight: delivery.InFlight
    inner_state: optax.OptState
    compensation: optax.OptState
    delivered: jax.Array
    staleness: jax.Array
    bounded: jax.Array
    rejected: jax.Array
    lost: jax.Array
    error_feedback: per_worker.PerWorker | optax.EmptyState
    worker_momentum: per_worker.PerWorker | optax.EmptyState
    votes: _aggregation.Votes | optax.EmptyState
    bytes_sent: jax.Array


def _all_finite(tree: optax.Updates) -> jax.Array:
    """Whether every entry of ``tree`` is finite.

    ``0 * g`` is 0 where ``g`` is finite and NaN where it is not, so ``sum(g @ 0)`` tells,
    exactly: as a matrix-vector product (rows of up to 1024 entries, so the zero vector
    stays small) it is one multithreaded pass over ``g``, where reducing the boolean mask
    ``isfinite(g)`` made a delay-0 step 1.6x slower on CPU.
    """

    def zero_or_nan(g):
        width = math.gcd(g.size, 1024)  # a power of two that divides the size
        return jnp.sum(g.reshape(-1, width) @ jnp.zeros(width, g.dtype))

    return jnp.isfinite(sum(zero_or_nan(g) for g in jax.tree.leaves(tree)))


def _accumulation_dtype(params: optax.Params) -> jnp.dtype:
    # Sums of many low-precision gradients would lose their small terms: use at least f32.
    return jnp.result_type(jnp.float32, *[jnp.result_type(x) for x in jax.tree.leaves(params)])


def _check_same_structure(updates: optax.Updates, params: optax.Params | None) -> None:
    if params is None:
        return
    got, want = jax.tree.structure(updates), jax.tree.structure(params)
    if got != want:
        raise ValueError(f"updates and params must have the same tree structure: {got} != {want}")


def flying_squirrel(
    inner: optax.GradientTransformation,
    *,
    num_workers: int,
    axis_name: str | tuple[str, ...] = "workers",
    delay: int | delays.DelayModel = 0,
    compensation: float | str | dc.DelayCompensation | None = "adaptive",
    staleness: str | _staleness.StalenessRule | None = "weighted_step",
    max_staleness: int | None = None,
    on_stale: str = "drop",
    load_balance: bool = False,
    faults: _faults.FaultModel | Sequence[_faults.FaultModel] | None = None,
    aggregation: str | _aggregation.Aggregation | None = "mean",
    compression: _compression.Compressor | None = None,
    exchange: str = "dense",
    worker_momentum: float | None = None,
    seed: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Asynchronous data-parallel training with delayed gradients, used per worker.

    Call ``init`` and ``update`` inside a mapped context whose ``axis_name`` axes hold
    ``num_workers`` workers in all (``jax.vmap``, ``jax.shard_map``, ``jax.pmap``, or
    nested), or let :mod:`fsq.parallel` build the step. Vmap axes share one in-flight
    buffer per device; mesh axes exchange one row per step with one all-reduce.

    .. math::

      G_t = \frac{1}{W} \sum_{(i,s):\, s + d_i(s) = t} \omega_i\, \alpha(d_i(s))\,
      \tilde g_i(s), \qquad
      (u_t, S_{t+1}) = \begin{cases} \mathrm{inner}(G_t, S_t, w_t) & \text{if anything
      is delivered at } t \\ (0, S_t) & \text{otherwise,} \end{cases}

    with :math:`\tilde g` the delay-compensated gradient (:math:`g` when compensation is
    off), :math:`\alpha` the staleness rule (1 when off) and :math:`\omega_i` the
    load-balancing weight (1 when off); the default ``"weighted_step"`` rule instead
    feeds the inner optimizer the :math:`\alpha`-weighted mean and scales its step (see
    :mod:`fsq.staleness`).

    **Defaults.** ``staleness="weighted_step"`` and ``compensation="adaptive"`` were
    chosen by measurement (``python -m experiments coordination``, docs/results.md):
    MNIST-1D MLP, 8 workers, learning rate tuned for synchronous training and frozen,
    then uniform delays up to 16 and 64 and heavy-tailed stragglers. This pair
    (:math:`\tau_C = 3`, :math:`\lambda_0 = 1`) keeps 98.4-105.6% of synchronous
    accuracy with SGD-momentum and Adam inners and no diverged seed, where plain
    asynchronous training diverges from max_delay 16 and the best single published
    technique keeps 87-92% at max_delay 64. With delay 0 the defaults are exactly
    synchronous training. Pass ``staleness=None, compensation=None`` for plain
    asynchronous SGD.

    Args:
      inner: the optimizer applied to the delivered aggregate (any optax transform).
      num_workers: :math:`W \ge 1`, the number of logical workers over ``axis_name``.
      axis_name: the mapped axis name, or a tuple of nested names (outermost first) whose
        mixed-radix index is the global worker id.
      delay: an int (a constant delay) or a :mod:`fsq.delays` model.
      compensation: delay compensation (DC-ASGD): ``None`` (off), a float
        :math:`\lambda \ge 0` (DC-ASGD-c), ``"adaptive"`` (DC-ASGD-a with
        :math:`\lambda_0 = 1`, the default) or :func:`fsq.compensation.adaptive`. It
        needs ``params`` in ``update`` and triples the in-flight buffer and the bytes of
        the all-reduce; with ``max_delay`` 0 it is exactly zero and is skipped.
      staleness: a staleness-aware step-size rule: ``None`` (off), ``"weighted_step"``
        (:math:`\tau_C = 3`, the default), ``"inverse"``,
        ``"delay_adaptive"``, a :class:`fsq.staleness.StalenessRule`
        or a callable ``tau -> scale`` (:mod:`fsq.staleness`).
      max_staleness: bounded staleness: gradients with a delay above this bound, an int in
        ``[0, max_delay]``, are handled by ``on_stale``; ``None`` for no bound.
      on_stale: ``"drop"`` discards a too-stale gradient (it is never applied);
        ``"wait"`` holds the system back as stale-synchronous parallel does, which in the
        logical clock delivers it exactly ``max_staleness`` steps late. Either way the
        state counts it in ``bounded``.
      load_balance: with a :func:`fsq.delays.speeds` model, give worker :math:`i` the
        share :math:`s_i \propto 1/k_i` of the global batch (see
        :meth:`fsq.delays.Speeds.shares`; the training loop feeds it that many samples),
        so that every worker's delay becomes the harmonic-mean one
        (:meth:`fsq.delays.Speeds.balanced`), and weight its gradient by
        :math:`\omega_i = W s_i`.
      faults: a :mod:`fsq.faults` model or a sequence of them (``None``: no faults). A
        worker that is down sends nothing and the step's live gradients are weighted by
        :math:`W / n_s`, :math:`n_s` the number of live workers at the sending step;
        messages sent before a crash are still delivered; Byzantine workers send
        corrupted gradients.
      aggregation: how the delivered gradients are combined: ``"mean"`` (the default:
        partial sums and one all-reduce), or a robust rule of :mod:`fsq.aggregation`
        (``"median"``, ``"trimmed_mean"`` or a rule object), which keeps each local
        worker's messages apart in the in-flight buffer (``W/D`` times its memory) and
        all-gathers the workers' messages at delivery; each device remembers every
        worker's latest vote (``W`` message widths), and the rule reduces the recent
        ones. With a robust rule ``init`` must
        run inside the mapped context, as ``update`` does (:mod:`fsq.parallel` does so).
      compression: a :mod:`fsq.compression` operator (``top_k``, ``random_k``, ``sign``,
        ``quantize``), with error feedback by default (a per-worker residual, so ``init``
        must run inside the mapped context); ``None`` sends the dense gradient.
      exchange: ``"dense"`` (default): messages travel as dense rows, one all-reduce at
        delivery; with compression this simulates the compressed numerics exactly while
        ``bytes_sent`` counts the compressed wire. ``"sparse"`` (``top_k`` / ``random_k``):
        each worker's (index, value) pairs are all-gathered when sent and added into the
        buffer locally: a real sparse collective, equal to the dense path. With a delay
        model that never gives delay 0 (e.g. ``delay=1``), the dense exchange's all-reduce
        depends only on the buffer, not on this step's gradient, so XLA can overlap it with
        the backward pass (see docs: overlapped exchange).
      worker_momentum: :math:`\beta \in [0, 1)`: each worker sends its momentum
        :math:`m_i \leftarrow \beta m_i + (1 - \beta) g_i` instead of its gradient (worker
        momentum, Karimireddy, He and Jaggi, *Learning from History for Byzantine Robust
        Optimization*, ICML 2021): averaging over time shrinks the honest workers' noise,
        so a robust ``aggregation`` can tell Byzantine messages apart. ``None``: off.
      seed: the seed of every random choice (delays); runs are a pure function of it.
        A traced int scalar is accepted too, to ``jit`` or ``vmap`` over seeds.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`FlyingSquirrelState`; extra arguments are passed on to ``inner``.

    Example:
      >>> import jax, jax.numpy as jnp, fsq
      >>> tx = fsq.flying_squirrel(fsq.sgd(1.0), num_workers=2, delay=1)
      >>> params = jnp.zeros(1)
      >>> grads = jnp.array([[1.0], [3.0]])              # one gradient per worker
      >>> init = jax.vmap(tx.init, axis_size=2, in_axes=None, axis_name="workers")
      >>> update = jax.vmap(tx.update, in_axes=(0, 0, None), axis_name="workers")
      >>> state = init(params)
      >>> u, state = update(grads, state, params)         # t = 0: nothing delivered yet
      >>> print(u[0])
      [0.]
      >>> u, state = update(0 * grads, state, params)     # t = 1: the mean of step 0
      >>> print(u[0], state.staleness[0])
      [-2.] 1.0
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(
            f"inner must be an optax.GradientTransformation, got {type(inner).__name__}"
        )
    num_workers = _checks.integer("num_workers", num_workers, low=1)
    names = _axes.normalize(axis_name)
    model = delays.as_delay_model(delay)
    if not isinstance(seed, jax.core.Tracer):
        seed = _checks.integer("seed", seed, low=0)
    if model.num_workers is not None and model.num_workers != num_workers:
        raise ValueError(
            f"delay model is defined for {model.num_workers} workers but num_workers={num_workers}"
        )
    weights = None
    if load_balance:
        if not isinstance(model, delays.Speeds):
            raise ValueError(
                "load_balance=True needs per-worker speeds: delay=fsq.delays.speeds(...), "
                f"got {type(model).__name__}"
            )
        weights = jnp.asarray(model.shares(), jnp.float32) * num_workers
        model = model.balanced()
    if max_staleness is not None:
        max_staleness = _checks.integer("max_staleness", max_staleness, 0, model.max_delay)
    if on_stale not in ON_STALE:
        raise ValueError(f"on_stale must be one of {ON_STALE}, got {on_stale!r}")
    # The smallest delay a message is sent with: waiting clips delays to the bound.
    min_delay = model.min_delay
    if max_staleness is not None and on_stale == "wait":
        min_delay = min(min_delay, max_staleness)
    rule = _staleness.resolve(staleness, model)
    fault_model = _faults.as_fault_model(faults)
    if fault_model is not None:
        fault_model.check(num_workers)
    robust = _aggregation.resolve(aggregation)
    if compression is not None and not isinstance(compression, _compression.Compressor):
        raise TypeError(
            "compression must be None or a fsq.compression operator (top_k, random_k, sign, "
            f"quantize), got {type(compression).__name__} {compression!r}"
        )
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    sparse = exchange == "sparse"
    if sparse and (compression is None or not compression.sparse):
        raise ValueError(
            'exchange="sparse" needs a sparse compression (fsq.compression.top_k or random_k)'
        )
    if sparse and robust.per_worker:
        raise ValueError('exchange="sparse" works with aggregation="mean" only')
    feedback = compression is not None and compression.error_feedback
    if worker_momentum is not None:
        worker_momentum = float(_checks.probability_like("worker_momentum", worker_momentum))
    config = dc.resolve(compensation)
    if model.max_delay == 0:  # then w_t == w_s: compensation is identically zero
        config = None
    # Delivery counts and delay sums travel as floats; keep them exact in float32.
    if num_workers * (model.max_delay + 1) > 2**24:
        raise ValueError(
            f"num_workers * (max_delay + 1) must be at most 2**24, got {num_workers} * "
            f"{model.max_delay + 1}"
        )
    num_trees = 1 if config is None else 3
    num_scalars = len(Scalars._fields)
    inner = optax.with_extra_args_support(inner)

    def row_segments() -> int:
        """Messages side by side in an in-flight row: one per local worker if kept apart."""
        if not robust.per_worker:
            return 1
        return _axes.local_count(_axes.resolve(names, num_workers).local)

    def buffer_width(like: optax.Params) -> int:
        """Entries of an in-flight row."""
        return wire.width(like, num_trees, num_scalars) * row_segments()

    def wire_bytes(params: optax.Params) -> float:
        sizes = [x.size for x in jax.tree.leaves(params)]
        if compression is None:
            return float(_compression.dense_bytes(sizes, num_trees))
        return float(compression.payload_bytes(sizes, num_trees))

    def init_fn(params: optax.Params) -> FlyingSquirrelState:
        width = buffer_width(params)
        # Per-worker state needs the count of local workers: only then is init mapped.
        mapped = feedback or worker_momentum is not None
        local = _axes.resolve(names, num_workers).local if mapped else ()
        size = sum(x.size for x in jax.tree.leaves(params))
        dtype = _accumulation_dtype(params)
        empty = optax.EmptyState()
        return FlyingSquirrelState(
            step=jnp.zeros([], jnp.int32),
            in_flight=delivery.init(
                model.max_delay,
                width,
                dtype,
                early=min_delay > 0,
                segments=row_segments(),
            ),
            inner_state=inner.init(params),
            compensation=empty if config is None else dc.init(config, params),
            delivered=jnp.zeros([], jnp.int32),
            staleness=jnp.zeros([], jnp.float32),
            bounded=jnp.zeros([], jnp.int32),
            rejected=jnp.zeros([], jnp.int32),
            lost=jnp.zeros([], jnp.int32),
            error_feedback=per_worker.init(local, size, dtype) if feedback else empty,
            worker_momentum=(
                empty if worker_momentum is None else per_worker.init(local, size, dtype)
            ),
            votes=(
                _aggregation.init_votes(num_workers, num_trees * size, dtype)
                if robust.per_worker
                else empty
            ),
            bytes_sent=jnp.float32(wire_bytes(params)),
        )

    def live_share(step, worker):
        """Whether ``worker`` is live at ``step``, and the weight ``W / n_live`` of a live one."""
        if fault_model is None:
            return jnp.bool_(True), jnp.float32(1)

        def live(i):
            return fault_model.live(_random.event_key(seed, _random.Stream.FAULT, step, i), step, i)

        n_live = jnp.sum(jax.vmap(live)(jnp.arange(num_workers)).astype(jnp.float32))
        return live(worker), num_workers / jnp.maximum(n_live, 1.0)

    def compress(updates, residual, count, step, worker):
        """Compresses ``updates`` plus the worker's residual; returns the compressed
        updates, the new residual and the positions kept (sparse compressors, else None).
        A message that carries nothing leaves the residual as it was."""
        flat, unravel = ravel_pytree(updates)
        x = flat.astype(residual.dtype) + residual if feedback else flat
        sizes = [g.size for g in jax.tree.leaves(updates)]
        stream_worker = 0 if compression.shared else worker  # shared: same choice for all
        key = _random.event_key(seed, _random.Stream.COMPRESSION, step, stream_worker)
        kept = None
        if compression.sparse:
            kept = compression.indices(x, sizes, key)
            sent = jnp.zeros_like(x).at[kept].set(x[kept])
        else:
            sent = compression.compress(x, sizes, key)
        if feedback:
            residual = jnp.where(count > 0, x - sent, residual)
        return unravel(sent.astype(flat.dtype)), residual, kept

    def with_momentum(updates, velocity, ok):
        """The worker's momentum including ``updates``, as updates, and the new momentum
        (unchanged if the worker computed nothing usable)."""
        flat, unravel = ravel_pytree(updates)
        new = worker_momentum * velocity + (1 - worker_momentum) * flat.astype(velocity.dtype)
        new = jnp.where(ok, new, velocity)
        return unravel(new.astype(flat.dtype)), new

    def send(updates, params, delay, step, worker, residual, velocity):
        """One worker's message: its channels, scalars, (possibly clipped) delay, new
        residual and momentum, and the positions of a sparse message."""
        alive, share = live_share(step, worker)
        # A non-finite gradient is rejected: sent as zeros (``wire.parts`` selects on
        # ``finite``), counted, and kept out of the worker's momentum.
        finite = _all_finite(updates)
        if worker_momentum is not None:  # the honest message, which an attacker corrupts
            updates, velocity = with_momentum(updates, velocity, alive & finite)
        if fault_model is not None:
            key = _random.event_key(seed, _random.Stream.FAULT, step, worker)
            updates = fault_model.send(key, step, worker, updates)
            finite = finite & _all_finite(updates)
        count = (finite & alive).astype(jnp.float32)
        bounded = jnp.float32(0)
        if max_staleness is not None:
            late = delay > max_staleness
            bounded = late.astype(jnp.float32)
            if on_stale == "wait":
                delay = jnp.minimum(delay, max_staleness)
            else:
                count = count * (1.0 - bounded)
        kept = None
        if compression is not None:
            updates, residual, kept = compress(updates, residual, count, step, worker)
        scale = count * share
        if rule is not None:
            scale = scale * rule.scale(delay)
        if weights is not None:
            scale = scale * weights[worker]
        trees = [updates] if config is None else dc.channels(updates, params)
        lost = 1.0 - alive.astype(jnp.float32)
        rejected = (1.0 - finite) * (1.0 - lost)
        scalars = Scalars(count, count * delay, bounded, scale, rejected, lost)
        return trees, scalars, delay, residual, velocity, kept, finite

    def update_fn(
        updates: optax.Updates,
        state: FlyingSquirrelState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, FlyingSquirrelState]:
        _check_same_structure(updates, params)
        if config is not None and params is None:
            raise ValueError("compensation needs the current params: call update(g, s, params)")
        slots = state.in_flight.slots
        if buffer_width(updates) != slots.shape[-1]:
            raise ValueError(
                "updates must have the shapes of the params given to init, in the same "
                f"mapped context: they need {buffer_width(updates)} entries per in-flight "
                f"row, the buffer holds {slots.shape[-1]}"
            )
        axes = _axes.resolve(names, num_workers)
        worker = _axes.worker_index(axes.names)
        step = state.step
        delay = model(_random.event_key(seed, _random.Stream.DELAY, step, worker), step, worker)

        residuals, residual = state.error_feedback, None
        momenta, velocity = state.worker_momentum, None
        if feedback:
            residual = per_worker.read(residuals, axes.local)
        if worker_momentum is not None:
            velocity = per_worker.read(momenta, axes.local)
        trees, scalars, delay, residual, velocity, kept, finite = send(
            updates, params, delay, step, worker, residual, velocity
        )
        if feedback:  # every local worker returns the device's whole block
            residuals = per_worker.write(residual, axes.local)
        if worker_momentum is not None:
            momenta = per_worker.write(velocity, axes.local)

        def parts():
            return wire.parts(trees, scalars, slots.dtype, scalars.weight, finite)

        if sparse:
            message = jnp.concatenate(parts())
            size = (message.size - num_scalars) // num_trees
            positions = jnp.concatenate(
                [kept + c * size for c in range(num_trees)]
                + [jnp.arange(num_scalars, dtype=kept.dtype) + num_trees * size]
            )
            due, in_flight = delivery.exchange_sparse(
                state.in_flight,
                positions,
                message[positions],
                delay,
                step,
                axes.names,
                message.size,
                shared_positions=compression.shared,
            )
        else:
            due, in_flight = delivery.exchange(
                state.in_flight, parts, delay, step, axes.local, axes.device, robust.per_worker
            )
        votes = state.votes
        if robust.per_worker:  # the due row holds each worker's sums: [W, width]
            total = delivery.read(due).reshape(num_workers, -1)
            weights = total[:, -num_scalars + Scalars._fields.index("weight")]
            robust_sum, votes = _aggregation.aggregate(
                robust, votes, total[:, :-num_scalars], weights, step, model.max_delay
            )
            scalar_sums = jnp.sum(total[:, -num_scalars:], axis=0)
            due = delivery.as_due(jnp.concatenate([robust_sum, scalar_sums]))
        arrived = Scalars(*delivery.read(due, -num_scalars))
        delivered = jnp.round(arrived.count).astype(jnp.int32)
        # Gradient scope: the scaled sum over W. Step scope: the weighted mean, and the
        # inner step is scaled by the total weight over W.
        by_step = rule is not None and rule.scope == "step"

        def step_inner(_):
            # Unpacking inside the branch lets XLA fuse it into the inner update.
            here = delivery.computed(due)
            sums = wire.unpack(functools.partial(delivery.read, here), updates, num_trees)
            comp_state = state.compensation
            if config is None:
                (delivered_sum,) = sums
            else:
                delivered_sum, comp_state = dc.combine(
                    config, comp_state, sums, params, arrived.weight
                )
            norm = jnp.maximum(arrived.weight, 1e-30) if by_step else num_workers
            mean = jax.tree.map(lambda s, g: (s / norm).astype(g.dtype), delivered_sum, updates)
            new_updates, inner_state = inner.update(mean, state.inner_state, params, **extra_args)
            if by_step:
                step_scale = arrived.weight / num_workers
                new_updates = jax.tree.map(lambda u: u * step_scale.astype(u.dtype), new_updates)
            return new_updates, inner_state, comp_state

        def skip(_):
            return optax.tree.zeros_like(updates), state.inner_state, state.compensation

        new_updates, inner_state, comp_state = jax.lax.cond(delivered > 0, step_inner, skip, None)
        return new_updates, FlyingSquirrelState(
            step=step + 1,
            in_flight=in_flight,
            inner_state=inner_state,
            compensation=comp_state,
            delivered=delivered,
            staleness=(arrived.delay_sum / jnp.maximum(arrived.count, 1.0)).astype(jnp.float32),
            bounded=jnp.round(arrived.bounded).astype(jnp.int32),
            rejected=jnp.round(arrived.rejected).astype(jnp.int32),
            lost=jnp.round(arrived.lost).astype(jnp.int32),
            error_feedback=residuals,
            worker_momentum=momenta,
            votes=votes,
            bytes_sent=state.bytes_sent,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
