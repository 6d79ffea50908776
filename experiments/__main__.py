"""The studies users run with fsq: ``python -m experiments [STUDY] [options]``.

With no study, every study runs at the quick scale (the main job: minutes on 2 CPU
cores; the README says how many) and the report is written. STUDY may also be "all"
(every study, full scale), one study, "report" (rebuild report.md and the plots of --out
from its results.json), "rerun DIR" (run again what DIR's config.json recorded) or
"coordination" (the delay study behind Flying Squirrel's defaults).

Devices: --devices auto (the default) uses the accelerators when there are any, else 8
simulated CPU devices; --devices N uses N (simulated, on a CPU). Several processes (hosts
of a TPU pod, nodes of a cluster) run one study together with --coordinator HOST:PORT
--num-processes N --process-id I on each, or --distributed where jax.distributed finds
them itself (TPU pods, SLURM); only process 0 writes.

Sizes: every study's sizes (steps, batches, seeds, delays, ...) come from its config for
the scale; --set FIELD=VALUE (or STUDY.FIELD=VALUE) overrides one, VALUE a Python
literal. The resolved config is written beside the records (config.json).
"""

from __future__ import annotations

import argparse
import ast
import json
import pathlib
import shlex
import sys
import time
from typing import Any

import jax

from experiments import records, report, training
from experiments.studies import STUDIES, Settings, coordination
from experiments.studies.base import step_bar

CONFIG_JSON = "config.json"
AUTO_CPU_DEVICES = 8  # simulated when no accelerator is found


def summary(name: str) -> str:
    """What study ``name`` measures: its module's first docstring line, after the name."""
    first = (STUDIES[name].module.__doc__ or "").strip().splitlines()[0]
    return first.partition(": ")[2] or first


def studies_help() -> str:
    """One line per study, for ``--help``."""
    lines = [f"  {name:<13} {summary(name)}" for name in STUDIES]
    lines.append(f"  {'coordination':<13} the delay study behind Flying Squirrel's defaults")
    return (
        "studies:\n"
        + "\n".join(lines)
        + (
            "\n\npython -m experiments STUDY --fields [--quick] lists the study's --set fields"
            " with their values"
        )
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments",
        description=__doc__.split("\n\n", 1)[1],
        epilog=studies_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "study",
        nargs="?",
        choices=["all", *STUDIES, "report", "rerun", "coordination"],
        help="what to run (default: every study, --quick)",
    )
    p.add_argument("directory", nargs="?", type=pathlib.Path, help="for rerun: the run's folder")
    p.add_argument("--quick", action="store_true", help="a few-minute version")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # seconds: tests
    p.add_argument("--seeds", type=int, help="number of seeds (default: per study and scale)")
    p.add_argument("--out", type=pathlib.Path, help="output folder (default: runs/STUDY)")
    p.add_argument(
        "--devices",
        default="auto",
        help="auto (accelerators, else 8 simulated CPU devices) or a number",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a size of the studies' config (repeatable), e.g. --set seeds=3",
    )
    p.add_argument("--coordinator", metavar="HOST:PORT", help="multi-process: process 0's address")
    p.add_argument("--num-processes", type=int, help="multi-process: how many")
    p.add_argument("--process-id", type=int, help="multi-process: this one's index")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="multi-process, found by jax.distributed.initialize() (TPU pods, SLURM)",
    )
    p.add_argument(
        "--exchange",
        choices=["dense", "ordered"],
        default="dense",
        help="how workers' messages are summed: dense (an all-reduce) or ordered (in worker "
        "order: records bit for bit the same over any split of the devices into processes)",
    )
    p.add_argument(
        "--model-shards",
        type=int,
        default=1,
        metavar="S",
        help="devices each worker's model is sharded over (a model axis 'fsdp' of the mesh; "
        "the same numbers, to float32 rounding, with 1/S of each model's state per device)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--fields",
        action="store_true",
        help="list the study's --set fields and their values at the scale, and exit",
    )
    return p


