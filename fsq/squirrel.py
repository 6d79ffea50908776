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

:func:`flying_squirrel` is a preset: it resolves its keyword arguments into pieces of
:mod:`fsq.transforms` and assembles them with :func:`fsq.asynchronous`, as
``optax.adam`` is a preset over ``optax.chain``. Its pipeline, with the pieces that each
argument adds:

.. code-block:: text

  worker side                                   delivery side
  clock(compute, policy)                        robust(aggregation)
  liveness(faults)
  reject_non_finite()                           compensate(compensation)
  local                     (local steps)       normalise("weight" for a step-scope rule)
  worker_momentum(worker_momentum)
  attack(faults)            (Byzantine models)
  bound_staleness(max_staleness, on_stale)
  compress(compression)
  scale_by_staleness(staleness)
  scale_by_worker(shares)   (load_balance)
  compensation_channels()   (compensation)

between them ``delay_line(delay, exchange=exchange)``, then the inner optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fsq import _checks, delays, transforms
from fsq import aggregation as _aggregation
from fsq import compensation as _compensation
from fsq import compression as _compression
from fsq import faults as _faults
from fsq import staleness as _staleness
from fsq import timing as _timing
from fsq.assembly import FlyingSquirrelState, asynchronous

__all__ = ["FlyingSquirrelState", "flying_squirrel"]


