"""The studies, registered in :data:`STUDIES`: what each runs, and how the report shows it.

A new study is one more module with ``NAME``, ``SIZES`` (one size per scale of
:data:`base.SCALES`: a NamedTuple, its config, which ``run`` reads through
``settings.size(NAME, SIZES)`` so that ``--set`` can override it),
``run(settings) -> records``, ``section(records) -> lines`` of its part of the report, and
optionally ``plot(records, folder)``, and one more line here; the runner, the records and
the report take it from there.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

from experiments import records
from experiments.studies import (
    anchors,
    classic,
    compression,
    faults,
    local,
    protocols,
    staleness,
    wallclock,
    workers,
)
from experiments.studies.base import SCALES, Settings


class Study(NamedTuple):
    """A study: how to run it, its config per scale, and its part of the report."""

    run: Callable[[Settings], list[records.Record]]
    section: Callable[[list[records.Record]], list[str]]
    sizes: dict[str, Any]  # scale -> the study's Size (its config)
    module: ModuleType
    plot: Callable[[list[records.Record], pathlib.Path], None] | None = None
    in_bytes_plot: bool = True  # its runs join the report's bytes-against-metric plot

    def namespace(self) -> dict[str, Any]:
        """The names a config's ``repr`` is rebuilt with (its Size classes)."""
        return vars(self.module)


STUDIES: dict[str, Study] = {
    module.NAME: Study(
        module.run,
        module.section,
        module.SIZES,
        module,
        getattr(module, "plot", None),
        getattr(module, "IN_BYTES_PLOT", True),
    )
    for module in (
        classic,
        staleness,
        workers,
        wallclock,
        anchors,
        compression,
        faults,
        local,
        protocols,
    )
}

__all__ = ["SCALES", "STUDIES", "Settings", "Study"]
