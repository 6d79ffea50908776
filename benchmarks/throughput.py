"""Simulator throughput: fsq against the event-driven loop research code usually writes.

The baseline is the common hand-written simulator of asynchronous SGD: a Python loop over
steps and workers, a jitted gradient call per worker, a heap of pending gradients keyed
by delivery step, and a jitted optax update on what is due. fsq runs the same simulation
(same model, batch, delay distribution) as one jitted SPMD step for all workers, spread
over the devices. Reported: simulated worker-gradients per second, and the speed-up.

Run: ``python -m benchmarks.throughput [--devices 8] [--workers 8 64 256]``.
"""

from __future__ import annotations

import argparse
import heapq

import jax


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--steps", type=int, default=40, help="fsq steps timed per repeat")
    parser.add_argument("--baseline-steps", type=int, default=5)
    args = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", args.devices)

    import jax.numpy as jnp
    import numpy as np
    import optax

    import fsq
    from benchmarks import timing

    sizes, batch, max_delay = (40, 100, 100, 10), 32, 16
    keys = jax.random.split(jax.random.key(0), 3)
    params = [
        (jax.random.normal(k, (a, b)) / a**0.5, jnp.zeros(b))
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]

    def loss_fn(params, batch):
        x, y = batch
        for w, b in params[:-1]:
            x = jax.nn.relu(x @ w + b)
        logits = x @ params[-1][0] + params[-1][1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    inner = fsq.sgd(0.05)
    grad = jax.jit(jax.grad(loss_fn))

    @jax.jit
    def apply(params, opt_state, mean_grad):
        updates, opt_state = inner.update(mean_grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rows = []
    for workers in args.workers:
        data = (
            jax.random.normal(keys[0], (workers, batch, sizes[0])),
            jax.random.randint(keys[1], (workers, batch), 0, 10),
        )

        def baseline(steps, workers=workers, data=data):
            rng = np.random.default_rng(0)
            pending, state = [], [params, inner.init(params)]
            for t in range(steps):
                for i in range(workers):
                    g = grad(state[0], (data[0][i], data[1][i]))
                    heapq.heappush(pending, (t + int(rng.integers(0, max_delay + 1)), i, g))
                due = []
                while pending and pending[0][0] == t:
                    due.append(heapq.heappop(pending)[2])
                if due:
                    total = jax.tree.map(lambda *g: sum(g) / workers, *due)
                    state[0], state[1] = apply(state[0], state[1], total)
            return state[0]

        tx = fsq.flying_squirrel(
            inner,
            num_workers=workers,
            axis_name=fsq.parallel.AXIS_NAME,
            delay=fsq.delays.uniform(max_delay),
            staleness=None,
            compensation=None,
        )
        dp = fsq.parallel.data_parallel(loss_fn, tx, num_workers=workers)
        holder = [dp.init(params)]

        def simulator(steps, dp=dp, holder=holder, data=data):
            for _ in range(steps):
                holder[0], losses = dp.step(holder[0], data)
            return losses

        medians = timing.median_seconds(
            {
                "baseline": lambda b=baseline: b(args.baseline_steps),
                "fsq": lambda s=simulator: s(args.steps),
            },
            repeats=5,
            warmup=1,
        )
        base_rate = workers * args.baseline_steps / medians["baseline"]
        fsq_rate = workers * args.steps / medians["fsq"]
        rows.append(
            {
                "workers": workers,
                "baseline_grads_per_s": base_rate,
                "fsq_grads_per_s": fsq_rate,
                "speedup": fsq_rate / base_rate,
            }
        )
    print(f"MLP {sizes}, batch {batch} per worker, uniform delays 0..{max_delay}")
    timing.print_table(rows)
    print(f"results: {timing.save('throughput', {'rows': rows})}")


if __name__ == "__main__":
    main()