def print_fields(studies: list[str], scale: str) -> None:
    """The ``--set`` fields of ``studies`` with their values at ``scale``."""
    for name in studies:
        print(f"{name} ({scale} scale): --set {name}.FIELD=VALUE, or FIELD=VALUE")
        for field, value in STUDIES[name].sizes[scale]._asdict().items():
            print(f"  {field} = {value!r}")


def start_devices(args: argparse.Namespace) -> tuple[int, str]:
    """Joins the processes, fixes the devices before JAX's backend starts; how many the
    studies use (over every process), and a line that says which."""
    if args.devices != "auto" and not (args.devices.isdigit() and int(args.devices) >= 1):
        raise SystemExit(f"--devices must be auto or a positive integer, got {args.devices!r}")
    jax.config.update(
        "jax_num_cpu_devices", AUTO_CPU_DEVICES if args.devices == "auto" else int(args.devices)
    )
    if args.coordinator is not None:
        if args.num_processes is None or args.process_id is None:
            raise SystemExit("--coordinator needs --num-processes and --process-id")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.distributed:
        jax.distributed.initialize()
    platform = jax.default_backend()
    if platform != "cpu" and args.devices != "auto" and int(args.devices) > jax.device_count():
        raise SystemExit(f"--devices {args.devices}: only {jax.device_count()} {platform} devices")
    count = jax.device_count() if args.devices == "auto" or platform == "cpu" else int(args.devices)
    kind = jax.devices()[0].device_kind
    where = "simulated" + ("; no accelerator found" if args.devices == "auto" else "")
    processes = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return (
        count,
        f"devices: {count} x {platform} ({where if platform == 'cpu' else kind}){processes}",
    )


def parse_overrides(items: list[str], studies: list[str]) -> dict[str, dict[str, Any]]:
    """``--set`` items as ``{study: {field: value}}`` for the studies that have the field."""
    out: dict[str, dict[str, Any]] = {name: {} for name in studies}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes FIELD=VALUE or STUDY.FIELD=VALUE, got {item!r}")
        study, _, field = key.rpartition(".")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word: a string
        targets = [study] if study else studies
        hits = [s for s in targets if s in out and field in STUDIES[s].sizes["full"]._fields]
        if not hits:
            fields = {s: STUDIES[s].sizes["full"]._fields for s in targets if s in STUDIES}
            raise SystemExit(
                f"--set {item}: no study run here has the field {field!r} ({fields}; "
                "python -m experiments STUDY --fields lists them with their values)"
            )
        for s in hits:
            out[s][field] = value
    return out


