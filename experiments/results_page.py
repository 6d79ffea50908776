"""The generated blocks of ``docs/results.md``: tables rebuilt from the checked-in records.

Each block sits between ``<!-- begin generated: NAME -->`` and ``<!-- end generated:
NAME -->``; the prose around it is written by hand. After rerunning a study into
``docs/``, ``python -m experiments.results_page`` rewrites the blocks (and the figure
drawn from the same records); ``tests/test_experiments.py`` checks that the page agrees
with the records, so a table can never show an earlier run.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Callable

from experiments.studies import coordination

DOCS = pathlib.Path(__file__).parents[1] / "docs"
PAGE = DOCS / "results.md"


def _coordination() -> str:
    return coordination.table(json.loads((DOCS / "coordination.json").read_text())).strip()


BLOCKS: dict[str, Callable[[], str]] = {"coordination": _coordination}


def render(text: str) -> str:
    """``text`` with every generated block rebuilt from the records."""
    for name, build in BLOCKS.items():
        begin, end = f"<!-- begin generated: {name} -->", f"<!-- end generated: {name} -->"
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), flags=re.DOTALL)
        if not pattern.search(text):
            raise ValueError(f"{PAGE} has no generated block {name!r}")
        block = f"{begin}\n\n{build()}\n\n{end}"
        text = pattern.sub(lambda _, block=block: block, text)
    return text


def main() -> None:
    PAGE.write_text(render(PAGE.read_text()))
    coordination.plot(
        json.loads((DOCS / "coordination.json").read_text()), DOCS / "coordination.png"
    )
    print(f"rewrote {PAGE} and {DOCS / 'coordination.png'}")


if __name__ == "__main__":
    main()
