"""Recorded trajectories of Flying Squirrel: the numbers a refactor must not move.

Each configuration runs 50 steps of a small MLP through :func:`fsq.parallel.data_parallel`
and keeps the parameters and the transform's metrics after every step. The recording in
``tests/data/trajectories.npz`` was made before Flying Squirrel was rebuilt from pieces
(``python -m tests.trajectories`` writes it again); ``test_trajectories.py`` replays every
configuration and compares.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fsq

STEPS = 50
PATH = pathlib.Path(__file__).parent / "data" / "trajectories.npz"
METRICS = ("delivered", "staleness", "bounded", "rejected", "lost", "bytes_sent")
TRACE = np.random.default_rng(11).integers(0, 5, size=(9, 8))
OFF = {"staleness": None, "compensation": None}

# name: (workers, backend, devices, inner, flying_squirrel keywords, non-finite gradients)
CONFIGS = {
    "sync-sgd": (4, "vmap", 1, ("sgd", 0.1), {"delay": 0, **OFF}, False),
    "sync-defaults-adam": (8, "vmap", 1, ("adam", 0.01), {"delay": 0}, False),
    "uniform-defaults-momentum": (
        8,
        "vmap",
        1,
        ("momentum", 0.05),
        {"delay": fsq.delays.uniform(6)},
        False,
    ),
    "uniform-plain-adam": (
        8,
        "vmap",
        1,
        ("adam", 0.01),
        {"delay": fsq.delays.uniform(6), **OFF},
        False,
    ),
    "trace-dc-inverse": (
        8,
        "vmap",
        1,
        ("sgd", 0.1),
        {"delay": fsq.delays.trace(TRACE), "compensation": 0.5, "staleness": "inverse"},
        False,
    ),
    "geometric-delay-adaptive": (
        4,
        "vmap",
        1,
        ("adam", 0.01),
        {
            "delay": fsq.delays.geometric(2.0, 7),
            "compensation": None,
            "staleness": "delay_adaptive",
        },
        False,
    ),
    "bound-drop": (
        8,
        "vmap",
        1,
        ("sgd", 0.1),
        {"delay": fsq.delays.heavy_tailed(8), "max_staleness": 2, **OFF},
        False,
    ),
    "bound-wait-defaults": (
        8,
        "vmap",
        1,
        ("momentum", 0.05),
        {"delay": fsq.delays.uniform(5), "max_staleness": 2, "on_stale": "wait"},
        False,
    ),
    "speeds-load-balance": (
        4,
        "vmap",
        1,
        ("sgd", 0.1),
        {"delay": fsq.delays.speeds([1.0, 1.5, 2.0, 4.0]), "load_balance": True},
        False,
    ),
    "constant-1-dc": (8, "vmap", 1, ("sgd", 0.1), {"delay": 1, "compensation": 0.3}, False),
    "faults-median-momentum": (
        8,
        "vmap",
        1,
        ("sgd", 0.1),
        {
            "delay": fsq.delays.uniform(3),
            "faults": [
                fsq.faults.drops(0.2),
                fsq.faults.crash_recover([2], at=10, until=30),
                fsq.faults.byzantine([5], "scale", -4.0),
            ],
            "aggregation": fsq.aggregation.median(mixing=1),
            "worker_momentum": 0.9,
            **OFF,
        },
        False,
    ),
    "trimmed-mean-random-attack": (
        8,
        "vmap",
        1,
        ("adam", 0.01),
        {
            "delay": fsq.delays.uniform(2),
            "faults": fsq.faults.byzantine([1], "random", 3.0),
            "aggregation": fsq.aggregation.trimmed_mean(0.25),
        },
        False,
    ),
    "centered-clip-shard-map": (
        8,
        "shard_map",
        4,
        ("sgd", 0.1),
        {
            "delay": fsq.delays.uniform(3),
            "faults": fsq.faults.crash([3], at=20),
            "aggregation": fsq.aggregation.centered_clip(2),
            "worker_momentum": 0.5,
        },
        False,
    ),
    "topk-ef-dense": (
        8,
        "vmap",
        1,
        ("sgd", 0.1),
        {"delay": fsq.delays.uniform(3), "compression": fsq.compression.top_k(0.2), **OFF},
        False,
    ),
    "topk-sparse-shard-map": (
        16,
        "shard_map",
        8,
        ("sgd", 0.1),
        {
            "delay": fsq.delays.uniform(3),
            "compression": fsq.compression.top_k(0.2),
            "exchange": "sparse",
            **OFF,
        },
        False,
    ),
    "randomk-sparse-defaults": (
        8,
        "vmap",
        1,
        ("momentum", 0.05),
        {
            "delay": fsq.delays.uniform(4),
            "compression": fsq.compression.random_k(0.3),
            "exchange": "sparse",
        },
        False,
    ),
    "sign-defaults": (
        8,
        "vmap",
        1,
        ("adam", 0.01),
        {"delay": fsq.delays.uniform(4), "compression": fsq.compression.sign()},
        False,
    ),
    "quantize-no-ef": (
        4,
        "vmap",
        1,
        ("sgd", 0.1),
        {
            "delay": 2,
            "compression": fsq.compression.quantize(4, error_feedback=False),
            **OFF,
        },
        False,
    ),
    "non-finite-defaults": (8, "vmap", 1, ("adam", 0.01), {"delay": fsq.delays.uniform(4)}, True),
    "shard-map-defaults": (
        16,
        "shard_map",
        8,
        ("adam", 0.01),
        {"delay": fsq.delays.uniform(4)},
        False,
    ),
    "pmap-dc-c": (
        8,
        "pmap",
        8,
        ("sgd", 0.1),
        {"delay": fsq.delays.uniform(3), "compensation": 0.2},
        True,
    ),
    "one-per-device-never-zero": (
        8,
        "shard_map",
        8,
        ("momentum", 0.05),
        {"delay": fsq.delays.trace(TRACE + 1)},
        False,
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
    num_workers, backend, devices, (inner, lr), kwargs, non_finite = CONFIGS[name]
    tx = fsq.flying_squirrel(
        fsq.get_optimizer(inner, learning_rate=lr),
        num_workers=num_workers,
        axis_name=fsq.parallel.AXIS_NAME,
        seed=5,
        **kwargs,
    )
    mesh = None if backend == "vmap" else fsq.parallel.make_mesh(devices)
    dp = fsq.parallel.data_parallel(loss, tx, num_workers=num_workers, backend=backend, mesh=mesh)
    state = dp.init(init_params())
    x, y = batches(num_workers, non_finite)
    path, metrics = [], {m: [] for m in METRICS}
    for t in range(STEPS):
        state, _ = dp.step(state, (x[t], y[t]))
        path.append(np.concatenate([np.ravel(p) for p in jax.tree.leaves(state.params)]))
        for m in METRICS:
            metrics[m].append(np.asarray(optax.tree.get(state.opt_state, m)))
    return np.stack(path), {m: np.stack(v) for m, v in metrics.items()}


def record():
    arrays = {}
    for name in CONFIGS:
        path, metrics = run(name)
        arrays[f"{name}/params"] = path
        for m, v in metrics.items():
            arrays[f"{name}/{m}"] = v
        print(name, "final loss-free check:", float(np.abs(path[-1] - path[0]).sum()))
    PATH.parent.mkdir(exist_ok=True)
    np.savez_compressed(PATH, **arrays)


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 8)
    record()
