"""Recorded trajectories of Flying Squirrel: the numbers a refactor must not move.

Each configuration runs 50 steps of a small MLP through :func:`fsq.parallel.data_parallel`
and keeps the parameters and the transform's metrics after every step.
``test_trajectories.py`` replays every configuration and compares with two recordings:

- ``tests/data/trajectories.npz``, made before Flying Squirrel was rebuilt from pieces,
  on another machine;
- ``tests/data/trajectories-<fingerprint>.npz``, made on a machine that rounds as this
  one does (:func:`fingerprint`), if there is one: XLA compiles for the host's vector
  units, so the same program can round differently on another CPU.

``python -m tests.trajectories`` records this machine's, compiled as the test suite
compiles (:mod:`tests._compile`; ``XLA_FLAGS=--xla_backend_optimization_level=3`` for
the optimized code's recording).
"""

from __future__ import annotations

import hashlib
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fsq
from tests import _compile

STEPS = 50
PATH = pathlib.Path(__file__).parent / "data" / "trajectories.npz"
METRICS = ("delivered", "staleness", "bounded", "rejected", "lost", "bytes_sent")
TRACE = np.random.default_rng(11).integers(0, 5, size=(9, 8))
OFF = {"staleness": None, "compensation": None}


class Config(NamedTuple):
    """One recorded run: ``options`` are the keywords of ``fsq.flying_squirrel``."""

    options: dict
    workers: int = 8
    backend: str = "vmap"
    devices: int = 1
    inner: tuple[str, float] = ("sgd", 0.1)
    non_finite: bool = False  # a few gradients hold a NaN or an infinity


U = fsq.delays.uniform
CONFIGS = {
    "sync-sgd": Config({"delay": 0, **OFF}, workers=4),
    "sync-defaults-adam": Config({"delay": 0}, inner=("adam", 0.01)),
    "uniform-defaults-momentum": Config({"delay": U(6)}, inner=("momentum", 0.05)),
    "uniform-plain-adam": Config({"delay": U(6), **OFF}, inner=("adam", 0.01)),
    "trace-dc-inverse": Config(
        {"delay": fsq.delays.trace(TRACE), "compensation": 0.5, "staleness": "inverse"}
    ),
    "geometric-delay-adaptive": Config(
        {
            "delay": fsq.delays.geometric(2.0, 7),
            "compensation": None,
            "staleness": "delay_adaptive",
        },
        workers=4,
        inner=("adam", 0.01),
    ),
    "bound-drop": Config({"delay": fsq.delays.heavy_tailed(8), "max_staleness": 2, **OFF}),
    "bound-wait-defaults": Config(
        {"delay": U(5), "max_staleness": 2, "on_stale": "wait"}, inner=("momentum", 0.05)
    ),
    "speeds-load-balance": Config(
        {"delay": fsq.delays.speeds([1.0, 1.5, 2.0, 4.0]), "load_balance": True}, workers=4
    ),
    "constant-1-dc": Config({"delay": 1, "compensation": 0.3}),
    "faults-median-momentum": Config(
        {
            "delay": U(3),
            "faults": [
                fsq.faults.drops(0.2),
                fsq.faults.crash_recover([2], at=10, until=30),
                fsq.faults.byzantine([5], "scale", -4.0),
            ],
            "aggregation": fsq.aggregation.median(mixing=1),
            "worker_momentum": 0.9,
            **OFF,
        }
    ),
    "trimmed-mean-random-attack": Config(
        {
            "delay": U(2),
            "faults": fsq.faults.byzantine([1], "random", 3.0),
            "aggregation": fsq.aggregation.trimmed_mean(0.25),
        },
        inner=("adam", 0.01),
    ),
    "centered-clip-shard-map": Config(
        {
            "delay": U(3),
            "faults": fsq.faults.crash([3], at=20),
            "aggregation": fsq.aggregation.centered_clip(2),
            "worker_momentum": 0.5,
        },
        backend="shard_map",
        devices=4,
    ),
    "topk-ef-dense": Config({"delay": U(3), "compression": fsq.compression.top_k(0.2), **OFF}),
    "topk-sparse-shard-map": Config(
        {
            "delay": U(3),
            "compression": fsq.compression.top_k(0.2),
            "exchange": "sparse",
            **OFF,
        },
        workers=16,
        backend="shard_map",
        devices=8,
    ),
    "randomk-sparse-defaults": Config(
        {"delay": U(4), "compression": fsq.compression.random_k(0.3), "exchange": "sparse"},
        inner=("momentum", 0.05),
    ),
    "sign-defaults": Config(
        {"delay": U(4), "compression": fsq.compression.sign()}, inner=("adam", 0.01)
    ),
    "quantize-no-ef": Config(
        {"delay": 2, "compression": fsq.compression.quantize(4, error_feedback=False), **OFF},
        workers=4,
    ),
    "non-finite-defaults": Config({"delay": U(4)}, inner=("adam", 0.01), non_finite=True),
    "shard-map-defaults": Config(
        {"delay": U(4)}, workers=16, backend="shard_map", devices=8, inner=("adam", 0.01)
    ),
    "pmap-dc-c": Config(
        {"delay": U(3), "compensation": 0.2}, backend="pmap", devices=8, non_finite=True
    ),
    "one-per-device-never-zero": Config(
        {"delay": fsq.delays.trace(TRACE + 1)},
        backend="shard_map",
        devices=8,
        inner=("momentum", 0.05),
    ),
}


