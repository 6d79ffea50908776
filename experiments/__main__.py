"""Entry point: ``python -m experiments [--devices N] [--seed S] [--out DIR]``.

The device count must be fixed before JAX starts its backend, so this module sets it
first and imports the studies afterwards.
"""

import argparse
import pathlib

import jax


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
    parser.add_argument(
        "study", nargs="?", default="demo", choices=["demo", "coordination"], help="what to run"
    )
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--quick", action="store_true", help="a few-minute version")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs"))
    args = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", args.devices)

    if args.study == "coordination":
        from experiments import coordination

        coordination.main(args.out, args.quick)
    else:
        from experiments import demo

        demo.main(args.out, args.seed)


if __name__ == "__main__":
    main()
