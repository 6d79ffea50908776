"""Simulator throughput: fsq against the event-driven loop research code usually writes.

The baseline is the common hand-written simulator of asynchronous SGD: a Python loop over
steps and workers, a jitted gradient call per worker, a heap of pending gradients keyed
by delivery step, and a jitted optax update on what is due. fsq runs the same simulation
(same model, batch, delay distribution) as one jitted SPMD step for all workers, spread
over the devices. Reported: simulated worker-gradients per second, and the speed-up, for
two models of the MNIST-1D study: logistic regression (410 parameters, where a
simulator's own cost dominates, as in most delay studies) and the MLP (15k parameters,
where both approach the arithmetic limit of the cores).

With ``--sweep``, instead: how compile time and step time grow with the number of
workers on one device (``data_parallel(backend="vmap")``, Flying Squirrel's defaults,
uniform delays up to 16, a 9.6k-parameter MLP of 8x8 digits): a simulator that claims to
scale must compile in about the same time for thousands of workers as for dozens, and
take time linear in their number per step.

With ``--time``, instead: the simulator of workers in time (a clock, :mod:`fsq.timing`)
against the delay-only one, and against an event-driven Python loop of the same jobs, in
worker-gradients *applied* per second: the clock computes only the gradients of the
workers that start a job (``data_parallel(gradient_slots=...)``), so a heterogeneous
cluster, where most workers are busy most ticks, should cost about what the delay-only
simulator costs per gradient.

Run: ``python -m benchmarks.throughput [--devices 8] [--workers 8 64 256]``,
``python -m benchmarks.throughput --sweep [--workers 64 256 1024 4096]``, or
``python -m benchmarks.throughput --time [--workers 64]``.
"""

from __future__ import annotations

import argparse
import heapq
import itertools

import jax

