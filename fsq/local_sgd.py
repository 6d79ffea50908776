r"""Local steps with an outer optimizer: local SGD, DiLoCo, streaming DiLoCo, async local SGD.

Presets over :func:`fsq.flying_squirrel` with :func:`fsq.transforms.local_steps` on the
worker side: every worker trains its own parameters for :math:`H` local steps and sends
its pseudo-gradient :math:`\Delta_i = a_i - w_i`; the outer optimizer steps on their
delivered mean. The pseudo-gradients travel through the same delay line as gradients, so
every other keyword of :func:`fsq.flying_squirrel` applies to them: delays, compression
with error feedback, faults, robust aggregation, staleness rules, compute models. Delay
compensation does not (a pseudo-gradient is not a gradient at one point) and is off.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

from fsq import _checks, optimizers, timing, transforms
from fsq.outer import delayed_nesterov
from fsq.squirrel import flying_squirrel

__all__ = ["async_local_sgd", "diloco", "fragment_labels", "local_sgd", "streaming_diloco"]


def local_sgd(
    outer: optax.GradientTransformation,
    local: optax.GradientTransformation,
    *,
    num_workers: int,
    steps: int | Sequence[int],
    mixing: float | None = None,
    offset: int = 0,
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""Local SGD with an outer optimizer (Lin et al. 2020; Reddi et al. 2021), used per worker.

    .. math::

      w_i \leftarrow w_i + \mathrm{local}(g_i(w_i)) \ (H \text{ times}), \qquad
      \Delta_i = a_i - w_i, \qquad
      w \leftarrow w + \mathrm{outer}\Big(\frac{1}{W} \sum_{\text{delivered}} \Delta_i\Big),

    then every worker pulls :math:`w` (see :mod:`fsq.transforms.local`). With ``outer =
    optax.sgd(1.0)`` and no delay this is federated averaging: :math:`w` becomes the mean
    of the workers' parameters. With :math:`H = 1` and a local ``optax.sgd(1.0)`` it is
    :func:`fsq.flying_squirrel` with ``outer`` as its inner optimizer, bit for bit.

    Args:
      outer: the outer optimizer, stepped on the delivered mean pseudo-gradient.
      local: the local optimizer, each worker's own.
      num_workers: :math:`W`.
      steps: :math:`H`, local steps per round, or one per worker.
      mixing: ``None`` (pull the global parameters right after sending) or
        :math:`\alpha` (mix when the pseudo-gradient is applied; see
        :func:`fsq.transforms.local_steps`).
      offset: local steps before the first send (``0``: :math:`H`).
      **options: any keyword of :func:`fsq.flying_squirrel` (``axis_name``, ``delay``,
        ``compression``, ``faults``, ``aggregation``, ``compute``, ``seed``...);
        ``staleness`` and ``compensation`` default to ``None`` here.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (a :class:`fsq.FlyingSquirrelState`).

    Example:
      Two workers, two local steps of SGD, outer SGD at learning rate 1 (federated
      averaging): after a round the parameters are the mean of the workers' own.

      >>> import jax.numpy as jnp, fsq
      >>> tx = fsq.local_sgd(fsq.sgd(1.0), fsq.sgd(0.5), num_workers=2, steps=2,
      ...                    axis_name=fsq.parallel.AXIS_NAME)
      >>> loss = lambda w, target: jnp.sum((w - target) ** 2) / 2
      >>> dp = fsq.parallel.data_parallel(loss, tx, num_workers=2, backend="vmap")
      >>> state = dp.init(jnp.zeros(1))
      >>> targets = jnp.array([[2.0], [4.0]])
      >>> for _ in range(2):
      ...     state, _ = dp.step(state, targets)
      >>> print(state.params)  # worker 0 reached 1.5, worker 1 reached 3
      [2.25]
    """
    outer = _checks.transformation("outer", outer)
    options.setdefault("staleness", None)
    options.setdefault("compensation", None)
    piece = transforms.local_steps(local, steps, offset=offset, mixing=mixing)
    return flying_squirrel(outer, num_workers=num_workers, local=piece, **options)


def _outer_checks(learning_rate: Any, momentum: Any) -> None:
    """The outer optimizer's keywords, named as the caller passed them."""
    _checks.learning_rate(learning_rate, "outer_learning_rate")
    _checks.probability_like("outer_momentum", momentum)


