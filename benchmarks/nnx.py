"""Cost of the NNX trainer against the functional path, per step, side by side.

Both train the same small CNN (a convolution, BatchNorm, ReLU, dropout, a linear
read-out) with the same Flying Squirrel transform, workers and batch:

- **functional**: :func:`fsq.parallel.data_parallel` of a pure loss written by hand as
  users did before the trainer (``nnx.merge`` of the split model inside the loss, the
  dropout stream reseeded from ``key=``, the batch statistics returned as model state),
  the state carried by the caller;
- **nnx**: :class:`fsq.nnx.DataParallel` of the same model, whose step also writes the
  new parameters and statistics back into the module, and keeps their buffers (it does
  not donate them, as the module holds them).

Reported: the median step time over interleaved repetitions and the ratio nnx /
functional (the goal is at most 1.05).

Run: ``python -m benchmarks.nnx [--layout vmap|devices] [--devices 8] [--workers 8]
[--batch 32] [--channels 16]``.
"""

from __future__ import annotations

import argparse
import zlib

import jax


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", choices=["vmap", "devices"], default="vmap")
    parser.add_argument("--devices", type=int, default=1, help="CPU devices to simulate")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", args.devices)

    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    import fsq
    from benchmarks import timing

    channels, side, classes = args.channels, 16, 10

    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, channels, kernel_size=(3, 3), use_bias=False, rngs=rngs)
            self.norm = nnx.BatchNorm(channels, rngs=rngs)
            self.dropout = nnx.Dropout(0.1, rngs=rngs)
            self.out = nnx.Linear(side * side * channels, classes, rngs=rngs)

        def __call__(self, x):
            h = self.dropout(nnx.relu(self.norm(self.conv(x))))
            return self.out(h.reshape(h.shape[0], -1))

    def loss_fn(model, batch):
        logits = model(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    backend = "vmap" if args.layout == "vmap" else "shard_map"
    mesh = fsq.parallel.make_mesh(1 if backend == "vmap" else None)
    W = args.workers
    tx = fsq.flying_squirrel(
        fsq.adam(1e-3), num_workers=W, delay=fsq.delays.uniform(4), axis_name=fsq.parallel.AXIS_NAME
    )

    def functional():
        """The hand-written functional step of the same model."""
        graphdef, params, streams, stats = nnx.split(
            CNN(nnx.Rngs(params=0, dropout=1)), nnx.Param, nnx.RngState, ...
        )

        def loss(params, batch, *, key, model_state):
            model = nnx.merge(graphdef, params, *jax.tree.map(jnp.asarray, (streams, model_state)))
            model.train()
            nnx.reseed(model, dropout=jax.random.fold_in(key, zlib.crc32(b"dropout")))
            value = loss_fn(model, batch)
            return value, nnx.split(model, nnx.Param, nnx.RngState, ...)[3]

        dp = fsq.parallel.data_parallel(loss, tx, num_workers=W, backend=backend, mesh=mesh, seed=0)
        holder = [dp.init(params, stats)]

        def step(batch):
            holder[0], losses = dp.step(holder[0], batch)
            return losses

        return step

    def trainer():
        model = CNN(nnx.Rngs(params=0, dropout=1))
        return fsq.nnx.DataParallel(
            model, tx, loss_fn, num_workers=W, backend=backend, mesh=mesh, seed=0
        ).step

    rows = []
    for batch_size in args.batch:
        rng = np.random.default_rng(0)
        batch = {
            "x": rng.normal(size=(W, batch_size, side, side, 1)).astype(np.float32),
            "y": rng.integers(0, classes, (W, batch_size)),
        }
        batch = jax.device_put(batch)
        steps = {"functional": functional(), "nnx": trainer()}
        np.testing.assert_allclose(  # the same computation: the same first losses
            steps["functional"](batch), steps["nnx"](batch), rtol=1e-6
        )
        medians = timing.median_seconds(
            {name: (lambda s=s, b=batch: s(b)) for name, s in steps.items()}, repeats=args.repeats
        )
        rows += [
            {
                "batch": batch_size,
                "path": name,
                "median_ms": 1e3 * t,
                "ratio_to_functional": t / medians["functional"],
            }
            for name, t in medians.items()
        ]
    print(f"{W} workers on {mesh.devices.size} device(s), CNN with {channels} channels")
    timing.print_table(rows)
    path = timing.save(
        "nnx" if backend == "vmap" else "nnx_devices",
        {"workers": W, "channels": channels, "layout": args.layout, "rows": rows},
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
