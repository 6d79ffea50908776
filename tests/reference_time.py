"""An independent reference: an event-driven simulation of workers in time, in numpy.

Every job is an object with the worker, the tick it read the parameters, its duration,
its arrival, and its fate; each tick, free workers start jobs, the policy decides the
jobs that arrive, and SGD steps on the jobs applied at that tick, as the papers state the
policies. The library instead plans the schedule ahead of the loop and sends each
gradient with the delay to its tick; agreement checks both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

ROUNDS = ("synchronous", "backup")


@dataclasses.dataclass
class Job:
    worker: int
    read: int
    duration: int
    arrival: int
    params: np.ndarray
    steps_read: int
    fate: str | None = None  # "applied" or "discarded"
    decided: int | None = None
    staleness: int = 0


def simulate(
    grad: Callable[[int, np.ndarray], np.ndarray],
    *,
    num_workers: int,
    steps: int,
    lr: float,
    dim: int,
    duration: Callable[[int, int, int], int],
    transit: Callable[[int, int], int],
    policy: str,
    size: int = 0,
    rule: Callable[[int], float] | None = None,
    scope: str = "gradient",
    sending: int = 0,
    compensation: float = 0.0,
):
    r"""SGD on the applied gradients of ``policy`` (a name of :mod:`fsq.timing`).

    Args:
      grad: ``(worker, w) -> gradient``.
      duration: ``(worker, job, tick) -> c``, ticks of a worker's ``job``-th job.
      transit: ``(worker, tick) -> l``, ticks on the link of a message whose job started
        at ``tick``.
      size: the policy's ``b``, ``B`` or ``R``.
      rule: staleness weight of an applied gradient (of its staleness in inner steps).
      scope: ``"gradient"`` (sum over W) or ``"step"`` (weighted mean, step scaled).
      sending: ticks a message occupies its worker's link (the worker's next job waits).
      compensation: DC-ASGD's constant :math:`\lambda`: an applied gradient :math:`g`,
        read at :math:`w_s`, becomes :math:`g + \lambda g \odot g \odot (w_t - w_s)`.

    Returns:
      ``(trajectory [steps, dim], {"delivered", "discarded", "staleness": [steps]},
      jobs)``.
    """
    W = num_workers
    w, steps_done = np.zeros(dim), 0
    free_at, started = [0] * W, [0] * W
    jobs: list[Job] = []
    round_next, batch = 0, []
    trajectory = []
    metrics = {k: np.zeros(steps) for k in ("delivered", "discarded", "staleness")}

    def start(worker, tick):
        c = duration(worker, started[worker], tick)
        started[worker] += 1
        job = Job(worker, tick, c, tick + c - 1 + transit(worker, tick), w.copy(), steps_done)
        jobs.append(job)
        free_at[worker] = tick + c + max(sending - 1, 0)
        return job

    for t in range(steps):
        if policy in ROUNDS:
            if t == round_next:
                cohort = [start(i, t) for i in range(W)]
                keep = W - size if policy == "backup" else W
                ranked = sorted(cohort, key=lambda j: (j.arrival, j.worker))
                end = max(j.arrival for j in ranked[:keep])
                for rank, job in enumerate(ranked):
                    job.fate, job.decided = ("applied" if rank < keep else "discarded"), end
                round_next = end + 1
        else:
            for i in range(W):
                if free_at[i] <= t:
                    start(i, t)
            arriving = sorted(
                (j for j in jobs if j.arrival == t and j.fate is None),
                key=lambda j: (j.read, j.worker),
            )
            for job in arriving:
                stale = steps_done - job.steps_read
                if policy == "asynchronous" or (policy == "ringmaster" and stale < size):
                    job.fate, job.decided, job.staleness = "applied", t, stale
                elif policy == "rennala" and stale == 0 and len(batch) < size:
                    batch.append(job)
                else:
                    job.fate, job.decided = "discarded", t
            if policy == "rennala" and len(batch) == size:
                for job in batch:
                    job.fate, job.decided = "applied", t
                batch = []
        applied = [j for j in jobs if j.decided == t and j.fate == "applied"]
        discarded = [j for j in jobs if j.decided == t and j.fate == "discarded"]
        metrics["delivered"][t] = len(applied)
        metrics["discarded"][t] = len(discarded)
        if applied:
            # A step is on the mean of what it applies: W - b (backup) or B (Rennala).
            share = W / len(applied) if policy in ("backup", "rennala") else 1.0
            weights = [share * (rule(j.staleness) if rule else 1.0) for j in applied]

            grads = [grad(j.worker, j.params) for j in applied]
            # DC-ASGD: corrected by how far the parameters moved since the job read them.
            grads = [
                g + compensation * g * g * (w - j.params)
                for g, j in zip(grads, applied, strict=True)
            ]
            total = sum(a * g for a, g in zip(weights, grads, strict=True))
            if scope == "step":
                w = w - (sum(weights) / W) * lr * total / sum(weights)
            else:
                w = w - lr * total / W
            metrics["staleness"][t] = np.mean([j.staleness for j in applied])
            steps_done += 1
        trajectory.append(w.copy())
    return np.stack(trajectory), metrics, jobs
