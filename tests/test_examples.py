"""Every example script trains on a tiny configuration: its evaluation loss goes down, and
its per-step metrics are written."""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).parents[1] / "examples"
TINY = ["--steps", "40", "--workers", "8", "--max-delay", "4", "--log-every", "20"]


@pytest.mark.parametrize("script", ["nnx_train.py", "linen_train.py"])
def test_example_loss_goes_down(script, tmp_path):
    # A fresh process, where JAX_NUM_CPU_DEVICES takes effect: nnx_train.py then lays its
    # workers out over 8 devices with shard_map.
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *TINY, "--logdir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    match = re.search(r"eval loss ([0-9.]+) -> ([0-9.]+)", result.stdout)
    assert match, result.stdout
    first, last = map(float, match.groups())
    assert last < 0.8 * first, result.stdout
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 1 + 40
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())


def test_the_large_model_example_trains_sharded_worker_groups():
    """examples/large_model.py at its tiny size: 2 worker groups x 4 shards of 8 devices,
    each device holding a quarter of the parameters; the steps run and deliver."""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "large_model.py"), "--tiny", "--steps", "4"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "2 workers x 4 shards on 8 devices" in result.stdout, result.stdout
    assert "(4x less than a copy)" in result.stdout, result.stdout
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", result.stdout)]
    delivered = [int(x) for x in re.findall(r"delivered=(\d+)", result.stdout)]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert sum(delivered) > 0
