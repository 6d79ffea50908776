r"""The clock: workers that compute at their own pace, and a policy that coordinates them.

Each tick, every worker calls ``update`` with the gradient the loop computed at the
current parameters; the clock decides what becomes of it (:mod:`fsq.timing`): a worker
free at tick :math:`s` starts a job with it, which takes :math:`c` ticks to compute and
:math:`\ell` ticks on the link; a busy worker's gradient is not sent at all (*idle*).
The worker is free again at :math:`s + c` (it does not wait for its message to arrive),
or, on a link of limited bandwidth (:func:`fsq.delays.bandwidth`), once the message's
transmission :math:`x \le \ell` is over, at :math:`s + c - 1 + \max(1, x)`: a worker
cannot send faster than its link.
The coordination policy decides whether a job's gradient is applied, and at which tick,
or discarded.

None of this depends on the gradients' values: the whole schedule is a pure function of
the seed. So the clock runs a small simulation of every worker's timing (a few integers
per worker and tick, identical on every worker) a *window* of ticks ahead of the
training loop, far enough that when a worker starts a job the job's fate is already
known: the worker sends its gradient with the delay to the tick it will be applied at
(:math:`\ge c - 1 + \ell`, where the policy holds it back), or marks it discarded, and
knows its staleness in inner steps, which the staleness rules use. The delay line and
everything after it are unchanged.

The simulation processes tick :math:`T` in three phases: free workers start jobs (in
rounds, every worker at once); the policy decides the jobs that arrive at :math:`T` (or
complete a batch or a round); there is an inner step at :math:`T` if it applies any. A
job read at tick :math:`s` has staleness :math:`K_a - K_s`, the inner steps at ticks in
:math:`[s, a)` for a job applied at :math:`a`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fsq import _checks, _random
from fsq.timing import ComputeModel, Policy
from fsq.transforms.message import SendTransformation, Status

PENDING, COLLECTED = -1, -2  # fates of a job not decided yet; collected into Rennala's batch


class Schedule(NamedTuple):
    """The timing simulation of every worker (replicated), and the clock's metrics.

    The window holds the jobs read at the ticks :math:`T - S + 1 .. T` (row ``s mod S``
    for tick :math:`s`), :math:`T` the next tick the simulation processes.

    Attributes:
      tick: :math:`T`.
      free_at: ``[W]``, the tick each worker is free again.
      jobs: ``[W]``, the jobs each worker has started.
      arrival: ``[S, W]``, the tick the job read at the row's tick arrives (-1: none).
      decided: ``[S, W]``, the tick it is applied or discarded (-1: not yet).
      applied: ``[S, W]``, whether it is applied.
      job_staleness: ``[S, W]``, its inner steps between read and apply (named apart
        from :attr:`fsq.FlyingSquirrelState.staleness`, for ``optax.tree.get``).
      duration: ``[S, W]``, its compute ticks.
      read_steps: ``[S]``, the inner steps before each row's tick.
      steps: the inner steps before :math:`T`.
      round_next: the tick the next round starts (synchronous, backup).
      collected: the gradients of Rennala's batch so far.
      time: simulated seconds of the training loop so far.
      busy_until: ``[W]``, in the loop's ticks, when each worker's current job ends.
      job_applied: ``[W]``, whether each worker's current job will be applied.
      busy: ``[W]``, ticks each worker has spent computing so far.
      idle: ``[W]``, ticks each worker has spent waiting (between jobs, or for a round).
      applied_work: worker-ticks spent on jobs that are applied.
      utilisation: the share of worker-time spent on gradients that were applied.
    """

    tick: jax.Array
    free_at: jax.Array
    jobs: jax.Array
    arrival: jax.Array
    decided: jax.Array
    applied: jax.Array
    job_staleness: jax.Array
    duration: jax.Array
    read_steps: jax.Array
    steps: jax.Array
    round_next: jax.Array
    collected: jax.Array
    time: jax.Array
    busy_until: jax.Array
    job_applied: jax.Array
    busy: jax.Array
    idle: jax.Array
    applied_work: jax.Array
    utilisation: jax.Array

    def starting_workers(self) -> jax.Array:
        """``[W]``: which workers start a job at the coming step of the training loop, so
        that the loop need not compute the others' gradients (they would not be sent).

        The protocol :func:`fsq.parallel.workers_step` reads (:mod:`fsq.placement`): any
        state with this method says who computes at the coming step."""
        rows = self.arrival.shape[0]
        return self.arrival[(self.tick - rows + 1) % rows] >= 0


def window(compute: ComputeModel, policy: Policy, link_max: int) -> int:
    """The most ticks from a job's start to the tick it is applied or discarded."""
    span = compute.max_ticks - 1 + link_max
    return span + compute.max_ticks - 1 if policy.name == "rennala" else span


