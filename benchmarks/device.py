"""The numbers of whatever accelerator is present, in one command and one JSON.

``python -m benchmarks.device [--out device.json] [--smoke]`` runs, each in its own
process on the default JAX backend (a GPU or TPU where there is one, else the CPU):

- ``limit``: the step against the large-batch bound (:mod:`benchmarks.limit`);
- ``overhead``: against a hand-written step, one worker per device and many workers on
  one device (:mod:`benchmarks.overhead`);
- ``throughput`` and ``throughput_time``: simulated gradients per second, delay-only and
  with a clock, against an event-driven loop (:mod:`benchmarks.throughput`);
- ``study``: the workers study at its quick scale (``python -m experiments workers
  --quick``), its wall time.

It writes one JSON: the device, the JAX version, and for each part its command, return
code, wall seconds and the results it saved (``FSQ_BENCHMARK_RESULTS`` points the
benchmarks at a temporary folder, so the checked-in ``benchmarks/results`` stay as they
are). A part that fails is recorded with the tail of its output, and the others still
run. ``--smoke`` runs every part at a toy size (the test of this script, on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from benchmarks.timing import RESULTS_ENV

FULL = {
    "limit": ["benchmarks.limit"],
    "overhead": ["benchmarks.overhead"],
    "overhead_vmap": ["benchmarks.overhead", "--layout", "vmap"],
    "throughput": ["benchmarks.throughput", "--devices", "1", "--workers", "8", "64"],
    "throughput_time": ["benchmarks.throughput", "--time", "--models", "mlp"],
    "study": ["experiments", "workers", "--quick", "--no-progress"],
}
SMOKE = {
    "limit": ["--workers", "2", "--batch", "4", "--sizes", "8", "16", "4", "--repeats", "2"],
    "overhead": ["--width", "32", "--batches", "4", "--repeats", "2"],
    "overhead_vmap": ["--width", "32", "--workers", "2", "--repeats", "2"],
    "throughput": ["--models", "logistic", "--steps", "2", "--baseline-steps", "1"],
    "throughput_time": ["--workers", "4"],
    "study": ["--set", "worker_counts=(1, 2)", "--set", "seeds=1"],
}


def device() -> dict:
    import jax

    return {
        "backend": jax.default_backend(),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "jax": jax.__version__,
    }


def run_part(name: str, module_args: list[str], folder: pathlib.Path, timeout: float) -> dict:
    results = folder / name
    results.mkdir()
    args = list(module_args)
    if args[0] == "experiments":
        args += ["--out", str(results / "study")]
    command = [sys.executable, "-m", *args]
    env = {**os.environ, RESULTS_ENV: str(results)}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        code, output = None, f"timed out after {timeout} s: {e.stdout or ''}{e.stderr or ''}"
    part = {
        "command": " ".join(["python", "-m", *args]),
        "returncode": code,
        "seconds": round(time.perf_counter() - start, 2),
        "results": {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))},
    }
    if code != 0:
        part["output_tail"] = output[-4000:]
    return part


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="device.json", help="the JSON written")
    parser.add_argument("--smoke", action="store_true", help="every part at a toy size")
    parser.add_argument("--parts", nargs="+", choices=list(FULL), default=list(FULL))
    parser.add_argument("--timeout", type=float, default=900, help="seconds per part")
    args = parser.parse_args(argv)
    payload = {"device": device(), "smoke": args.smoke, "parts": {}}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.parts:
            extra = SMOKE[name] if args.smoke else []
            part = run_part(name, FULL[name] + extra, pathlib.Path(folder), args.timeout)
            payload["parts"][name] = part
            print(f"{name}: rc {part['returncode']}, {part['seconds']} s", flush=True)
    out = pathlib.Path(args.out)
    out.write_text(json.dumps(payload, indent=1))
    print(f"written: {out}")
    return payload


if __name__ == "__main__":
    main()
