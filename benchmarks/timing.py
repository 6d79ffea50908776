"""Side-by-side timing: interleaved repetitions in one process, medians and ratios."""

from __future__ import annotations

import collections
import gzip
import json
import os
import pathlib
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np
from tabulate import tabulate


def median_seconds(
    candidates: dict[str, Callable[[], object]], repeats: int = 30, warmup: int = 3
) -> dict[str, float]:
    """Median wall time of each thunk; repetitions are interleaved so drift hits all alike,
    each in a new (seeded) random order: a fixed order made the thunk that ran after the
    same neighbour every time up to 15% slower here."""
    for thunk in candidates.values():
        for _ in range(warmup):
            jax.block_until_ready(thunk())
    times: dict[str, list[float]] = {name: [] for name in candidates}
    rng = np.random.default_rng(0)
    for _ in range(repeats):
        for name in rng.permutation(list(candidates)):
            thunk = candidates[name]
            start = time.perf_counter()
            jax.block_until_ready(thunk())
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def profile(thunk: Callable[[], object], steps: int = 50, top: int = 20) -> list[dict]:
    """Where the time of ``thunk`` goes: the ``top`` operations of its compiled program by
    time per call, from a ``jax.profiler`` trace of ``steps`` calls (after a warm-up).

    Operations run concurrently on the cores, so their times overlap; and a conditional's
    time includes its branch's operations, which are also listed.
    """
    for _ in range(3):
        jax.block_until_ready(thunk())
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(steps):
                out = thunk()
            jax.block_until_ready(out)
        (path,) = pathlib.Path(folder).rglob("*.trace.json.gz")
        events = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
    total: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for event in events:
        # Complete events of the runtime; "$..." ones are Python frames.
        if event.get("ph") == "X" and not event["name"].startswith("$"):
            total[event["name"]] += event.get("dur", 0)
            calls[event["name"]] += 1
    return [
        {"operation": name, "ms_per_call": us / steps / 1e3, "runs_per_call": calls[name] / steps}
        for name, us in total.most_common(top)
    ]


def bytes_accessed(step: Callable, *args) -> float:
    """XLA's count of the bytes the compiled ``step(*args)`` reads and writes."""
    cost = step.lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost).get("bytes accessed", 0.0))


def print_table(rows: list[dict]) -> None:
    print(tabulate(rows, headers="keys", floatfmt=".4g"))


RESULTS_ENV = "FSQ_BENCHMARK_RESULTS"


def save(name: str, payload: dict) -> pathlib.Path:
    """Writes ``payload`` (with the device and jax version) as ``NAME.json`` in
    ``benchmarks/results``, or in the folder ``$FSQ_BENCHMARK_RESULTS`` names."""
    out = pathlib.Path(os.environ.get(RESULTS_ENV) or pathlib.Path(__file__).parent / "results")
    out.mkdir(exist_ok=True)
    payload = {
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "jax": jax.__version__,
        **payload,
    }
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path