def _start(state, policy, compute, context, tick):
    """Phase 1: free workers start jobs at ``tick`` (in rounds: every worker together)."""
    num_workers = state.free_at.shape[0]
    workers = jnp.arange(num_workers, dtype=jnp.int32)
    if policy.rounds:
        start = jnp.broadcast_to(tick == state.round_next, (num_workers,))
    else:
        start = state.free_at <= tick

    def durations(worker, job):
        key = _random.event_key(context.seed, _random.Stream.COMPUTE, job, worker)
        c = compute(key, worker, job, tick)
        link_key = _random.event_key(context.seed, _random.Stream.DELAY, tick, worker)
        return c, jnp.asarray(context.link(link_key, tick, worker), jnp.int32)

    c, transit = jax.vmap(durations)(workers, state.jobs)
    arrival = tick + c - 1 + transit
    # Sending occupies the worker's link for the transmission (bytes over bandwidth): it
    # starts its next job when its computation is done and its message has left.
    sending = getattr(context.link, "transmission", 0)
    row = tick % state.arrival.shape[0]
    state = state._replace(
        free_at=jnp.where(start, tick + c + max(sending - 1, 0), state.free_at),
        jobs=state.jobs + start,
        arrival=state.arrival.at[row].set(jnp.where(start, arrival, -1)),
        decided=state.decided.at[row].set(PENDING),
        applied=state.applied.at[row].set(False),
        job_staleness=state.job_staleness.at[row].set(0),
        duration=state.duration.at[row].set(jnp.where(start, c, 0)),
        read_steps=state.read_steps.at[row].set(state.steps),
    )
    if not policy.rounds:
        return state
    # A round ends at its last arrival (synchronous) or at its first W - b (backup, ties
    # broken by worker id); the rest are discarded then, and every worker waits for the
    # next round.
    keep = num_workers - policy.size if policy.name == "backup" else num_workers
    order = jnp.argsort(arrival * num_workers + workers)
    accepted = jnp.zeros(num_workers, bool).at[order[:keep]].set(True)
    end = jnp.max(jnp.where(accepted, arrival, -1))
    round_starts = start[0]
    return state._replace(
        decided=state.decided.at[row].set(jnp.where(start, end, PENDING)),
        applied=state.applied.at[row].set(start & accepted),
        free_at=jnp.where(round_starts, end + 1, state.free_at),
        round_next=jnp.where(round_starts, end + 1, state.round_next),
    )


def _decide(state, policy, tick):
    """Phase 2: the policy decides the jobs that arrive at ``tick``."""
    arrives = (state.arrival == tick) & (state.decided == PENDING)
    staleness = state.steps - state.read_steps[:, None]
    if policy.name in ("asynchronous", "ringmaster"):
        applied = arrives & (staleness < policy.size if policy.name == "ringmaster" else True)
        return state._replace(
            decided=jnp.where(arrives, tick, state.decided),
            applied=jnp.where(arrives, applied, state.applied),
            job_staleness=jnp.where(arrives, staleness, state.job_staleness),
        )
    if policy.name != "rennala":
        return state  # rounds were decided when they started
    # Rennala: of the arrivals computed at the current parameters, take (oldest first,
    # then by worker) what the batch still lacks; the rest are discarded.
    rows = state.arrival.shape[0]
    oldest_first = (tick + 1 + jnp.arange(rows)) % rows
    current = arrives & (staleness == 0)
    ordered = current[oldest_first].reshape(-1)
    rank = jnp.cumsum(ordered).reshape(rows, -1)
    taken = (
        jnp.zeros_like(current)
        .at[oldest_first]
        .set(current[oldest_first] & (rank <= policy.size - state.collected))
    )
    collected = state.collected + jnp.sum(taken)
    full = collected >= policy.size
    decided = jnp.where(arrives & ~taken, tick, state.decided)  # discarded now
    decided = jnp.where(taken, COLLECTED, decided)
    return state._replace(
        decided=jnp.where(full & (decided == COLLECTED), tick, decided),
        applied=state.applied | taken,
        collected=jnp.where(full, 0, collected),
    )


def share(policy: Policy, num_workers: int) -> float:
    """The weight of an applied gradient, so that a step is on the mean of the gradients it
    applies: :math:`W / (W - b)` for backup workers, :math:`W / B` for Rennala (the
    delivered sum is normalised by :math:`W`), else 1."""
    if policy.name == "backup":
        return num_workers / (num_workers - policy.size)
    if policy.name == "rennala":
        return num_workers / policy.size
    return 1.0


def advance(state: Schedule, compute: ComputeModel, policy: Policy, context) -> Schedule:
    """The simulation of one more tick (the state's :attr:`Schedule.tick`)."""
    tick = state.tick
    state = _decide(_start(state, policy, compute, context, tick), policy, tick)
    stepped = jnp.any((state.decided == tick) & state.applied)
    return state._replace(tick=tick + 1, steps=state.steps + stepped)


