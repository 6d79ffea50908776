"""Markdown tables of the saved benchmark results, for docs/performance.md.

Run: ``python -m benchmarks.report`` (reads ``benchmarks/results/*.json``).
"""

from __future__ import annotations

import json
import pathlib

RESULTS = pathlib.Path(__file__).parent / "results"


def markdown(rows: list[dict]) -> str:
    columns = list(rows[0])

    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    for path in sorted(RESULTS.glob("*.json")):
        payload = json.loads(path.read_text())
        print(f"### {path.stem} ({payload['device']}, jax {payload['jax']})\n")
        print(markdown(payload["rows"]) + "\n")


if __name__ == "__main__":
    main()
