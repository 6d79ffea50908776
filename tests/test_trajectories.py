"""The recorded trajectories (tests/trajectories.py) replay exactly on the current code.

The recording was made before Flying Squirrel was assembled from pieces; where the pieces
compute the same arithmetic in the same order the runs must match bitwise. The runs whose
arithmetic changed on purpose are listed in ``ROUNDED`` with the reason; they must match
to float32 rounding (1e-6 of the parameters' scale). Each reason was checked by undoing
the change it names (then every run here matched bitwise).
"""

import numpy as np
import pytest

from tests import trajectories

SEGMENT_SUM = (
    "more workers per device than ring rows: their messages are summed by one product with "
    "a one-hot matrix before they enter the ring, instead of added one by one"
)
LOCAL_SUM = (
    "delay 0, several workers per device: their messages are summed by a product with "
    "ones (one pass) instead of XLA's reduction over the leading axis (50x slower on CPU)"
)
PER_PART = (
    "a few workers per device: each part of a message is added into its ring row where it "
    "is computed, without building the message, and XLA contracts its scaling and that "
    "addition into one multiply-add"
)
EMA = (
    "worker momentum is optax.ema, (1 - b) g + b m, whose multiply-adds XLA contracts "
    "differently than b m + (1 - b) g"
)
OVERFLOW_GUARD = (
    "delay compensation selects the uncorrected gradient where the correction overflows, "
    "which changes how XLA fuses (and contracts the multiply-adds of) the combination"
)
ROUNDED: dict[str, tuple[str, ...]] = {
    "sync-defaults-adam": (LOCAL_SUM,),
    "uniform-defaults-momentum": (SEGMENT_SUM,),
    "uniform-plain-adam": (SEGMENT_SUM,),
    "trace-dc-inverse": (SEGMENT_SUM,),
    "bound-wait-defaults": (SEGMENT_SUM,),  # the ring now has max_staleness + 1 rows
    "speeds-load-balance": (SEGMENT_SUM,),
    "topk-ef-dense": (SEGMENT_SUM,),
    "sign-defaults": (SEGMENT_SUM,),
    "non-finite-defaults": (SEGMENT_SUM,),
    "faults-median-momentum": (SEGMENT_SUM, EMA),
    "centered-clip-shard-map": (PER_PART,),  # from step 21: weights 8/7 after the crash
    "geometric-delay-adaptive": (PER_PART,),
    "shard-map-defaults": (PER_PART,),
    "pmap-dc-c": (OVERFLOW_GUARD,),
}


@pytest.fixture(scope="module")
def recorded():
    return np.load(trajectories.PATH)


@pytest.mark.parametrize("name", sorted(trajectories.CONFIGS))
def test_recorded_trajectory_replays(name, recorded):
    path, metrics = trajectories.run(name)
    want = recorded[f"{name}/params"]
    assert not np.allclose(want[-1], want[0])  # the run moves
    if name in ROUNDED:
        np.testing.assert_allclose(path, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    else:
        np.testing.assert_array_equal(path, want)
    for metric, values in metrics.items():
        np.testing.assert_array_equal(values, recorded[f"{name}/{metric}"], err_msg=metric)
