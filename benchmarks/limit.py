"""How close Flying Squirrel's step comes to the physical limit of the same work.

Every variant runs ``W`` workers on one device (``data_parallel(backend="vmap")``, the
path of the studies), one MLP, Adam inner, side by side in one process against two
bounds written by hand:

- **large batch**: one gradient of the workers' summed losses (the mean loss over all
  ``W x B`` examples) and one update: what a step whose messages all share a ring row
  (delay 0, a constant delay without per-worker pieces) computes;
- **large batch + W gradient writes**: that step plus the time of writing ``W``
  gradient-sized arrays (a pass reading and writing ``W x P`` floats), the least a step
  pays whose workers' gradients must exist apart (delays that differ between workers,
  delay compensation's :math:`g \\odot g`, per-worker state).

Where the step sums the workers' gradients (their messages share a ring row), the same
transform inside ``optax.chain`` is timed too ("each gradient apart"): the step computes
each worker's gradient for a transform around Flying Squirrel, as it did for every
transform before it summed. Reported per variant: the median step time, its ratio to
each bound, and XLA's count of the bytes each compiled step accesses (deterministic,
unlike times on a shared machine, but only XLA's estimate).

Run: ``python -m benchmarks.limit [--workers 8] [--batch 32] [--sizes 256 1024 1024 10]
[--repeats 40]``.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8, help="workers on the device")
    parser.add_argument("--batch", type=int, default=32, help="examples per worker")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 1024, 10])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import optax

    import fsq
    from benchmarks import mlp, timing

    workers, sizes = args.workers, tuple(args.sizes)
    params = mlp.init(sizes)
    num_params = mlp.num_params(params)
    inner = fsq.adam(1e-3)
    keys = jax.random.split(jax.random.key(1), 2)
    batch = (
        jax.random.normal(keys[0], (workers, args.batch, sizes[0])),
        jax.random.randint(keys[1], (workers, args.batch), 0, sizes[-1]),
    )

    @jax.jit
    def large_batch(params, opt_state, batch):
        def total(params):
            return jnp.mean(jax.vmap(mlp.loss, in_axes=(None, 0))(params, batch))

        grads = jax.grad(total)(params)
        updates, opt_state = inner.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def gradient_writes(stacked):
        return stacked * 2.0  # reads and writes W gradient-sized arrays

    stacked = jnp.ones((workers, num_params))
    sync = [params, inner.init(params)]

    def large_thunk():
        sync[0], sync[1] = large_batch(*sync, batch)
        return sync[1]

    thunks = {"large batch": large_thunk, "W gradient writes": lambda: gradient_writes(stacked)}
    accessed = {"large batch": timing.bytes_accessed(large_batch, *sync, batch)}
    extras_off = {"staleness": None, "compensation": None}
    variants = {
        "delay 0, defaults": {"delay": 0},
        "delay 0, extras off": {"delay": 0, **extras_off},
        "constant(4), extras off": {"delay": 4, **extras_off},
        "constant(4), defaults": {"delay": 4},
        "uniform(16), extras off": {"delay": fsq.delays.uniform(16), **extras_off},
        "uniform(16), defaults": {"delay": fsq.delays.uniform(16)},
    }
    # The same transforms inside optax.chain: the step cannot sum for a transform around
    # Flying Squirrel, so each worker's gradient is computed apart (the step before sums).
    for name in ("delay 0, defaults", "constant(4), extras off"):
        variants[f"{name}, each gradient apart"] = {**variants[name], "apart": True}
    for name, kwargs in variants.items():
        kwargs = dict(kwargs)
        wrap = optax.chain if kwargs.pop("apart", False) else (lambda tx: tx)
        tx = wrap(fsq.flying_squirrel(inner, num_workers=workers, **kwargs))
        dp = fsq.parallel.data_parallel(mlp.loss, tx, num_workers=workers, backend="vmap")
        holder = [dp.init(params)]
        accessed[name] = timing.bytes_accessed(dp.step, holder[0], batch)

        def thunk(dp=dp, holder=holder):
            holder[0], losses = dp.step(holder[0], batch)
            return losses

        thunks[name] = thunk
    medians = timing.median_seconds(thunks, repeats=args.repeats)
    large = medians["large batch"]
    apart = large + medians["W gradient writes"]
    rows = [
        {
            "step": name,
            "median_ms": 1e3 * t,
            "to_large_batch": t / large,
            "to_large_plus_writes": t / apart,
            "MB_accessed": accessed[name] / 1e6 if name in accessed else None,
        }
        for name, t in medians.items()
    ]
    print(
        f"{workers} workers x {args.batch} examples on one device, MLP {sizes}, {num_params} params"
    )
    timing.print_table(rows)
    payload = {"workers": workers, "batch": args.batch, "num_params": num_params, "rows": rows}
    if not args.no_save:
        print(f"results: {timing.save('limit', payload)}")
    return payload


if __name__ == "__main__":
    main()
