"""The recorded trajectories (tests/trajectories.py) replay exactly on the current code.

The recording was made before Flying Squirrel was assembled from pieces; where the pieces
compute the same arithmetic in the same order the runs must match bitwise. Exceptions
are listed with their reason in ``TOLERANCES``.
"""

import numpy as np
import pytest

from tests import trajectories

# name: relative tolerance of the parameters, and why the arithmetic changed.
TOLERANCES: dict[str, tuple[float, str]] = {}


@pytest.fixture(scope="module")
def recorded():
    return np.load(trajectories.PATH)


@pytest.mark.parametrize("name", sorted(trajectories.CONFIGS))
def test_recorded_trajectory_replays(name, recorded):
    path, metrics = trajectories.run(name)
    want = recorded[f"{name}/params"]
    assert not np.allclose(want[-1], want[0])  # the run moves
    rtol, _ = TOLERANCES.get(name, (0.0, ""))
    if rtol:
        np.testing.assert_allclose(path, want, rtol=rtol, atol=rtol)
    else:
        np.testing.assert_array_equal(path, want)
    for metric, values in metrics.items():
        np.testing.assert_array_equal(values, recorded[f"{name}/{metric}"], err_msg=metric)
