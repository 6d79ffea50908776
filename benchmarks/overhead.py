"""Overhead of Flying Squirrel against a hand-written synchronous data-parallel step.

Both run on the same mesh, model and batch: an MLP, one worker per device, Adam inner.
The synchronous reference is what users write by hand: local gradients in a shard_map,
one ``pmean``, the optax update. Reported: median step time over interleaved
repetitions, and the ratio to the synchronous step.

Two layouts:

- ``--layout devices`` (default): one worker per device, against the step of a
  ``shard_map`` with one ``pmean``;
- ``--layout vmap``: ``--workers`` workers on one device (``data_parallel(backend="vmap")``,
  the path of laptops and of the studies), against the step a user writes by hand: a
  ``vmap`` of the per-worker gradients, their mean, one update.

With ``--model-shards S`` (``devices`` layout) each worker is a group of S devices, the
model sharded over them (:func:`fsq.parallel.fsdp`'s rule, a mesh axis ``"fsdp"``), one
worker per group; the reference is the same hand-written step on the same mesh and
shardings: a ``shard_map`` manual over the worker axis only, its gradient, one ``pmean``
over the worker axis, the update, GSPMD sharding the rest as it shards Flying
Squirrel's step.

Run: ``python -m benchmarks.overhead [--layout devices|vmap] [--devices 1] [--width 1024]
[--batches 32 256]``; ``--profile STEP`` lists instead where the time of one step goes (a
``jax.profiler`` trace: the operations of its compiled program by time per step).

The ratio depends on the batch: Flying Squirrel's extra work is a fixed number of passes
over the parameters per step, the gradient's cost grows with the batch. Next to the
times, XLA's count of bytes accessed by each compiled step and its ratio to the
synchronous step's: deterministic, unlike times on a shared machine, but only XLA's
estimate (skipping a one-device all-reduce raised it by 20% and halved the time; the
profiler, ``jax.profiler.trace``, tells where the time goes).

The default is one device: simulated CPU devices share the cores, and their timings are
dominated by how the threads of 8 "devices" are scheduled on 2 cores (medians moved by
4x between identical runs here); pass ``--devices N`` on real multi-device hardware.
"""

from __future__ import annotations

import argparse

