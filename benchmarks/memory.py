"""Memory and communication of Flying Squirrel, from the state pytree and the compiled step.

The state a device holds, in bytes, for a model of P float32 parameters sharded over S
model shards, L = W / D workers on each of the D worker groups (W workers), a ring of
R = max_delay + 1 rows (0 without delays) of C channels (3 with delay compensation)
stored in s bytes an entry (4, or 2 in bfloat16):

    per parameter, divided by S:
      4                      the parameters
      + I                    the inner optimizer's state (Adam: 8)
      + R C s                the in-flight rows (R C s L with a robust rule: each local
                             worker's messages apart)
      + 4                    DC-ASGD-a's mean square (the defaults)
      + L E                  what each worker holds of its own (error feedback 4, worker
                             momentum 4, local steps 8 + the local optimizer's)
      + 4 W C                the workers' latest votes (robust rule)
    and, not divided by S:
      R (7 x 4 + 1)          the rows' totals and marks (x L with a robust rule)
    and with sparse messages held as pairs instead of rows (k kept entries, their pairs
    divided among the S shards, k rounded up to a multiple of S):
      R L (k / S (4 + C s) + 32)

``formula`` writes it out; ``python -m benchmarks.memory`` checks it against the state
of one step of an MLP (every combination, 32 workers on 8 devices, bytes per device) with
the compiled step's peak memory (``memory_analysis``) and its collectives (count and
bytes in the compiled HLO: the dense exchange's one all-reduce, the sparse one's
all-gather of the kept pairs, a robust rule's all-gather of every worker's row);
``--sharded`` checks it for S in {1, 2, 4, 8} model shards (8 workers on 8 devices),
measured from the arrays' shards and from ``memory_analysis``; ``--scale`` compiles a
GPT-style step of a billion parameters ahead of time for 8 devices, with abstract shapes
(nothing is allocated), and reports its memory per device; ``--largest`` tabulates the
largest model whose state fits a device, from the formula.

Run: ``python -m benchmarks.memory [--devices 8] [--workers 32] [--sharded | --scale |
--largest]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import jax

OPS = "all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter"
COLLECTIVE = re.compile(rf"= (?P<shape>\([^)]*\)|[^ ]+) (?P<op>{OPS})\(")
TOTALS_AND_MARK = 7 * 4 + 1  # a row's totals (float32) and its one-byte mark


def collective_bytes(hlo: str) -> dict[str, tuple[int, int]]:
    """``op -> (count, bytes)`` of the collectives in compiled HLO text (a combined
    collective of a tuple counts once, with the bytes of all its parts)."""
    found: dict[str, tuple[int, int]] = {}
    for match in COLLECTIVE.finditer(hlo):
        size = 0
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match["shape"]):
            count = 1
            for d in filter(None, dims.split(",")):
                count *= int(d)
            size += count * {"f32": 4, "f64": 8, "bf16": 2, "s32": 4, "f16": 2}.get(dtype, 4)
        count, total = found.get(match["op"], (0, 0))
        found[match["op"]] = (count + 1, total + size)
    return found


def per_device_bytes(tree) -> int:
    """Bytes of ``tree`` held by one device (its shard of every leaf)."""
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class Features:
    """A feature set of Flying Squirrel and what its state keeps per parameter.

    Attributes:
      name: as the tables print it.
      make: ``(inner, num_workers) -> transformation`` (per worker, on the worker axes of
        :mod:`fsq.parallel`).
      max_delay: the largest delay.
      channels: C.
      inner: bytes per parameter of the inner (outer) optimizer's state.
      in_flight: bytes a stored entry.
      own: bytes per parameter each worker holds of its own.
      adaptive: DC-ASGD-a's mean square.
      apart: a robust rule (messages apart, votes).
      density: a sparse message's kept fraction, held as pairs (``None``: rows).
    """

    name: str
    make: Callable[[Any, int], Any]
    max_delay: int
    channels: int = 1
    inner: int = 8
    in_flight: int = 4
    own: int = 0
    adaptive: bool = False
    apart: bool = False
    density: float | None = None


def formula(f: Features, num_params: int, shards: int, local: int, workers: int, kept=0) -> float:
    """Bytes of the state on one device (see the module), ``kept`` the entries a sparse
    message keeps (with ``f.density``)."""
    rows = f.max_delay + 1 if f.max_delay else 0
    segments = local if f.apart else 1
    per_parameter = 4 + f.inner + 4 * f.adaptive + local * f.own
    per_parameter += 4 * workers * f.channels if f.apart else 0
    if f.density is None:
        per_parameter += rows * segments * f.channels * f.in_flight
        fixed = rows * segments * TOTALS_AND_MARK
    else:
        per_shard = -(-kept // shards)  # pairs padded to a multiple of the shards
        fixed = rows * local * (per_shard * (4 + f.channels * f.in_flight) + 4 * 7 + 4)
    return per_parameter * num_params / shards + fixed


def flying(fsq, **options) -> Callable[[Any, int], Any]:
    """``(inner, W) -> flying_squirrel(inner, ...)`` with ``options``, over fsq.parallel's axes."""
    return lambda inner, w: fsq.flying_squirrel(
        inner, num_workers=w, axis_name=fsq.parallel.AXIS_NAME, **options
    )


