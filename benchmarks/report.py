"""Markdown tables of the saved benchmark results, for docs/performance.md.

Run: ``python -m benchmarks.report`` (reads ``benchmarks/results/*.json``).
"""

from __future__ import annotations

import json
import pathlib

from tabulate import tabulate

RESULTS = pathlib.Path(__file__).parent / "results"


def main() -> None:
    for path in sorted(RESULTS.glob("*.json")):
        payload = json.loads(path.read_text())
        print(f"### {path.stem} ({payload['device']}, jax {payload['jax']})\n")
        rows = payload["rows"]
        print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".4g") + "\n")


if __name__ == "__main__":
    main()
