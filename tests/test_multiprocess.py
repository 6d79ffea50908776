"""2 processes x 4 devices (jax.distributed on localhost) train like 1 process x 8 devices."""

import os
import pathlib
import subprocess
import sys

import numpy as np

SCRIPT = pathlib.Path(__file__).parents[1] / "examples" / "multiprocess.py"


def final_params(tmp_path, processes, local_devices, *options):
    out = tmp_path / f"{processes}x{local_devices}{''.join(options)}.npz"
    command = [sys.executable, str(SCRIPT), f"--processes={processes}", *options]
    command += [f"--local-devices={local_devices}", "--steps=8", f"--out={out}", "--timeout=240"]
    # The launcher starts the processes on free ports and kills them whatever happens.
    subprocess.run(command, check=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


def test_two_processes_equal_one_process(tmp_path):
    two = final_params(tmp_path, 2, 4)
    one = final_params(tmp_path, 1, 8)
    assert two.keys() == one.keys() == {"w1", "w2"}
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-6, atol=1e-6)
    # The run moved the parameters (a trivial agreement would prove nothing).
    rng = np.random.default_rng(0)
    assert not np.allclose(one["w1"], rng.normal(size=(6, 16)) / 3, atol=1e-3)


def test_two_processes_of_sharded_worker_groups_equal_one_process_bitwise(tmp_path):
    """2 processes x (2 groups x 2 shards) against 1 process x (4 groups x 2 shards): with
    the workers' messages added in worker order, the same bits."""
    options = ("--model-shards=2", "--exchange=ordered")
    two = final_params(tmp_path, 2, 4, *options)
    one = final_params(tmp_path, 1, 8, *options)
    assert two.keys() == one.keys() == {"w1", "w2"}
    for name in one:
        np.testing.assert_array_equal(two[name], one[name])
    dense = final_params(tmp_path, 1, 8, "--model-shards=2")
    np.testing.assert_allclose(dense["w1"], one["w1"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(one["w1"], np.random.default_rng(0).normal(size=(6, 16)) / 3)
