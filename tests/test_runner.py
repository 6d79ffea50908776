"""The studies' runner on real layouts: any device count, several processes, overrides
recorded and rerun, and the console script from any directory."""

import contextlib
import csv
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from experiments.__main__ import main

TINY = ["classic", "--tiny", "--no-progress"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def run(args, cwd=None, timeout=300):
    """``python -m experiments ARGS`` in a fresh process (its own device count)."""
    command = [sys.executable, "-m", "experiments", *args]
    result = subprocess.run(
        command, capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def records_of(folder):
    payload = json.loads((pathlib.Path(folder) / "results.json").read_text())
    return payload["meta"], payload["records"]


def assert_same_records(got, want, rtol=0.0):
    """Equal records (up to ``rtol`` on numbers), their wall times aside."""
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key == "wall_seconds":
                continue
            if rtol and isinstance(a[key], float | list) and key != "hyperparameters":
                np.testing.assert_allclose(
                    np.asarray(a[key], float), np.asarray(b[key], float), rtol=rtol
                )
            else:
                assert a[key] == b[key], key


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    out = tmp_path_factory.mktemp("eight")
    stdout = run([*TINY, "--devices", "8", "--out", str(out)])
    return out, stdout


@pytest.fixture(scope="module")
def eight_ordered(tmp_path_factory):
    out = tmp_path_factory.mktemp("eight_ordered")
    run([*TINY, "--devices", "8", "--exchange", "ordered", "--out", str(out)])
    return out


@pytest.mark.parametrize("devices", [1, 4])
def test_any_device_count_gives_the_records_of_eight(devices, eight, tmp_path):
    stdout = run([*TINY, "--devices", str(devices), "--out", str(tmp_path)])
    assert stdout.splitlines()[0] == f"devices: {devices} x cpu (simulated); tiny scale"
    meta, got = records_of(tmp_path)
    assert meta["devices"] == devices and meta["processes"] == 1
    # The same workers and draws on fewer devices: the same runs up to float32 rounding
    # (the devices' sums associate differently).
    assert_same_records(got, records_of(eight[0])[1], rtol=1e-5)


def test_sharded_models_give_the_records_of_replicated_ones(eight, tmp_path):
    """--model-shards 2: each worker group 2 devices, the models sharded over them; the
    same runs to float32 rounding, and the setting recorded for rerun."""
    run([*TINY, "--devices", "8", "--model-shards", "2", "--out", str(tmp_path)])
    meta, got = records_of(tmp_path)
    assert meta["model_shards"] == 2
    assert json.loads((tmp_path / "config.json").read_text())["model_shards"] == 2
    assert_same_records(got, records_of(eight[0])[1], rtol=1e-5)


def test_auto_says_it_simulates_eight_devices_without_an_accelerator(tmp_path):
    stdout = run([*TINY, "--out", str(tmp_path)])
    assert stdout.splitlines()[0] == (
        "devices: 8 x cpu (simulated; no accelerator found); tiny scale"
    )
    assert records_of(tmp_path)[0]["devices"] == 8


def free_port():
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("exchange", ["ordered", "dense"])
def test_two_processes_of_four_devices_give_the_records_of_one_of_eight(
    exchange, eight, eight_ordered, tmp_path
):
    out, port = tmp_path / "two", free_port()
    common = [*TINY, "--devices", "4", "--out", str(out), "--coordinator", f"127.0.0.1:{port}"]
    common += ["--exchange", exchange]
    commands = [
        [
            sys.executable,
            "-m",
            "experiments",
            *common,
            "--num-processes",
            "2",
            "--process-id",
            str(i),
        ]
        for i in range(2)
    ]
    processes = [
        subprocess.Popen(c, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    try:
        outputs = [p.communicate(timeout=300) for p in processes]
    finally:  # never leave a process behind
        for p in processes:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in processes] == [0, 0], [e[-2000:] for _, e in outputs]
    assert outputs[0][0].splitlines()[0] == "devices: 8 x cpu (simulated), 2 processes; tiny scale"
    assert "report:" in outputs[0][0] and "report:" not in outputs[1][0]  # process 0 writes
    meta, got = records_of(out)
    assert meta["processes"] == 2 and meta["devices"] == 8 and meta["exchange"] == exchange
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in eight[0].iterdir())
    if exchange == "ordered":  # the workers' sums added in worker order: bit for bit
        assert_same_records(got, records_of(eight_ordered)[1])
        return
    # The all-reduce across processes sums in another order than within one: equal up to
    # float32 rounding, and not bitwise (what the ordered exchange is for).
    want = records_of(eight[0])[1]
    assert_same_records(got, want, rtol=1e-5)
    assert got != [{**w, "wall_seconds": g["wall_seconds"]} for g, w in zip(got, want, strict=True)]


def test_an_override_changes_the_run_is_recorded_and_rerun_reproduces_it(tmp_path):
    out = tmp_path / "run"
    overrides = ["--set", "delays=(0, 3)", "--set", "seeds=2", "--exchange", "ordered"]
    main([*TINY, "--devices", "8", "--out", str(out), *overrides])
    config = json.loads((out / "config.json").read_text())
    assert config["exchange"] == "ordered"
    assert "delays=(0, 3)" in config["sizes"]["classic"] and "seeds=2" in config["sizes"]["classic"]
    _, rows = records_of(out)
    assert {r["delay"] for r in rows} == {"none", "uniform(3)"}  # not the tiny scale's 2
    assert {r["seed"] for r in rows} == {0, 1}
    # Every run's curve is written as per-step metrics (CSV beside the TensorBoard events).
    for row in rows:
        folder = out / "curves" / "classic" / "quadratic" / row["method"] / "20_steps"
        with (folder / "metrics.csv").open() as f:
            table = list(csv.DictReader(f))
        tag = f"{row['delay']}/lr={row['hyperparameters']['learning_rate']}/seed={row['seed']}"
        assert [float(t[tag]) for t in table] == pytest.approx(row["curve"], rel=1e-7)
        assert [int(t["step"]) for t in table] == list(range(1, 21))
        assert any(p.name.startswith("events.out.tfevents") for p in folder.iterdir())
    main(["rerun", str(out), "--no-progress"])
    meta, again = records_of(tmp_path / "run-rerun")
    assert meta["command"] == config["command"] and meta["exchange"] == "ordered"
    # The rerun's report names the rerun, and what it ran again.
    text = (tmp_path / "run-rerun" / "report.md").read_text()
    assert f"Run: `python -m experiments rerun {out} --no-progress`, again what `" in text
    assert config["command"] in text
    assert_same_records(again, rows)  # bitwise


@pytest.mark.parametrize(
    ("item", "match"),
    [("steps=5", "no study run here has the field 'steps'"), ("seeds", "FIELD=VALUE")],
)
def test_a_bad_override_names_the_fields(item, match, capsys):
    with pytest.raises(SystemExit, match=match):
        main([*TINY, "--set", item])


def test_the_console_script_runs_from_any_directory(tmp_path):
    script = pathlib.Path(sys.executable).parent / "fsq-experiments"
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, cwd=tmp_path, env=ENV
    )
    assert result.returncode == 0, result.stderr
    assert "--devices" in result.stdout and "--set" in result.stdout
    assert "``" not in result.stdout and ":data:" not in result.stdout  # no Sphinx markup
    run([*TINY, "--out", "here"], cwd=tmp_path)  # python -m experiments, outside the repo
    assert (tmp_path / "here" / "report.md").exists()


def test_progress_names_each_item_readably_with_its_place():
    from experiments.studies import base

    class Method:
        def __repr__(self):
            return "Method(make_tx=<function <lambda> at 0x7f>)"

    assert base.label(("label-sorted", "top-k 1% + EF")) == "label-sorted / top-k 1% + EF"
    assert base.label(("DiLoCo", Method())) == "DiLoCo"
    assert base.label((0.1, 16)) == "0.1 / 16"
    assert base.label(Method()) == "Method"
    shown, totals = [], []

    class Bar:
        n, total = 0, None

        def set_postfix_str(self, text, refresh):
            shown.append(text)

        def refresh(self):
            totals.append(self.total)

    bar = Bar()
    token = base._BAR.set(bar)
    try:
        for _item in base.progress(["a", "b", "c", "d"], None, "study"):
            for _ in base.progress(["x", "y"], None, "inner"):  # names, no estimate
                bar.n += 10
    finally:
        base._BAR.reset(token)
    assert shown[:3] == ["a (1/4)", "x (1/2)", "y (2/2)"] and "d (4/4)" in shown
    # The total for an ETA: 20 steps an item, 4 items; set after each of the first 3.
    assert totals == [80, 80, 80]


def test_help_lists_every_study_and_fields_lists_a_studys_config(capsys):
    from experiments.studies import STUDIES

    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    for name, study in STUDIES.items():
        first = study.module.__doc__.strip().splitlines()[0]
        assert f"  {name:<13} {first.partition(': ')[2]}" in shown
    assert main(["faults", "--fields", "--quick"]) is None
    shown = capsys.readouterr().out
    for field, value in STUDIES["faults"].sizes["quick"]._asdict().items():
        assert f"  {field} = {value!r}" in shown