import jax


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", choices=["devices", "vmap"], default="devices")
    parser.add_argument("--devices", type=int, default=1, help="CPU devices to simulate")
    parser.add_argument("--workers", type=int, default=8, help="workers of the vmap layout")
    parser.add_argument(
        "--model-shards", type=int, default=1, help="devices a worker's model is sharded over"
    )
    parser.add_argument("--width", type=int, default=1024, help="MLP hidden width")
    parser.add_argument(
        "--batches",
        type=int,
        nargs="+",
        help="examples per worker (default: 32 and 256 for devices, 32 for vmap)",
    )
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument(
        "--profile",
        metavar="STEP",
        help="instead of timing, list where the time of this step goes (e.g. 'flying squirrel, "
        "uniform(16), default') from a jax.profiler trace",
    )
    args = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", args.devices)

    import optax
    from jax import lax
    from jax.sharding import PartitionSpec as P

    import fsq
    from benchmarks import mlp, timing

    vmap = args.layout == "vmap"
    args.batches = args.batches or ([32] if vmap else [32, 256])
    shards = {"fsdp": args.model_shards} if args.model_shards > 1 else None
    mesh = fsq.parallel.make_mesh(1 if vmap else None, model_axes=shards)
    workers = args.workers if vmap else mesh.shape[fsq.parallel.DEVICE_AXIS]
    sizes = (784, args.width, args.width // 2 if vmap else args.width, 10)
    params = mlp.init(sizes)
    num_params = mlp.num_params(params)
    loss_fn = mlp.loss
    keys = jax.random.split(jax.random.key(1), 2)
    inner = fsq.adam(1e-3)

    def sync_step_with(collective: bool):
        def body(params, opt_state, batch):
            loss, grads = jax.value_and_grad(loss_fn)(params, jax.tree.map(lambda x: x[0], batch))
            if collective:
                grads = lax.pmean(grads, fsq.parallel.DEVICE_AXIS)
            updates, opt_state = inner.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss[None]

        manual = {"axis_names": {fsq.parallel.DEVICE_AXIS}} if shards else {}
        return jax.jit(
            jax.shard_map(
                body,
                mesh=mesh,
                in_specs=(P(), P(), P(fsq.parallel.DEVICE_AXIS)),
                out_specs=(P(), P(), P(fsq.parallel.DEVICE_AXIS)),
                check_vma=False,
                **manual,
            ),
        )

    def vmap_step():
        """Every worker's gradient under a vmap, their mean, one update, as users write."""

        def step(params, opt_state, batch):
            losses, grads = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))(params, batch)
            grads = jax.tree.map(lambda g: g.mean(0), grads)
            updates, opt_state = inner.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, losses

        return jax.jit(step)

    # The reference, and, over one device, the same without its pmean (which XLA runs as a
    # copy there, and Flying Squirrel skips).
    if vmap:
        sync_steps = {"synchronous (hand-written)": vmap_step()}
    else:
        sync_steps = {"synchronous (hand-written)": sync_step_with(True)}
    if workers == 1:
        sync_steps["synchronous, no pmean"] = sync_step_with(False)
    variants = {
        "delay 0, extras off": {"delay": 0, "staleness": None, "compensation": None},
        "delay 0, default": {"delay": 0},
        "uniform(16), extras off": {
            "delay": fsq.delays.uniform(16),
            "staleness": None,
            "compensation": None,
        },
        "uniform(16), DC-c": {
            "delay": fsq.delays.uniform(16),
            "staleness": None,
            "compensation": 0.04,
        },
        "uniform(16), default": {"delay": fsq.delays.uniform(16)},
    }
    rows = []
    for batch_size in args.batches:
        batch = (
            jax.random.normal(keys[0], (workers, batch_size, sizes[0])),
            jax.random.randint(keys[1], (workers, batch_size), 0, 10),
        )
        thunks, accessed = {}, {}
        for name, sync_step in sync_steps.items():
            # The parameters (and so Adam's moments) sharded as Flying Squirrel shards them.
            placed = jax.device_put(
                params,
                jax.tree.map(
                    lambda s: jax.sharding.NamedSharding(mesh, s), fsq.parallel.fsdp(params, mesh)
                )
                if shards
                else jax.sharding.NamedSharding(mesh, P()),
            )
            sync_state = [placed, jax.jit(inner.init)(placed)]

            def sync_thunk(sync_step=sync_step, sync_state=sync_state, batch=batch):
                sync_state[0], sync_state[1], loss = sync_step(*sync_state, batch)
                return loss

            thunks[name] = sync_thunk
            accessed[name] = timing.bytes_accessed(sync_step, *sync_state, batch)
        for name, kwargs in variants.items():
            tx = fsq.flying_squirrel(
                inner, num_workers=workers, axis_name=fsq.parallel.AXIS_NAME, **kwargs
            )
            backend = "vmap" if vmap else "shard_map"
            dp = fsq.parallel.data_parallel(
                loss_fn, tx, num_workers=workers, mesh=mesh, backend=backend
            )
            holder = [dp.init(params)]
            accessed[f"flying squirrel, {name}"] = timing.bytes_accessed(dp.step, holder[0], batch)

            def thunk(dp=dp, holder=holder, batch=batch):
                holder[0], losses = dp.step(holder[0], batch)
                return losses

            thunks[f"flying squirrel, {name}"] = thunk

        if args.profile is not None:
            if args.profile not in thunks:
                parser.error(f"--profile must be one of {list(thunks)}, got {args.profile!r}")
            print(f"batch {batch_size}, {args.profile}:")
            timing.print_table(timing.profile(thunks[args.profile]))
            continue
        medians = timing.median_seconds(thunks, repeats=args.repeats)
        base = medians["synchronous (hand-written)"]
        rows += [
            {
                "batch": batch_size,
                "step": name,
                "median_ms": 1e3 * t,
                "ratio_to_sync": t / base,
                "MB_accessed": accessed[name] / 1e6,
                "bytes_ratio": accessed[name] / accessed["synchronous (hand-written)"],
            }
            for name, t in medians.items()
        ]
    if args.profile is not None:
        return
    print(
        f"{workers} workers on {mesh.devices.size} devices ({args.model_shards} a worker), "
        f"MLP {sizes}, {num_params} params"
    )
    timing.print_table(rows)
    name = "overhead_vmap" if vmap else "overhead"
    path = timing.save(
        f"{name}_sharded" if shards else name,
        {
            "workers": workers,
            "num_params": num_params,
            "rows": rows,
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
