"""The built-in demo: the classic catalogue on a quadratic, Flying Squirrel on a mesh.

Part 1 sweeps the learning rate of every catalogue optimizer on an ill-conditioned
quadratic with noisy gradients and reports the best final suboptimality. Part 2 trains a
logistic regression with 8 workers on the device mesh (8 simulated CPU devices by
default) under several delay models, with Flying Squirrel over an Adam inner optimizer.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import fsq

# --- Part 1: the classic catalogue -------------------------------------------------------

DIM, CONDITION, NOISE, STEPS = 20, 100.0, 0.1, 300
LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
CATALOGUE = {
    "sgd": {},
    "bgd": {"num_microbatches": 4},
    "momentum": {},
    "nesterov": {},
    "adagrad": {},
    "rmsprop": {},
    "adam": {},
}


def quadratic_gap(name: str, learning_rate: float, seed: int) -> float:
    """Final f(w) - f* on 0.5 w'Aw - 1'w with Gaussian gradient noise."""
    curvature = jnp.logspace(0.0, np.log10(CONDITION), DIM)
    optimum = 1.0 / curvature
    tx = fsq.get_optimizer(name, learning_rate=learning_rate, **CATALOGUE[name])

    def gap(w):
        return 0.5 * jnp.sum(curvature * (w - optimum) ** 2)

    def body(carry, key):
        w, state = carry
        grads = curvature * w - 1.0 + NOISE * jax.random.normal(key, (DIM,))
        updates, state = tx.update(grads, state, w)
        return (optax.apply_updates(w, updates), state), None

    calls = STEPS * CATALOGUE[name].get("num_microbatches", 1)
    keys = jax.random.split(jax.random.key(seed), calls)
    w0 = jnp.zeros(DIM)
    (w, _), _ = jax.jit(lambda: jax.lax.scan(body, (w0, tx.init(w0)), keys))()
    return float(gap(w))


def classic_table(seed: int) -> list[dict]:
    rows = []
    for name in tqdm(CATALOGUE, desc="classic catalogue", leave=False):
        gaps = {lr: quadratic_gap(name, lr, seed) for lr in LEARNING_RATES}
        finite = {lr: g for lr, g in gaps.items() if np.isfinite(g)}
        best = min(finite, key=finite.get)
        rows.append({"optimizer": name, "best_learning_rate": best, "final_gap": finite[best]})
    return rows


# --- Part 2: Flying Squirrel on the device mesh -----------------------------------------

WORKERS, BATCH, FEATURES, SQUIRREL_STEPS = 8, 64, 32, 200
DELAYS = {
    "synchronous": fsq.delays.constant(0),
    "uniform(4)": fsq.delays.uniform(4),
    "uniform(16)": fsq.delays.uniform(16),
    "stragglers(16)": fsq.delays.heavy_tailed(16),
}


def logistic_loss(params, shard):
    x, y = shard
    logits = x @ params["w"] + params["b"]
    return jnp.mean(jnp.logaddexp(0.0, logits) - y * logits)


def make_task(seed: int):
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=FEATURES)
    x = rng.normal(size=(SQUIRREL_STEPS, WORKERS, BATCH, FEATURES)).astype(np.float32)
    y = (x @ teacher + 0.5 * rng.normal(size=x.shape[:-1]) > 0).astype(np.float32)
    test_x = rng.normal(size=(4096, FEATURES)).astype(np.float32)
    test_y = (test_x @ teacher > 0).astype(np.float32)
    return (x, y), (test_x, test_y)


def squirrel_table(seed: int) -> list[dict]:
    (x, y), (test_x, test_y) = make_task(seed)
    rows = []
    for label, model in tqdm(DELAYS.items(), desc="flying squirrel", leave=False):
        tx = fsq.flying_squirrel(
            fsq.adam(0.02),
            num_workers=WORKERS,
            axis_name=fsq.parallel.AXIS_NAME,
            delay=model,
            seed=seed,
        )
        dp = fsq.parallel.data_parallel(logistic_loss, tx, num_workers=WORKERS)
        state = dp.init({"w": jnp.zeros(FEATURES), "b": jnp.zeros(())})
        staleness = []
        start = time.perf_counter()
        for t in range(SQUIRREL_STEPS):
            state, losses = dp.step(state, (x[t], y[t]))
            staleness.append(state.opt_state.staleness)
        jax.block_until_ready(state)
        seconds = time.perf_counter() - start
        logits = test_x @ state.params["w"] + state.params["b"]
        rows.append(
            {
                "delay": label,
                "train_loss": float(jnp.mean(losses)),
                "test_accuracy": float(jnp.mean((logits > 0) == test_y)),
                "mean_staleness": float(np.mean(staleness)),
                "steps_per_second": SQUIRREL_STEPS / seconds,
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    columns = list(rows[0])
    cells = [
        [f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows
    ]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def main(out: pathlib.Path, seed: int) -> None:
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}")
    classic = classic_table(seed)
    print(f"\nClassic catalogue: noisy quadratic, condition {CONDITION:g}, {STEPS} steps")
    print(format_table(classic))
    squirrel = squirrel_table(seed)
    print(
        f"\nFlying Squirrel (Adam inner), {WORKERS} workers on {jax.device_count()} devices, "
        f"logistic regression, {SQUIRREL_STEPS} steps"
    )
    print(format_table(squirrel))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo.json"
    path.write_text(json.dumps({"classic": classic, "flying_squirrel": squirrel}, indent=2))
    print(f"\nresults: {path}")
