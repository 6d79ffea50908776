"""The recorded trajectories (tests/trajectories.py) replay on the current code.

Against the recording made before Flying Squirrel was assembled from pieces, on another
machine, every run must match to float32 rounding (1e-6 of the parameters' scale) and
every metric exactly. On the recording machine 8 of the runs matched it bitwise; the
others changed their arithmetic on purpose, each reason checked there by undoing the
change it names: more workers per device than ring rows summed by one one-hot product;
delay 0 with several workers per device summed by a product with ones; a few workers per
device adding each part of a message into its ring row (one multiply-add); worker
momentum as ``optax.ema``; delay compensation's overflow guard. On any other CPU, XLA's
code for the host's vector units rounds the same programs differently (up to 3e-7 here).

When messages in flight took each parameter's shape (so that they shard like the
parameters) instead of one flat row, every run still matched the original recording, and
four runs of each machine recording changed their last bits, re-recorded: distances over
every coordinate summed leaf by leaf (median with mixing; centered clipping); the scaled
sign's mean, a reduction over the shaped leaf; with delay 0, a device's workers summed by
a product over each shaped leaf (optimized code); and a trimmed mean with delay
compensation, from step 29 on, from XLA's fusions of the per-leaf arrays (reducing the
votes flattened, as before, rounds the same: not the rule).

When a device's workers that share a ring row came to send one gradient of their summed
losses (:func:`fsq.parallel.sums_workers`), the two delay-0 runs with several workers per
device (sync-sgd, sync-defaults-adam) changed their last bits on both machine recordings
(at most 1.5e-7), re-recorded: the sum is formed inside the backward pass's product over
every example instead of worker by worker. Every other run replayed bitwise, and these two
still match the original recording to rounding.

Against the recording of a machine that rounds as this one does (same
:func:`tests.trajectories.fingerprint`), every run must match bitwise: the numbers a
refactor must not move. ``python -m tests.trajectories`` records one for a new machine.
The suite compiles without LLVM's optimizations (:mod:`tests._compile`), which rounds
differently from optimized code: each has its own recording here, the optimized one
checked with ``XLA_FLAGS=--xla_backend_optimization_level=3``.
"""

import numpy as np
import pytest

from tests import trajectories

RECORDINGS = {
    "original": trajectories.PATH,
    "this machine": trajectories.this_machine(),
}


@pytest.fixture(scope="module")
def recorded():
    return {k: np.load(p) for k, p in RECORDINGS.items() if p.exists()}


@pytest.fixture(scope="module")
def replayed():
    return {}


def replay(name, replayed):
    if name not in replayed:
        replayed[name] = trajectories.run(name)
    return replayed[name]


@pytest.mark.parametrize("name", sorted(trajectories.CONFIGS))
def test_recorded_trajectory_replays_to_rounding(name, recorded, replayed):
    path, metrics = replay(name, replayed)
    want = recorded["original"][f"{name}/params"]
    assert not np.allclose(want[-1], want[0])  # the run moves
    np.testing.assert_allclose(path, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    for metric, values in metrics.items():
        np.testing.assert_array_equal(values, recorded["original"][f"{name}/{metric}"], metric)


@pytest.mark.parametrize("name", sorted(trajectories.CONFIGS))
def test_this_machines_recorded_trajectory_replays_bitwise(name, recorded, replayed):
    if "this machine" not in recorded:
        pytest.skip(f"no recording for this machine's rounding ({RECORDINGS['this machine']})")
    path, metrics = replay(name, replayed)
    np.testing.assert_array_equal(path, recorded["this machine"][f"{name}/params"])
    for metric, values in metrics.items():
        np.testing.assert_array_equal(values, recorded["this machine"][f"{name}/{metric}"])