def feature_sets(fsq, jnp, optax) -> list[Features]:
    """The feature sets the tables measure (8 workers' worth of options)."""
    uniform = fsq.delays.uniform(16)
    plain = {"delay": uniform, "staleness": None, "compensation": None}
    squirrel = functools.partial(flying, fsq)

    top_k = fsq.compression.top_k(0.01, per_leaf=True)
    return [
        Features("delay 0, plain", squirrel(delay=0, staleness=None, compensation=None), 0),
        Features("uniform(16), plain", squirrel(**plain), 16),
        Features("uniform(16), defaults", squirrel(delay=uniform), 16, 3, adaptive=True),
        Features(
            "uniform(16), defaults, bfloat16 in flight",
            squirrel(delay=uniform, in_flight_dtype=jnp.bfloat16),
            16,
            3,
            in_flight=2,
            adaptive=True,
        ),
        Features(
            "uniform(16), top-k 1% + EF, rows",
            squirrel(**plain, compression=top_k, in_flight="rows"),
            16,
            own=4,
        ),
        Features(
            "uniform(16), top-k 1% + EF, pairs",
            squirrel(**plain, compression=top_k, in_flight="pairs"),
            16,
            own=4,
            density=0.01,
        ),
        Features("uniform(16), worker momentum", squirrel(**plain, worker_momentum=0.9), 16, own=4),
        Features("uniform(16), median", squirrel(**plain, aggregation="median"), 16, apart=True),
        Features(
            "DiLoCo, H = 50 (AdamW inner)",
            lambda inner, w: fsq.diloco(
                optax.adamw(1e-3), num_workers=w, steps=50, axis_name=fsq.parallel.AXIS_NAME
            ),
            0,
            inner=4,  # outer Nesterov: a momentum
            own=16,  # anchor, progress, AdamW's two moments
        ),
    ]


def largest_model(features: Features, device_bytes: float, shards: int, workers: int) -> float:
    """The parameters whose state fits ``device_bytes`` on a device, ``shards`` devices a
    worker group and one worker a group (``workers`` in all): the formula is linear in
    P (a sparse message keeps ``density P`` entries)."""

    def state(num_params):
        kept = (features.density or 0) * num_params
        return formula(features, num_params, shards, 1, workers, kept)

    per_parameter = (state(10**9) - state(0)) / 10**9  # over many: rounding k is nothing
    return (device_bytes - state(0)) / per_parameter


def largest_models(fsq, jnp, optax, timing) -> None:
    """The table of the largest model per device memory, for every feature set."""
    rows = []
    for features in feature_sets(fsq, jnp, optax):
        row = {"features": features.name}
        for shards in (1, 8):
            for gib in (16, 40, 80):
                row[f"S={shards}, {gib} GiB"] = largest_model(features, gib * 2**30, shards, 8)
        rows.append(row)
    timing.print_table(rows)
    print(f"results: {timing.save('memory_largest', {'rows': rows})}")


def kept_entries(features: Features, params, fsq) -> int:
    if features.density is None:
        return 0
    sizes = [x.size for x in jax.tree.leaves(params)]
    return fsq.compression.top_k(features.density, per_leaf=True).count(sizes)


