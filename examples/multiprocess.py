"""Flying Squirrel over several processes: the multi-host (TPU pod) path, on one machine.

``python examples/multiprocess.py --processes 2 --local-devices 4`` starts 2 processes with
4 CPU devices each on localhost, joined by ``jax.distributed``; they train one model with
8 workers, each process feeding only its own workers' data, and process 0 prints (and
with ``--out``, saves) the final parameters. ``--processes 1 --local-devices 8`` runs the
same job in one process: the parameters agree. With ``--model-shards 2`` each worker
group is 2 devices, its model sharded over them (a mesh axis ``"fsdp"``); with
``--exchange ordered`` the workers' messages are added in worker order, and the processes
deliver bit for bit what one process delivers.

On a TPU pod, run the training part once per host with ``jax.distributed.initialize()``
and no arguments (the TPU runtime supplies the coordinator); nothing else changes:
:func:`fsq.parallel.make_mesh` spans the global devices and ``dp.put_batch`` builds the
global batch from each host's share.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(args: argparse.Namespace) -> None:
    """One process of the job: join it, build the global mesh, train, report."""
    import jax

    jax.config.update("jax_num_cpu_devices", args.local_devices)
    if args.processes > 1:
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.processes,
            process_id=args.process_id,
        )
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils

    import fsq

    workers = args.processes * args.local_devices

    def loss(params, batch):
        hidden = jnp.tanh(batch["x"] @ params["w1"])
        return jnp.mean((hidden @ params["w2"] - batch["y"]) ** 2)

    tx = fsq.flying_squirrel(
        fsq.adam(0.02),
        num_workers=workers,
        delay=fsq.delays.uniform(3),
        axis_name=fsq.parallel.AXIS_NAME,
        exchange=args.exchange,
        seed=args.seed,
    )
    shards = {"fsdp": args.model_shards} if args.model_shards > 1 else None
    mesh = fsq.parallel.make_mesh(model_axes=shards)  # the global mesh
    dp = fsq.parallel.data_parallel(loss, tx, num_workers=workers, mesh=mesh)
    rng = np.random.default_rng(args.seed)
    state = dp.init({"w1": rng.normal(size=(6, 16)) / 3, "w2": rng.normal(size=16) / 4})
    target = rng.normal(size=6)
    rows = list(dp.local_workers)
    for step in range(args.steps):
        # Every worker's data is a pure function of (step, worker); a process makes its own.
        x = np.random.default_rng([args.seed, step]).normal(size=(workers, 32, 6))
        batch = {"x": x[rows], "y": np.sin(x @ target)[rows]}
        state, losses = dp.step(state, dp.put_batch(batch))
    # Every process gathers the parameters whole (sharded, each holds only its shards).
    params = jax.tree.map(np.asarray, multihost_utils.process_allgather(state.params, tiled=True))
    if jax.process_index() == 0:
        print(f"processes {args.processes} x devices {args.local_devices}: final loss ", end="")
        print(f"{float(np.asarray(losses.addressable_data(0)).mean()):.6f}")
        if args.out:
            np.savez(args.out, **params)


def launch(args: argparse.Namespace) -> None:
    """Starts ``args.processes`` copies of this script on free localhost ports, and waits."""
    port = free_port()
    commands = [
        [sys.executable, __file__, *sys.argv[1:], f"--process-id={i}", f"--port={port}"]
        for i in range(args.processes)
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    processes = [subprocess.Popen(c, env=env) for c in commands]
    try:
        codes = [p.wait(timeout=args.timeout) for p in processes]
    finally:  # never leave a process behind, whatever happened
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(codes):
        raise SystemExit(f"a process failed: exit codes {codes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--local-devices", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-shards", type=int, default=1, help="devices per worker group")
    parser.add_argument("--exchange", default="dense", choices=["dense", "ordered"])
    parser.add_argument("--out", help="where process 0 saves the final parameters (.npz)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds, per process")
    parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.processes > 1 and args.process_id is None:
        launch(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
