"""fsq.checkpoint: a resumed run continues bitwise; bad checkpoints fail loudly and locally."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fsq

SCRIPT = pathlib.Path(__file__).with_name("resume_script.py")
AXIS = fsq.parallel.AXIS_NAME


def run_script(mode, directory):
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    subprocess.run([sys.executable, str(SCRIPT), mode, str(directory)], check=True, env=env)
    with np.load(directory / f"{mode}.npz") as data:
        return [data[k] for k in sorted(data.files, key=lambda k: int(k.split("_")[1]))]


def test_resume_in_a_fresh_process_continues_bitwise(tmp_path):
    whole = run_script("whole", tmp_path)
    run_script("first", tmp_path)  # asserts gradients are in flight when it saves
    resumed = run_script("second", tmp_path)
    assert len(resumed) == len(whole)
    for got, want in zip(resumed, whole, strict=True):
        np.testing.assert_array_equal(got, want)


def state(scale=1.0):
    return {"w": scale * jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(4)}


def test_damaged_checkpoint_raises_and_leaves_the_previous_one_readable(tmp_path):
    fsq.checkpoint.save(tmp_path, 1, state(1.0))
    fsq.checkpoint.save(tmp_path, 2, state(2.0))
    for path in (tmp_path / "2").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="checkpoint 2 .* unreadable"):
        fsq.checkpoint.restore(tmp_path, state())
    restored = fsq.checkpoint.restore(tmp_path, state(), step=1)
    np.testing.assert_array_equal(restored["w"], np.arange(6.0).reshape(2, 3))


def flip_bytes_in_the_middle(path, count=16):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_the_data_raise_instead_of_restoring_wrong_values(tmp_path):
    """The array files hold raw bytes: without a checksum a flipped byte restores wrong
    values silently. The checksums saved beside them catch it, naming the leaf."""
    big = {"w": jnp.arange(20000.0), "b": jnp.ones(5, jnp.bfloat16), "step": jnp.int32(3)}
    fsq.checkpoint.save(tmp_path, 1, big)
    fsq.checkpoint.save(tmp_path, 2, jax.tree.map(lambda x: 2 * x, big))
    data = max((p for p in (tmp_path / "2").rglob("*") if p.is_file()), key=os.path.getsize)
    flip_bytes_in_the_middle(data)
    with pytest.raises(ValueError, match="checkpoint 2 .* is damaged: the data of w"):
        fsq.checkpoint.restore(tmp_path, big)
    restored = fsq.checkpoint.restore(tmp_path, big, step=1)
    jax.tree.map(np.testing.assert_array_equal, restored, big)


def test_a_checkpoint_whose_deletion_was_interrupted_says_unreadable(tmp_path):
    """orbax deletes an old checkpoint in place: cut short, it stays listed, its metadata
    gone; restoring it says so instead of naming every leaf missing."""
    fsq.checkpoint.save(tmp_path, 1, state(1.0))
    fsq.checkpoint.save(tmp_path, 2, state(2.0))
    (metadata,) = (tmp_path / "1").rglob("_METADATA")
    metadata.unlink()
    assert fsq.checkpoint.all_steps(tmp_path) == [1, 2]
    with pytest.raises(ValueError, match="checkpoint 1 .* is unreadable: its metadata"):
        fsq.checkpoint.restore(tmp_path, state(), step=1)
    np.testing.assert_array_equal(fsq.checkpoint.restore(tmp_path, state())["w"], 2 * state()["w"])


@pytest.mark.parametrize(
    "like, match",
    [
        ({"w": jnp.zeros((3, 2)), "step": jnp.int32(0)}, r"w is \(2, 3\) float32"),
        ({"w": jnp.zeros((2, 3), jnp.int32), "step": jnp.int32(0)}, "w is"),
        ({"w": jnp.zeros((2, 3))}, r"unexpected \['step'\]"),
        ({"w": jnp.zeros((2, 3)), "step": jnp.int32(0), "b": jnp.zeros(2)}, r"missing \['b'\]"),
    ],
)
def test_mismatched_state_raises(tmp_path, like, match):
    fsq.checkpoint.save(tmp_path, 0, state())
    with pytest.raises(ValueError, match=match):
        fsq.checkpoint.restore(tmp_path, like)


def test_missing_checkpoints_and_reused_steps_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fsq.checkpoint.restore(tmp_path / "nothing", state())
    fsq.checkpoint.save(tmp_path, 3, state())
    with pytest.raises(FileNotFoundError, match="no checkpoint 4"):
        fsq.checkpoint.restore(tmp_path, state(), step=4)
    with pytest.raises(ValueError, match="already exists"):
        fsq.checkpoint.save(tmp_path, 3, state())
    with pytest.raises(ValueError, match="max_to_keep"):
        fsq.checkpoint.save(tmp_path, 5, state(), max_to_keep=0)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for step in range(5):
        fsq.checkpoint.save(tmp_path, step, state(float(step)), max_to_keep=2)
    assert fsq.checkpoint.all_steps(tmp_path) == [3, 4]
    np.testing.assert_array_equal(
        fsq.checkpoint.restore(tmp_path, state())["w"], 4 * np.arange(6.0).reshape(2, 3)
    )


def test_a_synchronous_state_with_empty_buffers_round_trips(tmp_path):
    # Without delays the in-flight buffer has zero-size arrays, which orbax cannot save.
    tx = fsq.flying_squirrel(fsq.adam(0.1), num_workers=8, axis_name=fsq.parallel.AXIS_NAME)
    dp = fsq.parallel.data_parallel(lambda w, b: jnp.sum((w - b) ** 2), tx, num_workers=8)
    state = dp.init(jnp.zeros(3))
    state, _ = dp.step(state, jnp.ones((8, 3)))
    assert any(x.size == 0 for x in jax.tree.leaves(state))
    fsq.checkpoint.save(tmp_path, 1, state)
    restored = fsq.checkpoint.restore(tmp_path, dp.init(jnp.zeros(3)))
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.shape == want.shape


def test_a_checkpoint_of_another_largest_delay_names_the_likely_cause(tmp_path):
    def trained_state(max_delay):
        tx = fsq.flying_squirrel(
            fsq.sgd(0.1), num_workers=8, delay=fsq.delays.uniform(max_delay), axis_name=AXIS
        )
        dp = fsq.parallel.data_parallel(lambda w, x: jnp.sum((w - x) ** 2), tx, num_workers=8)
        return dp.init(jnp.zeros(3))

    fsq.checkpoint.save(tmp_path, 0, trained_state(4))
    with pytest.raises(ValueError, match=r"in_flight.* another largest delay"):
        fsq.checkpoint.restore(tmp_path, trained_state(8))