def init_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "w1": jax.random.normal(k1, (5, 8)) * 0.5,
        "b1": jnp.zeros(8),
        "w2": jax.random.normal(k2, (8, 2)) * 0.5,
    }


def loss(params, batch):
    x, y = batch
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] - y) ** 2)


def batches(num_workers, non_finite):
    """``[steps, workers, ...]`` data; with ``non_finite``, a NaN or an infinity in the data
    of a few (step, worker) pairs makes those gradients non-finite."""
    rng = np.random.default_rng(num_workers)
    x = rng.normal(size=(STEPS, num_workers, 6, 5)).astype(np.float32)
    y = rng.normal(size=(STEPS, num_workers, 6, 2)).astype(np.float32)
    if non_finite:
        x[7, 1, 0, 0] = np.nan
        x[20, 3, 2, 4] = np.inf
        x[21, 3, 1, 1] = np.nan
        x[33, 0, 5, 2] = -np.inf
    return x, y


def run(name):
    """``(params [steps, P], {metric: [steps]})`` of configuration ``name``."""
    config = CONFIGS[name]
    num_workers, backend = config.workers, config.backend
    (inner, lr) = config.inner
    tx = fsq.flying_squirrel(
        fsq.get_optimizer(inner, learning_rate=lr),
        num_workers=num_workers,
        axis_name=fsq.parallel.AXIS_NAME,
        seed=5,
        **config.options,
    )
    mesh = None if backend == "vmap" else fsq.parallel.make_mesh(config.devices)
    dp = fsq.parallel.data_parallel(loss, tx, num_workers=num_workers, backend=backend, mesh=mesh)
    state = dp.init(init_params())
    x, y = batches(num_workers, config.non_finite)
    path, metrics = [], {m: [] for m in METRICS}
    for t in range(STEPS):
        state, _ = dp.step(state, (x[t], y[t]))
        path.append(np.concatenate([np.ravel(p) for p in jax.tree.leaves(state.params)]))
        for m in METRICS:
            metrics[m].append(np.asarray(optax.tree.get(state.opt_state, m)))
    return np.stack(path), {m: np.stack(v) for m, v in metrics.items()}


def fingerprint() -> str:
    """A digest of how this machine rounds the MLP's arithmetic, in plain JAX: the bits of
    its per-worker gradients under ``vmap`` (as the trainer computes them) for every worker
    count and layout the recordings use, and of ten steps of synchronous SGD and of Adam's
    arithmetic on their mean."""
    params = init_params()
    bits = []
    grad = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))
    for workers in sorted({c.workers for c in CONFIGS.values()}):
        x, y = batches(workers, non_finite=False)
        for per_device in {workers // c.devices for c in CONFIGS.values() if c.workers == workers}:
            bits += jax.tree.leaves(grad(params, (x[0, :per_device], y[0, :per_device])))
        for t in range(10):
            mean = jax.tree.map(lambda g: jnp.mean(g, axis=0), grad(params, (x[t], y[t])))
            bits += jax.tree.leaves(jax.tree.map(lambda g: g / (jnp.sqrt(g * g) + 1e-8), mean))
            params = jax.tree.map(lambda p, g: p - 0.1 * g, params, mean)
            bits += jax.tree.leaves(params)
    return hashlib.sha256(b"".join(np.asarray(b).tobytes() for b in bits)).hexdigest()[:12]


def this_machine() -> pathlib.Path:
    """The recording for machines that round as this one does."""
    return PATH.with_name(f"{PATH.stem}-{fingerprint()}.npz")


def record(path: pathlib.Path) -> None:
    arrays = {}
    for name in CONFIGS:
        run_path, metrics = run(name)
        arrays[f"{name}/params"] = run_path
        for m, v in metrics.items():
            arrays[f"{name}/{m}"] = v
        print(name, "moved:", float(np.abs(run_path[-1] - run_path[0]).sum()))
    path.parent.mkdir(exist_ok=True)
    np.savez_compressed(path, **arrays)
    print(f"recorded: {path}")


if __name__ == "__main__":
    _compile.unoptimized()  # before JAX's backend starts: record the suite's rounding
    jax.config.update("jax_num_cpu_devices", 8)
    record(this_machine())