def one_dimensional(args, fsq, jnp, optax, mlp, timing) -> None:
    """Every feature set, ``args.workers`` workers on ``args.devices`` devices."""
    sizes = (784, args.width, args.width, 10)
    params = mlp.init(sizes)
    num_params = mlp.num_params(params)
    batch = (jnp.zeros((args.workers, 16, sizes[0])), jnp.zeros((args.workers, 16), jnp.int32))
    local = args.workers // args.devices
    sparse = {
        "uniform(16), top-k 1%, sparse exchange": {
            "compression": fsq.compression.top_k(0.01),
            "exchange": "sparse",
        },
        "uniform(16), random-k 1%, sparse exchange": {
            "compression": fsq.compression.random_k(0.01),
            "exchange": "sparse",
        },
    }
    plain = {"delay": fsq.delays.uniform(16), "staleness": None, "compensation": None}
    extra = [
        Features(name, flying(fsq, **plain, **options), 16, own=4)
        for name, options in sparse.items()
    ]
    rows = []
    inner = fsq.adam(1e-3)
    for features in feature_sets(fsq, jnp, optax) + extra:
        dp = fsq.parallel.data_parallel(
            mlp.loss, features.make(inner, args.workers), num_workers=args.workers
        )
        state = dp.init(params)
        held = per_device_bytes(state)
        want = formula(
            features, num_params, 1, local, args.workers, kept_entries(features, params, fsq)
        )
        compiled = dp.step.lower(state, batch).compile()
        memory = compiled.memory_analysis()
        comms = collective_bytes(compiled.as_text())
        rows.append(
            {
                "features": features.name,
                "state_MiB": held / 2**20,
                "formula_MiB": want / 2**20,
                "ratio": held / want,
                "in_flight_MiB": per_device_bytes(state.opt_state.in_flight) / 2**20
                if hasattr(state.opt_state, "in_flight")
                else 0.0,
                "peak_temp_MiB": memory.temp_size_in_bytes / 2**20,
                "collectives": ", ".join(f"{op} x{c} ({b} B)" for op, (c, b) in comms.items()),
            }
        )
    print(f"{args.workers} workers on {args.devices} devices, {num_params} params; per device")
    timing.print_table(rows)
    print(f"results: {timing.save('memory', {'num_params': num_params, 'rows': rows})}")


def sharded(args, fsq, jnp, optax, mlp, timing) -> None:
    """Every feature set with S in {1, 2, 4, 8} model shards: 8 workers on 8 devices, one
    worker per device for S = 1 and S workers on each of the 8 / S groups."""
    sizes = (256, 512, 512, 16)  # every dimension divisible by 8: each leaf shards
    params = mlp.init(sizes)
    num_params = mlp.num_params(params)
    workers = 8
    batch = (jnp.zeros((workers, 16, sizes[0])), jnp.zeros((workers, 16), jnp.int32))
    rows = []
    inner = fsq.adam(1e-3)
    for features in feature_sets(fsq, jnp, optax):
        for shards in (1, 2, 4, 8):
            mesh = fsq.parallel.make_mesh(8, model_axes={"fsdp": shards})
            dp = fsq.parallel.data_parallel(
                mlp.loss, features.make(inner, workers), num_workers=workers, mesh=mesh
            )
            state = dp.init(params)
            local = workers // mesh.shape[fsq.parallel.DEVICE_AXIS]
            want = formula(
                features, num_params, shards, local, workers, kept_entries(features, params, fsq)
            )
            held = per_device_bytes(state)
            memory = dp.step.lower(state, batch).compile().memory_analysis()
            batch_bytes = sum(x[:local].nbytes for x in batch)  # a group's share
            compiled = memory.argument_size_in_bytes - batch_bytes
            rows.append(
                {
                    "features": features.name,
                    "S": shards,
                    "L": local,
                    "formula_MiB": want / 2**20,
                    "shards_MiB": held / 2**20,
                    "compiled_MiB": compiled / 2**20,
                    "shards_ratio": held / want,
                    "compiled_ratio": compiled / want,
                    "temp_MiB": memory.temp_size_in_bytes / 2**20,
                }
            )
            print(rows[-1])
    print(f"{workers} workers on 8 devices, MLP {sizes}, {num_params} params; per device")
    timing.print_table(rows)
    path = timing.save("memory_sharded", {"num_params": num_params, "rows": rows})
    print(f"results: {path}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--sharded", action="store_true", help="S in {1, 2, 4, 8} model shards")
    parser.add_argument("--scale", action="store_true", help="a 1B-parameter step, compiled")
    parser.add_argument(
        "--largest", action="store_true", help="the largest model per device memory (formula)"
    )
    args = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", 8 if (args.sharded or args.scale) else args.devices)

    import jax.numpy as jnp
    import optax

    import fsq
    from benchmarks import mlp, scale, timing

    if args.largest:
        largest_models(fsq, jnp, optax, timing)
    elif args.scale:
        scale.main(fsq, timing)
    elif args.sharded:
        sharded(args, fsq, jnp, optax, mlp, timing)
    else:
        one_dimensional(args, fsq, jnp, optax, mlp, timing)


if __name__ == "__main__":
    main()
