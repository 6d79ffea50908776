"""An independent reference: a per-gradient event simulation of the worker side, in numpy.

Every gradient is kept as its own event, with the parameters it was computed at, and each
feature acts on it the way the papers state it, in float64: a worker that is down sends
nothing (and the live ones are weighted by W / n_live), a non-finite gradient is
rejected, worker momentum averages what a worker computed, a Byzantine worker scales
what it sends, the staleness bound drops or holds back a late gradient, compression
keeps what it leaves out in the worker's residual, a staleness rule weighs the gradient,
and delay compensation corrects it with the parameters it was computed at. The library
instead sums channels in flight in float32; agreement checks both.

Statuses partition the gradients of a step: delivered, rejected, lost or dropped.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np

LOST, REJECTED, DROPPED, HELD, SENT = "lost", "rejected", "dropped", "held", "sent"


def simulate(
    grad: Callable[[int, np.ndarray], np.ndarray],
    *,
    num_workers: int,
    steps: int,
    lr: float,
    dim: int,
    table: np.ndarray,
    live: np.ndarray | None = None,
    poisoned: np.ndarray | None = None,
    momentum: float | None = None,
    byzantine: dict[int, float] | None = None,
    bound: int | None = None,
    on_stale: str = "drop",
    compress: Callable[[np.ndarray, int, int], np.ndarray] | None = None,
    feedback: bool = True,
    rule: Callable[[int], float] | None = None,
    scope: str = "gradient",
    compensation: float | tuple[float, float, float] | None = None,
    look_ahead: float | None = None,
):
    """SGD with learning rate ``lr`` on what is delivered, one event per gradient.

    Args:
      grad: ``(worker, w) -> gradient`` at parameters ``w``.
      table: delays, ``table[t % len(table), i]`` for worker ``i`` at step ``t``.
      live: ``[steps, W]`` bool, whether worker ``i`` is up at step ``t``.
      poisoned: ``[steps, W]`` bool, whether its gradient holds a NaN.
      momentum: worker momentum :math:`\\beta`.
      byzantine: ``{worker: factor}``, what it scales its message by.
      bound, on_stale: the staleness bound and its policy.
      compress: ``(x, step, worker) -> C(x)``, the compression operator.
      feedback: keep what compression leaves out in the worker's residual.
      rule: the staleness weight ``alpha(delay)``.
      scope: ``"gradient"`` (mean over W) or ``"step"`` (weighted mean, step scaled).
      compensation: DC-ASGD-c's lambda, or DC-ASGD-a's ``(lambda_0, decay, eps)``.
      look_ahead: the horizon H: gradients are computed at ``w + offset``, the offset set
        after a step that applies something to ``min(H, mean delay applied)`` times that
        step (kept after a step that applies nothing); the trajectory is of ``w + offset``.

    Returns:
      ``(trajectory [steps, dim], counts {status: [steps]} by due step, residuals [W, dim],
      momenta [W, dim])``.
    """
    W = num_workers
    live = np.ones((steps, W), bool) if live is None else live
    poisoned = np.zeros((steps, W), bool) if poisoned is None else poisoned
    residual, velocity, mean_square = np.zeros((W, dim)), np.zeros((W, dim)), np.zeros(dim)
    due = collections.defaultdict(list)
    counts = {s: np.zeros(steps, int) for s in (SENT, HELD, DROPPED, REJECTED, LOST)}
    w, offset, trajectory = np.zeros(dim), np.zeros(dim), []
    for t in range(steps):
        share = W / max(live[t].sum(), 1)
        for i in range(W):
            d = int(table[t % len(table), i])
            g = grad(i, w + offset).astype(np.float64)
            if poisoned[t, i]:
                g[0] = np.nan
            status = LOST if not live[t, i] else SENT if np.all(np.isfinite(g)) else REJECTED
            message = g
            if momentum is not None and status == SENT:
                velocity[i] = momentum * velocity[i] + (1 - momentum) * g
            if momentum is not None:
                message = velocity[i].copy()
            if byzantine and i in byzantine:
                message = byzantine[i] * message
            if bound is not None and d > bound:
                if on_stale == "wait":
                    d, status = bound, HELD if status == SENT else status
                elif status == SENT:
                    status = DROPPED
            if compress is not None:
                x = message + residual[i] if feedback else message
                message = compress(x, t, i)
                if feedback and status in (SENT, HELD):
                    residual[i] = x - message
            weight = share * (rule(d) if rule else 1.0)
            due[t + d].append((status, weight, message, w + offset, d))
        arrived = due.pop(t, [])
        for status, *_ in arrived:
            counts[status][t] += 1
        applied = [a for a in arrived if a[0] in (SENT, HELD)]
        if applied:
            weight_sum = sum(weight for _, weight, *_ in applied)
            strength = compensation
            if isinstance(compensation, tuple):  # DC-ASGD-a: per-coordinate lambda
                lam0, decay, eps = compensation
                square = sum(weight * g * g for _, weight, g, *_ in applied)
                mean_square = decay * mean_square + (1 - decay) * square / weight_sum
                strength = lam0 / np.sqrt(mean_square + eps)
            total = np.zeros(dim)
            for _, weight, g, w_sent, _ in applied:
                gap = w + offset - w_sent
                corrected = g if compensation is None else g + strength * g * g * gap
                total += weight * corrected
            if scope == "step":
                step = -(weight_sum / W) * lr * total / weight_sum
            else:
                step = -lr * total / W
            w = w + step
            if look_ahead is not None:
                offset = min(look_ahead, np.mean([a[-1] for a in applied])) * step
        trajectory.append(w + offset)
    counts["delivered"] = counts.pop(SENT) + counts[HELD]
    counts["bounded"] = counts.pop(DROPPED) + counts.pop(HELD)
    return np.stack(trajectory), counts, residual, velocity