def clock(
    compute: ComputeModel,
    policy: Policy,
    *,
    tick_seconds: float = 1.0,
    num_workers: int | None = None,
) -> SendTransformation:
    r"""Workers that take ``compute``'s time per gradient, coordinated by ``policy``.

    Place it first on the worker side: it decides which gradients are jobs at all. Every
    message it sends carries the delay to the tick it is applied (or discarded) and its
    staleness in inner steps (:attr:`fsq.transforms.Message.staleness`); the link is the
    delay line's model. Its state (:class:`Schedule`: the simulation and the metrics
    ``time``, ``busy``, ``utilisation``) is the same on every worker.

    Args:
      compute: a :mod:`fsq.timing` compute model.
      policy: a :mod:`fsq.timing` policy.
      tick_seconds: the seconds of one tick, ``> 0``.
      num_workers: the number of workers, when known here: ``compute`` and ``policy`` are
        then checked against it now rather than at ``init``.

    Example:
      >>> import jax, jax.numpy as jnp, fsq
      >>> T = fsq.transforms
      >>> tx = fsq.asynchronous(fsq.sgd(1.0), num_workers=2,
      ...     send=[T.clock(fsq.timing.fixed([1, 3]), fsq.timing.synchronous())])
      >>> w = fsq.parallel.vmap_workers(tx, num_workers=2)
      >>> state = w.init(jnp.zeros(1))
      >>> for t in range(3):  # a round of 3 ticks: one step on the mean, at its end
      ...     u, state = w.update(jnp.array([[1.0], [3.0]]), state, jnp.zeros(1))
      ...     print(t, u, int(state.delivered))
      0 [0.] 0
      1 [0.] 0
      2 [-2.] 2
    """
    if not isinstance(compute, ComputeModel):
        raise TypeError(f"compute must be a fsq.timing compute model, got {compute!r}")
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a fsq.timing policy, got {policy!r}")
    seconds = _checks.scalar(_checks.positive("tick_seconds", tick_seconds))

    def check(num_workers: int) -> None:
        if compute.num_workers not in (None, num_workers):
            raise ValueError(
                f"the compute model is defined for {compute.num_workers} workers, but "
                f"num_workers={num_workers}"
            )
        if policy.name in ("backup", "rennala") and policy.size >= num_workers + (
            policy.name == "rennala"
        ):
            raise ValueError(
                f"{policy.name}({policy.size}) needs fewer backup workers than workers, or a "
                f"batch of at most num_workers={num_workers}"
            )

    if num_workers is not None:
        check(_checks.integer("num_workers", num_workers, low=1))

    def init(params, context):
        check(context.num_workers)
        num_workers = context.num_workers
        rows = window(compute, policy, context.link.max_delay) + 1
        zeros = jnp.zeros((rows, num_workers), jnp.int32)
        int32 = jnp.zeros([], jnp.int32)
        state = Schedule(
            int32,
            jnp.zeros(num_workers, jnp.int32),
            jnp.zeros(num_workers, jnp.int32),
            zeros - 1,
            zeros - 1,
            jnp.zeros((rows, num_workers), bool),
            zeros,
            zeros,
            jnp.zeros(rows, jnp.int32),
            int32,
            int32,
            int32,
            jnp.zeros([], jnp.float32),
            jnp.zeros(num_workers, jnp.int32),
            jnp.zeros(num_workers, bool),
            jnp.zeros(num_workers, jnp.int32),
            jnp.zeros(num_workers, jnp.int32),
            int32,
            jnp.zeros([], jnp.float32),
        )
        # Run ahead of the loop by the window (the rows less one).
        return jax.lax.fori_loop(
            0, rows - 1, lambda _, s: advance(s, compute, policy, context), state
        )

    def update(message, state, params, context):
        del params
        state = advance(state, compute, policy, context)
        row = context.step % state.arrival.shape[0]
        started, fate = state.arrival[row] >= 0, state.decided[row]
        mine = context.worker
        status = jnp.where(
            started[mine],
            jnp.where(state.applied[row, mine], Status.SENT, Status.DISCARDED),
            Status.IDLE,
        )
        low = context.link.min_delay + compute.min_ticks - 1  # a delay the ring can hold
        message = message._replace(
            delay=jnp.where(started[mine], fate[mine] - context.step, low).astype(jnp.int32),
            staleness=state.job_staleness[row, mine],
            weight=message.weight * share(policy, context.num_workers),
        ).mark(status, status > Status.SENT)
        # The metrics, tick by tick in the loop's time: who computes now, and for what.
        until = jnp.where(started, context.step + state.duration[row], state.busy_until)
        job_applied = jnp.where(started, state.applied[row], state.job_applied)
        computing = context.step < until
        elapsed = context.step + 1
        busy = state.busy + computing
        applied_work = state.applied_work + jnp.sum(computing & job_applied)
        state = state._replace(
            time=elapsed.astype(jnp.float32) * seconds,
            busy_until=until,
            job_applied=job_applied,
            busy=busy,
            idle=elapsed - busy,
            applied_work=applied_work,
            utilisation=applied_work / (elapsed * busy.shape[0]).astype(jnp.float32),
        )
        return message, state

    def delays(span):
        low, high = span
        return (low + compute.min_ticks - 1, window(compute, policy, high))

    return SendTransformation(init, update, delays=delays, shared=True, needs_context=True)
