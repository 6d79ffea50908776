"""The studies: each a module with ``run(settings) -> records``, registered in :data:`STUDIES`.

A new study is one more module with ``NAME``, ``SIZES``
(one size per scale of :data:`base.SCALES`) and ``run``, and one more line here; the
runner, the records and the report take it from there.
"""

from __future__ import annotations

from collections.abc import Callable

from experiments import records
from experiments.studies import anchors, classic, compression, faults, staleness, workers
from experiments.studies.base import SCALES, Settings

STUDIES: dict[str, Callable[[Settings], list[records.Record]]] = {
    classic.NAME: classic.run,
    staleness.NAME: staleness.run,
    workers.NAME: workers.run,
    anchors.NAME: anchors.run,
    compression.NAME: compression.run,
    faults.NAME: faults.run,
}

__all__ = ["SCALES", "STUDIES", "Settings"]