def diloco(
    local: optax.GradientTransformation,
    *,
    num_workers: int,
    steps: int = 500,
    outer_learning_rate: float = 0.7,
    outer_momentum: float = 0.9,
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""DiLoCo (Douillard et al. 2023, *DiLoCo: Distributed Low-Communication Training of
    Language Models*): :func:`local_sgd` with an outer Nesterov optimizer.

    The paper's recipe: AdamW as ``local``, :math:`H = 500`, outer Nesterov with learning
    rate 0.7 and momentum 0.9, 8 workers; the outer step is

    .. math::

      m \leftarrow \beta m + \bar\Delta, \qquad w \leftarrow w - \eta\,(\bar\Delta + \beta m).

    Args:
      local: the local optimizer (the paper's is AdamW).
      num_workers: :math:`W`.
      steps: :math:`H`.
      outer_learning_rate: :math:`\eta`.
      outer_momentum: :math:`\beta`.
      **options: as :func:`local_sgd`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import fsq, optax
      >>> tx = fsq.diloco(optax.adamw(1e-3), num_workers=8, steps=50)
    """
    _outer_checks(outer_learning_rate, outer_momentum)
    outer = optimizers.nesterov(outer_learning_rate, momentum=outer_momentum)
    return local_sgd(outer, local, num_workers=num_workers, steps=steps, **options)


def fragment_labels(params: optax.Params, fragments: int) -> Any:
    """The fragment of each leaf: ``fragments`` runs of consecutive leaves (in tree order),
    each at least one leaf, whose largest is as small as runs of whole leaves allow.

    Example:
      >>> import jax.numpy as jnp, fsq
      >>> fsq.fragment_labels({"a": jnp.zeros(4), "b": jnp.zeros(4), "c": jnp.zeros(8)}, 2)
      {'a': 0, 'b': 0, 'c': 1}
    """
    sizes = [int(np.size(x)) for x in jax.tree.leaves(params)]
    fragments = _checks.integer("fragments", fragments, low=1, high=max(len(sizes), 1))

    def pack(cap: int) -> list[int] | None:
        """Leaves into runs of at most ``cap`` entries, opening a run early only when the
        leaves left are as many as the runs still to open; ``None`` if that takes more
        than ``fragments`` runs."""
        labels, run, filled = [], 0, 0
        for j, size in enumerate(sizes):
            if filled and (filled + size > cap or len(sizes) - j == fragments - 1 - run):
                run, filled = run + 1, 0
            labels.append(run)
            filled += size
        return labels if run < fragments else None

    low, high = max(sizes, default=0), sum(sizes)
    while low < high:  # the smallest cap that packs into the fragments
        mid = (low + high) // 2
        low, high = (low, mid) if pack(mid) is not None else (mid + 1, high)
    return jax.tree.unflatten(jax.tree.structure(params), pack(low))


def streaming_diloco(
    local: optax.GradientTransformation,
    *,
    num_workers: int,
    steps: int,
    fragments: int,
    overlap: int = 1,
    mixing: float = 0.5,
    outer_learning_rate: float = 0.7,
    outer_momentum: float = 0.9,
    **options: Any,
) -> optax.GradientTransformation:
    r"""Streaming DiLoCo (Douillard et al. 2025, *Streaming DiLoCo with overlapping
    communication*): DiLoCo on parameter fragments synchronised at staggered times.

    The parameters are split into :math:`F` fragments of consecutive leaves
    (:func:`fragment_labels`; a leaf is never split, so the largest leaf bounds how far
    the peak can fall); fragment
    :math:`p` is synchronised every :math:`H` local steps, first after
    :math:`(p + 1) H / F`, so that one fragment's pseudo-gradient is on the wire at a time
    and the peak bytes per step fall :math:`F`-fold. Its outer step lands
    :math:`\tau` = ``overlap`` ticks after sending, while the workers keep training; they
    then mix: :math:`w_{i,p} \leftarrow \alpha\, w_{i,p} + (1 - \alpha)\, w_p`. Each fragment
    has its own outer Nesterov optimizer, stepped only when its pseudo-gradients arrive.

    Built as ``optax.multi_transform`` of one :func:`local_sgd` per fragment, so the
    fragments share nothing but the seed: the same delays, faults and compute times.

    Args:
      local: the local optimizer (element-wise ones, such as AdamW, run per fragment
        exactly as on the whole model).
      num_workers: :math:`W`.
      steps: :math:`H`, a multiple of ``fragments`` and more than ``overlap``.
      fragments: :math:`F \ge 1`, at most the number of parameter leaves.
      overlap: :math:`\tau \ge 0`, the ticks a fragment's pseudo-gradient travels.
      mixing: :math:`\alpha \in [0, 1]`.
      outer_learning_rate: :math:`\eta` of the outer Nesterov optimizer.
      outer_momentum: :math:`\beta`.
      **options: as :func:`local_sgd`, but not ``delay`` (it is ``overlap``).

    Returns:
      An ``optax.GradientTransformation`` (an ``optax.MultiTransformState`` of one
      :class:`fsq.FlyingSquirrelState` per fragment).

    Example:
      >>> import fsq, optax
      >>> tx = fsq.streaming_diloco(optax.adamw(1e-3), num_workers=8, steps=100,
      ...                           fragments=4, overlap=5)
    """
    fragments = _checks.integer("fragments", fragments, low=1)
    steps = _checks.integer("steps", steps, low=1)
    if steps % fragments:
        raise ValueError(f"steps ({steps}) must be a multiple of fragments ({fragments})")
    overlap = _checks.integer("overlap", overlap, low=0, high=steps - 1)
    if "delay" in options:
        raise TypeError("streaming_diloco takes overlap, the delay of every pseudo-gradient")
    _outer_checks(outer_learning_rate, outer_momentum)
    outer = optimizers.nesterov(outer_learning_rate, momentum=outer_momentum)
    per_fragment = {
        p: local_sgd(
            outer,
            local,
            num_workers=num_workers,
            steps=steps,
            mixing=mixing,
            offset=(p + 1) * steps // fragments % steps,
            delay=overlap,
            **options,
        )
        for p in range(fragments)
    }
    return optax.multi_transform(per_fragment, lambda params: fragment_labels(params, fragments))


def async_local_sgd(
    local: optax.GradientTransformation,
    *,
    num_workers: int,
    steps: int,
    outer_learning_rate: float = 0.7,
    outer_momentum: float = 0.9,
    compute: timing.ComputeModel | None = None,
    dynamic_steps: bool = False,
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""Asynchronous local SGD (Liu et al. 2024, *Asynchronous Local-SGD Training for
    Language Modeling*): each worker sends after its own local steps and restarts from the
    latest global parameters; the outer optimizer is :func:`fsq.delayed_nesterov` with a
    period of :math:`W` arrivals.

    With ``dynamic_steps`` (the paper's dynamic local updates) worker :math:`i` takes
    :math:`H_i = \max(1, \mathrm{round}(H\, \bar c_{\min} / \bar c_i))` local steps,
    :math:`\bar c_i` its mean compute time (:meth:`fsq.timing.ComputeModel.mean_ticks`), so
    that all workers finish a round at about the same time: the fastest takes :math:`H`.

    Args:
      local: the local optimizer.
      num_workers: :math:`W`.
      steps: :math:`H`, local steps per round (of the fastest worker with
        ``dynamic_steps``).
      outer_learning_rate: :math:`\eta` of the delayed Nesterov optimizer.
      outer_momentum: its :math:`\beta`.
      compute: a :mod:`fsq.timing` compute model (``None``: one tick per step).
      dynamic_steps: scale each worker's local steps by its speed (needs ``compute``).
      **options: as :func:`local_sgd`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import fsq, optax
      >>> tx = fsq.async_local_sgd(optax.adamw(1e-3), num_workers=4, steps=20,
      ...                          compute=fsq.timing.fixed([1, 1, 2, 4]), dynamic_steps=True)
    """
    steps = _checks.integer("steps", steps, low=1)
    _outer_checks(outer_learning_rate, outer_momentum)
    per_worker: int | list[int] = steps
    if dynamic_steps:
        if compute is None:
            raise ValueError("dynamic_steps=True needs a compute model (compute=...)")
        means = np.asarray([compute.mean_ticks(i) for i in range(num_workers)])
        per_worker = [max(1, round(steps * means.min() / m)) for m in means]
    outer = delayed_nesterov(outer_learning_rate, outer_momentum, period=num_workers)
    return local_sgd(
        outer, local, num_workers=num_workers, steps=per_worker, compute=compute, **options
    )
