"""The studies users run with fsq: ``python -m experiments [STUDY] [options]``.

With no study, every study of :data:`experiments.studies.STUDIES` runs at the quick scale
(the main job: a few minutes on 2 CPU cores, 8 simulated devices) and the report is
written. ``STUDY`` may also be ``all`` (every study, full scale), one study, ``report``
(rebuild ``report.md`` and the plots of ``--out`` from its ``results.json``) or
``coordination`` (the delay study behind Flying Squirrel's defaults).

The device count must be fixed before JAX starts its backend: this module sets it before
any computation (importing the studies starts nothing; tasks build their data lazily).
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import sys
import time

import jax

from experiments import records, report
from experiments.studies import STUDIES, Settings, coordination


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "study",
        nargs="?",
        choices=["all", *STUDIES, "report", "coordination"],
        help="what to run (default: every study, --quick)",
    )
    p.add_argument("--quick", action="store_true", help="a few-minute version")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # seconds: tests
    p.add_argument("--seeds", type=int, help="number of seeds (default: per study and scale)")
    p.add_argument("--out", type=pathlib.Path, help="output folder (default: runs/STUDY)")
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> pathlib.Path | None:
    """Runs the command line ``argv``; returns the report written (if any)."""
    args_given = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(args_given)
    if args.study == "report" and args.out is None:
        parser().error("report needs --out DIR, the folder of a results.json")
    study = args.study or "all"
    quick = args.quick or args.study is None
    scale = "tiny" if args.tiny else "quick" if quick else "full"
    out = args.out or pathlib.Path("runs") / (study if scale == "full" else f"{study}-{scale}")
    jax.config.update("jax_num_cpu_devices", args.devices)

    if study == "coordination":
        coordination.main(out, quick)
        return None
    if study == "report":
        path = report.write(out)
        print(f"report: {path}")
        return path

    settings = Settings(
        scale=scale,
        seeds=None if args.seeds is None else tuple(range(args.seeds)),
        num_devices=args.devices,
        progress=not args.no_progress,
    )
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; {scale} scale")
    results, seconds = [], {}
    for name in STUDIES if study == "all" else (study,):
        start = time.perf_counter()
        results += STUDIES[name].run(settings)
        seconds[name] = round(time.perf_counter() - start, 1)
        print(f"{name}: {seconds[name]:.0f} s")
    meta = {
        "command": " ".join(["python -m experiments", *map(shlex.quote, args_given)]),
        "scale": scale,
        "devices": args.devices,
        "jax": jax.__version__,
        "wall_seconds": seconds,
    }
    records.write(results, meta, out)
    path = report.write(out)
    print(f"report: {path} (results: {out / records.RESULTS_JSON}, {out / records.RESULTS_CSV})")
    return path


if __name__ == "__main__":
    main()