def flying_squirrel(
    inner: optax.GradientTransformation,
    *,
    num_workers: int,
    axis_name: str | tuple[str, ...] = "workers",
    delay: int | delays.DelayModel = 0,
    compensation: float | str | _compensation.DelayCompensation | None = "adaptive",
    staleness: str | _staleness.StalenessRule | None = "weighted_step",
    max_staleness: int | None = None,
    on_stale: str = "drop",
    load_balance: bool = False,
    faults: _faults.FaultModel | Sequence[_faults.FaultModel] | None = None,
    aggregation: str | _aggregation.Aggregation | None = "mean",
    compression: _compression.Compressor | None = None,
    exchange: str = "dense",
    in_flight_dtype: jnp.dtype | None = None,
    in_flight: str = "auto",
    worker_momentum: float | None = None,
    compute: _timing.ComputeModel | None = None,
    policy: str | _timing.Policy = "asynchronous",
    tick_seconds: float = 1.0,
    local: transforms.SendTransformation | None = None,
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
    chosen by measurement (the coordination study, ``python -m experiments
    coordination``; its results and the protocol they hold on are in the documentation's
    results page, and the protocols study, ``python -m experiments protocols``, measures
    where they hold and where they fail over a grid of tasks, budgets, batches and inner
    optimizers): with delay 0 they are exactly synchronous training; with delays they
    keep a learning rate tuned for synchronous training stable where plain asynchronous
    training diverges on that protocol. :func:`fsq.look_ahead` around them is opt-in.
    Pass ``staleness=None, compensation=None`` for plain asynchronous SGD.

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
        the all-reduce; where no applied gradient can be stale (``max_delay`` 0, or a
        policy that applies only fresh gradients: synchronous, backup, Rennala) it is
        exactly zero and is skipped.
      staleness: a staleness-aware step-size rule: ``None`` (off), ``"weighted_step"``
        (:math:`\tau_C = 3`, the default), ``"inverse"``, ``"delay_adaptive"``, a
        :class:`fsq.staleness.StalenessRule` or a callable ``tau -> scale``
        (:mod:`fsq.staleness`).
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
        (``"median"``, ``"trimmed_mean"``, ``"centered_clip"`` or a rule object), which
        keeps each local worker's messages apart in the in-flight buffer (``W/D`` times
        its memory) and all-gathers the workers' messages at delivery; each device
        remembers every worker's latest vote (``W`` message widths), and the rule reduces
        the recent ones. With a robust rule ``init`` must run inside the mapped context,
        as ``update`` does (:mod:`fsq.parallel` does so).
      compression: a :mod:`fsq.compression` operator (``top_k``, ``random_k``, ``sign``,
        ``quantize``), with error feedback by default (a per-worker residual);
        ``None`` sends the dense gradient.
      exchange: ``"dense"`` (default), ``"sparse"`` (with ``top_k`` / ``random_k``) or
        ``"ordered"`` (the workers' messages added in worker order: bit for bit the same
        over any split of the devices into processes, at the cost of an all-gather): how
        the delay line exchanges messages (:mod:`fsq.transforms.line`).
      in_flight_dtype: the floating dtype the in-flight buffer stores messages in
        (``None``: the dtype sums are formed in, float32 at least). ``jnp.bfloat16``
        halves the buffer: each stored sum is formed in float32 and rounded once (a
        relative error of at most :math:`2^{-8}` per write), the delivery counts stay
        exact, and delivery adds the devices' rows in float32.
      in_flight: how messages in flight are held (:class:`fsq.transforms.DelayLine`):
        ``"rows"`` (the sums due at each step), ``"pairs"`` (with a sparse compressor and
        the dense exchange: each message as the (position, value) pairs the wire carries,
        by send step; the same sums) or ``"auto"`` (pairs where they take fewer bytes).
      worker_momentum: :math:`\beta \in [0, 1)`: each worker sends its momentum
        :math:`m_i \leftarrow \beta m_i + (1 - \beta) g_i` instead of its gradient
        (:func:`fsq.transforms.worker_momentum`), so that a robust ``aggregation`` can tell
        Byzantine messages apart. ``None``: off.
      compute: a :mod:`fsq.timing` compute model: workers that take their own time per
        gradient, ``delay`` then being the link's transit (:func:`fsq.transforms.clock`);
        ``None``: every gradient takes one tick.
      policy: how the server coordinates the workers in time: ``"asynchronous"`` (the
        default), ``"synchronous"``, or a :mod:`fsq.timing` policy (``backup(b)``,
        ``rennala(B)``, ``ringmaster(R)``). With ``compute`` or another policy, staleness is
        counted in inner steps, and the state reports the simulated ``time``.
      tick_seconds: the seconds of one tick of the logical clock (with a clock).
      local: :func:`fsq.transforms.local_steps`: every worker trains its own parameters
        with a local optimizer and sends pseudo-gradients, ``inner`` being the outer
        optimizer (the presets :func:`fsq.local_sgd`, :func:`fsq.diloco`,
        :func:`fsq.streaming_diloco`, :func:`fsq.async_local_sgd`). Delay compensation
        does not apply to a pseudo-gradient and must be off. ``None``: one gradient per
        message.
      seed: the seed of every random choice (delays, faults, random-k, compute times); runs
        are a pure function of it. A traced int scalar is accepted too, to ``jit`` or
        ``vmap`` over seeds.

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
    model = delays.as_delay_model(delay)
    fault_model = _faults.as_fault_model(faults)
    if fault_model is not None:
        fault_model.check(num_workers)
    if compression is not None and not isinstance(compression, _compression.Compressor):
        raise TypeError(
            "compression must be None or a fsq.compression operator (top_k, random_k, sign, "
            f"quantize), got {type(compression).__name__} {compression!r}"
        )
    if exchange == "sparse" and (compression is None or not compression.sparse):
        raise ValueError(
            'exchange="sparse" needs a sparse compression (fsq.compression.top_k or random_k)'
        )
    if worker_momentum is not None:
        _checks.probability_like("worker_momentum", worker_momentum)
    shares = None
    if load_balance:
        if not isinstance(model, delays.Speeds):
            raise ValueError(
                "load_balance=True needs per-worker speeds: delay=fsq.delays.speeds(...), "
                f"got {type(model).__name__}"
            )
        shares = np.asarray(model.shares(), np.float32)
        model = model.balanced()
    rule = _staleness.resolve(staleness, model)
    config = _compensation.resolve(compensation)
    robust = _aggregation.resolve(aggregation)

    policy = _timing.resolve(policy)
    _checks.positive("tick_seconds", tick_seconds)
    clocked = compute is not None or policy != _timing.asynchronous()
    # Without staleness w_t == w_s: compensation is identically zero, and skipped. (A
    # message has at least a byte: on a bandwidth link even latency 0 delays it.)
    if not (policy.applies_stale if clocked else model.for_message(1).max_delay > 0):
        config = None
    if local is not None:
        if not isinstance(local, transforms.SendTransformation):
            raise TypeError(
                f"local must be fsq.transforms.local_steps(...), got {type(local).__name__}"
            )
        if config is not None:
            raise ValueError(
                "compensation must be None with local steps: delay compensation corrects a "
                "gradient by the curvature at its parameters, and a pseudo-gradient of "
                "several local steps is not one"
            )
    send = []
    if clocked:
        every_tick = _timing.fixed([1] * num_workers)
        send.append(
            transforms.clock(
                compute or every_tick, policy, tick_seconds=tick_seconds, num_workers=num_workers
            )
        )
    if fault_model is not None:
        send.append(transforms.liveness(fault_model))
    send.append(transforms.reject_non_finite())
    if local is not None:  # after the pieces that decide whether a gradient exists
        send.append(local)
    if worker_momentum is not None:  # the honest message, which an attacker corrupts
        send.append(transforms.worker_momentum(worker_momentum))
    if fault_model is not None and fault_model.corrupts:
        send.append(transforms.attack(fault_model))
    if max_staleness is not None:
        send.append(transforms.bound_staleness(max_staleness, on_stale))
    elif on_stale not in transforms.bound.ON_STALE:
        raise ValueError(f"on_stale must be one of {transforms.bound.ON_STALE}, got {on_stale!r}")
    if compression is not None:
        send.append(transforms.compress(compression))
    if rule is not None:
        send.append(transforms.scale_by_staleness(rule))
    if shares is not None:
        send.append(transforms.scale_by_worker(shares * np.float32(len(shares))))
    if config is not None:
        send.append(transforms.compensation_channels())

    deliver = []
    if robust.per_worker:
        deliver.append(transforms.robust(robust))
    if config is not None:
        deliver.append(transforms.compensate(config))
    by_step = rule is not None and rule.scope == "step"
    deliver.append(transforms.normalise("weight" if by_step else "workers"))
    return asynchronous(
        inner,
        num_workers=num_workers,
        axis_name=axis_name,
        send=send,
        line=transforms.delay_line(model, exchange=exchange, dtype=in_flight_dtype, hold=in_flight),
        deliver=deliver,
        seed=seed,
    )
