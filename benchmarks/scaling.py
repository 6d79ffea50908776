"""Step time of the optimizer update as the model grows, on one device.

For 1e4 .. 1e7 parameters: a plain optax Adam update against Flying Squirrel's update
(one worker, Adam inner) at delay 0 and at uniform delays up to 16 with the defaults.
Reported: median time, XLA's count of bytes accessed (``cost_analysis``), the achieved
bandwidth, and the time ratio to Adam. Memory-bound code keeps a steady bandwidth as P
grows; the ratio then is the ratio of bytes moved.

Run: ``python -m benchmarks.scaling [--sizes 1e4 1e5 1e6 1e7]``.
"""

from __future__ import annotations

import argparse

import jax


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6, 1e7])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    import jax.numpy as jnp
    import optax

    import fsq
    from benchmarks import timing

    adam = fsq.adam(1e-3)
    rows = []
    for size in map(int, args.sizes):
        params = jnp.zeros(size)
        grads = jnp.ones(size)
        candidates = {"optax adam": (adam, False)}
        for name, delay in (("delay 0", 0), ("uniform(16)", fsq.delays.uniform(16))):
            candidates[f"flying squirrel, {name}"] = (
                fsq.flying_squirrel(adam, num_workers=1, delay=delay),
                True,
            )
        thunks, bytes_accessed = {}, {}
        for name, (tx, mapped) in candidates.items():
            update = tx.update
            state = tx.init(params)
            if mapped:  # one worker on its own axis
                update = jax.vmap(
                    tx.update,
                    in_axes=(None, None, None),
                    out_axes=None,
                    axis_size=1,
                    axis_name="workers",
                )
            step = jax.jit(
                lambda g, s, p, update=update: (lambda u, s: (optax.apply_updates(p, u), s))(
                    *update(g, s, p)
                ),
                donate_argnums=(1,),
            )
            bytes_accessed[name] = timing.bytes_accessed(step, grads, state, params)
            holder = [state]

            def thunk(step=step, holder=holder, grads=grads, params=params):
                new_params, holder[0] = step(grads, holder[0], params)
                return new_params

            thunks[name] = thunk
        medians = timing.median_seconds(thunks, repeats=args.repeats)
        base = medians["optax adam"]
        for name, t in medians.items():
            rows.append(
                {
                    "params": size,
                    "update": name,
                    "median_ms": 1e3 * t,
                    "MB_accessed": bytes_accessed[name] / 1e6,
                    "GB_per_s": bytes_accessed[name] / t / 1e9,
                    "ratio_to_adam": t / base,
                }
            )
    timing.print_table(rows)
    print(f"results: {timing.save('scaling', {'rows': rows})}")


if __name__ == "__main__":
    main()