# name: layer widths (no hidden layer: logistic regression)
MODELS = {"logistic": (40, 10), "mlp": (40, 100, 100, 10)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument(
        "--workers", type=int, nargs="+", help="default: 8 64 256, or 64 256 1024 4096 (--sweep)"
    )
    parser.add_argument("--steps", type=int, default=40, help="fsq steps timed per repeat")
    parser.add_argument("--baseline-steps", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sweep", action="store_true", help="compile and step time against W")
    parser.add_argument("--time", action="store_true", help="the time simulator's cost")
    args = parser.parse_args()
    if args.sweep:
        sweep(args.workers or [64, 256, 1024, 4096])
        return
    if args.time:
        in_time(args.workers or [64], args.models)
        return
    args.workers = args.workers or [8, 64, 256]
    jax.config.update("jax_num_cpu_devices", args.devices)

    import numpy as np
    import optax

    import fsq
    from benchmarks import mlp, timing

    batch, max_delay = 32, 16
    loss_fn = mlp.loss
    keys = jax.random.split(jax.random.key(1), 2)

    inner = fsq.sgd(0.05)
    grad = jax.jit(jax.grad(loss_fn))

    @jax.jit
    def apply(params, opt_state, mean_grad):
        updates, opt_state = inner.update(mean_grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rows = []
    for model, workers in itertools.product(args.models, args.workers):
        sizes = MODELS[model]
        params = mlp.init(sizes)
        data = (
            jax.random.normal(keys[0], (workers, batch, sizes[0])),
            jax.random.randint(keys[1], (workers, batch), 0, 10),
        )

        def baseline(steps, workers=workers, data=data, params=params):
            rng = np.random.default_rng(0)
            pending, state, sent = [], [params, inner.init(params)], 0
            for t in range(steps):
                for i in range(workers):
                    g = grad(state[0], (data[0][i], data[1][i]))
                    arrival = t + int(rng.integers(0, max_delay + 1))
                    heapq.heappush(pending, (arrival, sent, g))  # `sent` breaks ties
                    sent += 1
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
        simulators = {}
        for backend in ("shard_map", "vmap"):
            dp = fsq.parallel.data_parallel(loss_fn, tx, num_workers=workers, backend=backend)
            holder = [dp.init(params)]
            # The whole simulation is one program: a scan over steps of the SPMD step.
            scan = jax.jit(
                lambda state, data, dp=dp: jax.lax.scan(
                    lambda s, _: dp.step(s, data), state, None, length=args.steps
                ),
                donate_argnums=0,
            )

            def simulator(scan=scan, holder=holder, data=data):
                holder[0], losses = scan(holder[0], data)
                return losses

            simulators[f"fsq {backend}"] = simulator

        medians = timing.median_seconds(
            {"baseline": lambda b=baseline: b(args.baseline_steps), **simulators},
            repeats=5,
            warmup=1,
        )
        base_rate = workers * args.baseline_steps / medians["baseline"]
        row = {
            "model": f"{model} ({mlp.num_params(params)} params)",
            "workers": workers,
            "baseline_grads_per_s": base_rate,
        }
        for name in simulators:
            rate = workers * args.steps / medians[name]
            row[f"{name}_grads_per_s"] = rate
            row[f"{name}_speedup"] = rate / base_rate
        rows.append(row)
    print(
        f"batch {batch} per worker, uniform delays 0..{max_delay}; "
        f"shard_map over {jax.device_count()} devices, vmap on one"
    )
    timing.print_table(rows)
    print(f"results: {timing.save('throughput', {'rows': rows})}")


def sweep(workers: list[int], steps: int = 10) -> None:
    """Compile time (lowering and compiling one step) and median step time per ``W``."""
    import time

    import jax.numpy as jnp

    import fsq
    from benchmarks import mlp, timing

    sizes = (64, 128, 10)
    params = mlp.init(sizes)
    rows = []
    for w in workers:
        tx = fsq.flying_squirrel(
            fsq.sgd(0.1),
            num_workers=w,
            axis_name=fsq.parallel.AXIS_NAME,
            delay=fsq.delays.uniform(16),
        )
        dp = fsq.parallel.data_parallel(mlp.loss, tx, num_workers=w, backend="vmap")
        batch = (jnp.ones((w, 16, sizes[0])), jnp.zeros((w, 16), jnp.int32))
        holder = [dp.init(params)]
        start = time.perf_counter()
        dp.step.lower(holder[0], batch).compile()
        compile_s = time.perf_counter() - start

        def step(holder=holder, dp=dp, batch=batch):
            holder[0], losses = dp.step(holder[0], batch)
            return losses

        seconds = timing.median_seconds({"step": step}, repeats=steps, warmup=1)["step"]
        rows.append(
            {
                "workers": w,
                "compile_s": compile_s,
                "step_ms": 1e3 * seconds,
                "us_per_worker": 1e6 * seconds / w,
            }
        )
        print(rows[-1], flush=True)
    print(f"MLP {sizes} ({mlp.num_params(params)} params), uniform(16), defaults, one device")
    timing.print_table(rows)
    print(f"results: {timing.save('throughput_sweep', {'rows': rows})}")


def in_time(workers_list: list[int], models: list[str], ticks: int = 60) -> None:
    """Applied worker-gradients per second: the clock, delay-only, and a Python event loop."""
    import heapq

    import jax.numpy as jnp
    import numpy as np
    import optax

    import fsq
    from benchmarks import mlp, timing

    batch, inner = 32, fsq.sgd(0.05)
    grad = jax.jit(jax.grad(mlp.loss))

    @jax.jit
    def apply(params, opt_state, total, count):
        updates, opt_state = inner.update(jax.tree.map(lambda g: g / count, total), opt_state)
        return optax.apply_updates(params, updates), opt_state

    rows = []
    for model, workers in itertools.product(models, workers_list):
        sizes = MODELS[model]
        params = mlp.init(sizes)
        keys = jax.random.split(jax.random.key(1), 2)
        data = (
            jax.random.normal(keys[0], (workers, batch, sizes[0])),
            jax.random.randint(keys[1], (workers, batch), 0, 10),
        )
        # Heterogeneous workers, 1 to 8 ticks per gradient (sqrt-spread, as in Tyurin and
        # Richtarik's experiments), fixed or random (geometric with those means): a worker
        # starts a job every 4 ticks or so.
        means = [min(8, max(1, round(2 * np.sqrt(i + 1) - 1))) for i in range(workers)]
        profiles = {
            "fixed": fsq.timing.fixed(means),
            "random": fsq.timing.exponential(means, max_ticks=16),
        }
        starts_per_tick = sum(1 / t for t in means)
        slots = min(workers, int(np.ceil(starts_per_tick)))
        candidates, applied_per_tick = {}, {}
        for name, options in (
            ("delay-only", {}),
            *((f"clock, {p}", {"compute": model}) for p, model in profiles.items()),
        ):
            tx = fsq.flying_squirrel(
                inner,
                num_workers=workers,
                axis_name=fsq.parallel.AXIS_NAME,
                delay=fsq.delays.uniform(4),
                staleness=None,
                compensation=None,
                **options,
            )
            dp = fsq.parallel.data_parallel(
                mlp.loss, tx, num_workers=workers, backend="vmap", gradient_slots=slots
            )
            holder = [dp.init(params)]

            def tick(state, _, dp=dp, data=data):
                state, _ = dp.step(state, data)
                return state, state.opt_state.delivered

            scan = jax.jit(lambda state, tick=tick: jax.lax.scan(tick, state, None, length=ticks))

            def run(scan=scan, holder=holder, name=name, counts=applied_per_tick):
                holder[0], delivered = scan(holder[0])
                counts[name] = float(jnp.mean(delivered))
                return delivered

            candidates[name] = run

        def event_loop(params=params, ticks_per_job=means, data=data, counts=applied_per_tick):
            """A Python loop of the same jobs: a heap of arrivals, a jitted gradient each."""
            rng = np.random.default_rng(0)
            state, pending, order, applied = [params, inner.init(params)], [], 0, 0
            free_at = [0] * len(ticks_per_job)
            for t in range(ticks // 4):
                for i, c in enumerate(ticks_per_job):
                    if free_at[i] <= t:
                        g = grad(state[0], (data[0][i], data[1][i]))
                        arrival = t + c - 1 + int(rng.integers(0, 5))
                        heapq.heappush(pending, (arrival, order, g))
                        order, free_at[i] = order + 1, t + c
                due = []
                while pending and pending[0][0] == t:
                    due.append(heapq.heappop(pending)[2])
                if due:
                    total = jax.tree.map(lambda *g: sum(g), *due)
                    state[0], state[1] = apply(state[0], state[1], total, float(len(due)))
                    applied += len(due)
            counts["event loop"] = applied / (ticks // 4)
            return state[0]

        candidates["event loop"] = event_loop
        medians = timing.median_seconds(candidates, repeats=5, warmup=1)
        rates = {
            name: applied_per_tick[name] * (ticks // 4 if name == "event loop" else ticks) / t
            for name, t in medians.items()
        }
        for profile in profiles:
            clock = f"clock, {profile}"
            rows.append(
                {
                    "model": f"{model} ({mlp.num_params(params)} params)",
                    "workers": workers,
                    "compute": profile,
                    "applied_per_tick": applied_per_tick[clock],
                    "delay_only_grads_per_s": rates["delay-only"],
                    "clock_grads_per_s": rates[clock],
                    "event_loop_grads_per_s": rates["event loop"],
                    "cost_vs_delay_only": rates["delay-only"] / rates[clock],
                    "speedup_vs_event_loop": rates[clock] / rates["event loop"],
                }
            )
        print(rows[-1], flush=True)
    print(f"batch {batch} per worker, one device (vmap), uniform link delays 0..4")
    timing.print_table(rows)
    print(f"results: {timing.save('throughput_time', {'rows': rows})}")


if __name__ == "__main__":
    main()