def resolved_sizes(
    scale: str, studies: list[str], overrides: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    return {s: STUDIES[s].sizes[scale]._replace(**overrides.get(s, {})) for s in studies}


def write_config(out: pathlib.Path, config: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    encoded = {**config, "sizes": {s: repr(size) for s, size in config["sizes"].items()}}
    (out / CONFIG_JSON).write_text(json.dumps(encoded, indent=1) + "\n")


def read_config(folder: pathlib.Path) -> dict[str, Any]:
    """A run's config, its sizes rebuilt from their ``repr`` by the study's own classes."""
    path = folder / CONFIG_JSON
    if not path.exists():
        raise SystemExit(f"{path} not found: rerun needs a folder written by this runner")
    config = json.loads(path.read_text())
    config["sizes"] = {
        s: eval(text, {"__builtins__": {}}, STUDIES[s].namespace())  # noqa: S307
        for s, text in config["sizes"].items()
    }
    return config


def headline(name: str, rows: list[records.Record]) -> None:
    """Prints the tables of a study's report section, as its results arrive."""
    for line in STUDIES[name].section(rows):
        if line.startswith(("|", "**")):
            print(line)


def main(argv: list[str] | None = None) -> pathlib.Path | None:
    """Runs the command line ``argv``; returns the report written (if any)."""
    args_given = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(args_given)
    if args.study == "report" and args.out is None:
        parser().error("report needs --out DIR, the folder of a results.json")
    if (args.study == "rerun") != (args.directory is not None):
        parser().error("rerun takes the folder of a run (and only rerun takes a folder)")
    if args.study == "rerun":
        config = read_config(args.directory)
        args.devices = str(config["devices_arg"])
        args.exchange = config.get("exchange", "dense")
        args.model_shards = config.get("model_shards", 1)
    if args.model_shards < 1:
        parser().error(f"--model-shards must be at least 1, got {args.model_shards}")
    if args.fields:
        if args.study not in (None, "all", *STUDIES):
            parser().error(f"--fields lists a study's fields; {args.study} has none")
        quick = args.quick or args.study is None
        print_fields(
            [args.study] if args.study in STUDIES else list(STUDIES),
            "tiny" if args.tiny else "quick" if quick else "full",
        )
        return None
    training.EXCHANGE.set(args.exchange)
    training.MODEL_SHARDS.set(args.model_shards)
    num_devices, first_line = start_devices(args)
    writer = jax.process_index() == 0

    if args.study == "coordination":
        coordination.main(args.out or pathlib.Path("runs/coordination"), args.quick)
        return None
    if args.study == "report":
        path = report.write(args.out)
        print(f"report: {path}")
        return path

    if args.study == "rerun":
        scale, studies, sizes = config["scale"], list(config["sizes"]), config["sizes"]
        seeds = None if config["seeds"] is None else tuple(config["seeds"])
        out = args.out or args.directory.with_name(args.directory.name + "-rerun")
        command = config["command"]
        rerun = " ".join(["python -m experiments", *map(shlex.quote, args_given)])
    else:
        study = args.study or "all"
        quick = args.quick or args.study is None
        scale = "tiny" if args.tiny else "quick" if quick else "full"
        studies = list(STUDIES) if study == "all" else [study]
        sizes = resolved_sizes(scale, studies, parse_overrides(args.overrides, studies))
        seeds = None if args.seeds is None else tuple(range(args.seeds))
        out = args.out or pathlib.Path("runs") / (study if scale == "full" else f"{study}-{scale}")
        command = " ".join(["python -m experiments", *map(shlex.quote, args_given)])
        rerun = None

    settings = Settings(
        scale=scale,
        seeds=seeds,
        num_devices=num_devices,
        progress=not args.no_progress and writer,
        sizes=sizes,
    )
    print(f"{first_line}; {scale} scale", flush=True)
    config = {
        "command": command,
        "scale": scale,
        "seeds": None if seeds is None else list(seeds),
        "devices_arg": args.devices,
        "exchange": args.exchange,
        "model_shards": args.model_shards,
        "sizes": sizes,
    }
    if writer:
        write_config(out, config)
    results, seconds = [], {}
    for name in studies:
        start = time.perf_counter()
        with step_bar(name, settings.progress):
            rows = STUDIES[name].run(settings)
        seconds[name] = round(time.perf_counter() - start, 1)
        results += rows
        if writer:
            print(f"{name}: {seconds[name]:.0f} s")
            headline(name, rows)
    if not writer:
        return None
    meta = {
        "command": command,
        "scale": scale,
        "devices": settings.num_devices,
        "platform": jax.default_backend(),
        "processes": jax.process_count(),
        "exchange": args.exchange,
        "model_shards": args.model_shards,
        "jax": jax.__version__,
        "wall_seconds": seconds,
        **({"rerun": rerun} if rerun else {}),
    }
    records.write(results, meta, out)
    records.write_curves(results, out)
    path = report.write(out)
    print(f"report: {path} (results: {out / records.RESULTS_JSON}, {out / records.RESULTS_CSV})")
    print(f"curves: tensorboard --logdir {out / records.CURVES}")
    return path


def cli() -> None:
    """The ``fsq-experiments`` console script."""
    main()


if __name__ == "__main__":
    cli()
