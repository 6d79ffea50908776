"""Memory and communication of Flying Squirrel, from the state pytree and the compiled step.

For each feature combination: the bytes of optimizer state per device, split into the
in-flight buffer and the rest, next to the documented formula

    in_flight = (max_delay + 1) * R * ((C * P + 7) * 4 + 1) bytes (0 without delays),
    C = 1 (3 with compensation), R = 1 (W / D with a robust aggregation)

(P parameters, C gradient channels, 6 bookkeeping scalars per row, float32: max_delay + 1
ring rows, each with a one-byte mark of whether it holds messages; a robust rule keeps
each of the device's W / D workers' messages apart); the peak memory of the compiled
step (``memory_analysis``); and the count and bytes of the collectives in the compiled
HLO of one step, for the dense exchange (one all-reduce), the sparse one of top-k and
random-k (one all-gather of the kept pairs), and a robust rule (one all-gather of every
worker's row).

Run: ``python -m benchmarks.memory [--devices 8] [--workers 32]``.
"""

from __future__ import annotations

import argparse
import re

import jax

OPS = "all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter"
COLLECTIVE = re.compile(rf"= (?P<shape>[^ ]+) (?P<op>{OPS})\(")


def collective_bytes(hlo: str) -> dict[str, tuple[int, int]]:
    """``op -> (count, bytes)`` of the collectives in compiled HLO text."""
    found: dict[str, tuple[int, int]] = {}
    for match in COLLECTIVE.finditer(hlo):
        dtype, dims = re.match(r"(\w+)\[([\d,]*)\]", match["shape"]).groups()
        size = 1
        for d in filter(None, dims.split(",")):
            size *= int(d)
        width = {"f32": 4, "f64": 8, "bf16": 2, "s32": 4, "f16": 2}.get(dtype, 4)
        count, total = found.get(match["op"], (0, 0))
        found[match["op"]] = (count + 1, total + size * width)
    return found


def per_device_bytes(tree) -> int:
    """Bytes of ``tree`` held by one device (its shard of every leaf)."""
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", args.devices)

    import jax.numpy as jnp

    import fsq
    from benchmarks import mlp, timing

    sizes = (784, args.width, args.width, 10)
    params = mlp.init(sizes)
    num_params = mlp.num_params(params)
    loss_fn = mlp.loss

    batch = (jnp.zeros((args.workers, 16, sizes[0])), jnp.zeros((args.workers, 16), jnp.int32))
    uniform = fsq.delays.uniform(16)
    plain = {"delay": uniform, "staleness": None, "compensation": None}
    # name: (flying_squirrel kwargs, max_delay, channels C, rows per slot R)
    combos = {
        "delay 0, plain": ({"delay": 0, "staleness": None, "compensation": None}, 0, 1, 1),
        "uniform(16), plain": (plain, 16, 1, 1),
        "uniform(16), default": ({"delay": uniform}, 16, 3, 1),
        "uniform(16), DC-c": ({**plain, "compensation": 0.04}, 16, 3, 1),
        "uniform(16), DC-a": ({**plain, "compensation": fsq.compensation.adaptive()}, 16, 3, 1),
        "uniform(16), top-k 1%, sparse": (
            {**plain, "compression": fsq.compression.top_k(0.01), "exchange": "sparse"},
            16,
            1,
            1,
        ),
        "uniform(16), random-k 1%, sparse": (
            {**plain, "compression": fsq.compression.random_k(0.01), "exchange": "sparse"},
            16,
            1,
            1,
        ),
        "uniform(16), median": (
            {**plain, "aggregation": "median"},
            16,
            1,
            args.workers // args.devices,
        ),
    }
    rows = []
    inner = fsq.adam(1e-3)
    inner_bytes = sum(x.nbytes for x in jax.tree.leaves(inner.init(params)))
    for name, (kwargs, max_delay, channels, rows_per_slot) in combos.items():
        tx = fsq.flying_squirrel(
            inner, num_workers=args.workers, axis_name=fsq.parallel.AXIS_NAME, **kwargs
        )
        dp = fsq.parallel.data_parallel(loss_fn, tx, num_workers=args.workers)
        state = dp.init(params)
        in_flight, total = (
            per_device_bytes(state.opt_state.in_flight),
            per_device_bytes(state.opt_state),
        )
        slots = max_delay + 1 if max_delay else 0
        formula = slots * rows_per_slot * ((channels * num_params + 7) * 4 + 1)
        compiled = dp.step.lower(state, batch).compile()
        memory = compiled.memory_analysis()
        comms = collective_bytes(compiled.as_text())
        rows.append(
            {
                "features": name,
                "in_flight_MiB": in_flight / 2**20,
                "formula_MiB": formula / 2**20,
                "matches": in_flight == formula,
                "rest_of_state_MiB": (total - in_flight) / 2**20,
                "adam_state_MiB": inner_bytes / 2**20,
                "peak_temp_MiB": getattr(memory, "temp_size_in_bytes", 0) / 2**20,
                "collectives": ", ".join(f"{op} x{c} ({b} B)" for op, (c, b) in comms.items()),
            }
        )
    print(
        f"{args.workers} workers on {jax.device_count()} devices, {num_params} params; "
        "bytes per device"
    )
    timing.print_table(rows)
    print(f"results: {timing.save('memory', {'num_params': num_params, 'rows': rows})}")


if __name__ == "__main__":
    main()
