"""The experiments: tasks against hand computations, the trainer against a plain loop, the
runner end to end on a tiny configuration, and the report as a pure function of the JSON."""

import csv
import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fsq
from experiments import mnist1d, records, report, training
from experiments.__main__ import main
from experiments.studies import STUDIES, base
from experiments.tasks import cnn, logistic, markov, mlp, quadratic, transformer

# --- Tasks ----------------------------------------------------------------------------------


def test_quadratic_loss_and_test_loss_by_hand():
    task = quadratic.task(dim=3, condition=4.0, noise=0.5)  # curvatures 1/4, 1/2, 1
    w = {"w": jnp.array([1.0, 2.0, 3.0])}
    x, y = jnp.array([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]), jnp.array([4.0, 0.0])
    # 0.5 * (1 + 6 - 4)^2 and 0.5 * 2^2.
    np.testing.assert_allclose(task.loss(w, (x, y)), [4.5, 2.0], rtol=1e-6)
    c = np.array([0.25, 0.5, 1.0])
    gap = 0.5 * np.sum(c * (np.array([1.0, 2.0, 3.0]) - 1 / np.sqrt(c)) ** 2)
    np.testing.assert_allclose(task.evaluate(w)["test_loss"], gap + 0.125, rtol=1e-6)
    assert task.loss_floor == 0.125
    # The closed-form test loss is the expectation of the sampled loss.
    losses = task.loss(w, task.sample(jax.random.key(0), 200_000))
    np.testing.assert_allclose(losses.mean(), gap + 0.125, rtol=0.02)


def _data(x, y, x_test, y_test) -> mnist1d.Dataset:
    return mnist1d.Dataset(*(np.asarray(a) for a in (x, y, x_test, y_test)))


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -log_p[np.arange(len(labels)), labels]


def test_logistic_loss_and_accuracy_by_hand():
    x = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], np.float32)
    y = np.array([0, 1, 2])
    task = logistic.task(_data(x, y, x, np.array([0, 2, 2])))
    params = task.init(jax.random.key(0))
    kernel = np.array([[1.0, 0.0] + [0.0] * 8, [0.0, 1.0] + [0.0] * 8], np.float32)
    bias = np.array([0.0, 0.0, 0.5] + [0.0] * 7, np.float32)
    params = {"params": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}
    # Logits: [1, 0, .5, 0...], [0, 2, .5, 0...], [1, 1, .5, 0...]; 10 classes.
    logits = x @ kernel + bias
    np.testing.assert_allclose(
        task.loss(params, (jnp.asarray(x), jnp.asarray(y))), _cross_entropy(logits, y), rtol=1e-5
    )
    # Predictions 0, 1, 0 against test labels 0, 2, 2: one right in three.
    np.testing.assert_allclose(task.evaluate(params)["test_accuracy"], 1 / 3, rtol=1e-6)


def test_mlp_loss_matches_numpy_forward_pass():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 40)).astype(np.float32), rng.integers(0, 10, 5)
    task = mlp.task(_data(x, y, x, y))
    params = task.init(jax.random.key(1))
    h = x
    layers = [params["params"][f"Dense_{i}"] for i in range(3)]
    for layer in layers[:-1]:
        h = np.maximum(h @ np.asarray(layer["kernel"]) + np.asarray(layer["bias"]), 0.0)
    logits = h @ np.asarray(layers[-1]["kernel"]) + np.asarray(layers[-1]["bias"])
    np.testing.assert_allclose(
        task.loss(params, (jnp.asarray(x), jnp.asarray(y))), _cross_entropy(logits, y), rtol=1e-4
    )
    expected = np.mean(np.argmax(logits, -1) == y)
    np.testing.assert_allclose(task.evaluate(params)["test_accuracy"], expected)


def _conv_stride2_pad1(h: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Direct loops: out[b, i, f] = sum_{k, c} pad(h)[b, 2 i + k, c] kernel[k, c, f] + bias."""
    padded = np.pad(h, ((0, 0), (1, 1), (0, 0)))
    width = kernel.shape[0]
    length = (padded.shape[1] - width) // 2 + 1
    out = np.zeros((h.shape[0], length, kernel.shape[2]))
    for b in range(h.shape[0]):
        for i in range(length):
            for k in range(width):
                out[b, i] += padded[b, 2 * i + k] @ kernel[k]
    return out + bias


def test_cnn_loss_matches_direct_convolution():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3, 40)).astype(np.float32), rng.integers(0, 10, 3)
    task = cnn.task(_data(x, y, x, y))
    params = task.init(jax.random.key(2))["params"]
    h = x[..., None]
    for i, width in enumerate((5, 3, 3)):
        layer = params[f"StridedConv_{i}"]["Dense_0"]
        kernel = np.asarray(layer["kernel"]).reshape(width, h.shape[-1], 25)
        h = np.maximum(_conv_stride2_pad1(h, kernel, np.asarray(layer["bias"])), 0.0)
    assert h.shape == (3, 5, 25)  # the paper's 125 features
    logits = h.reshape(3, -1) @ np.asarray(params["Dense_0"]["kernel"])
    logits += np.asarray(params["Dense_0"]["bias"])
    np.testing.assert_allclose(
        task.loss({"params": params}, (jnp.asarray(x), jnp.asarray(y))),
        _cross_entropy(logits, y),
        rtol=1e-4,
    )
    expected = np.mean(np.argmax(logits, -1) == y)
    np.testing.assert_allclose(task.evaluate({"params": params})["test_accuracy"], expected)


def _with_head(params, kernel_value: float, bias: np.ndarray):
    def replace(path, leaf):
        names = [str(getattr(p, "key", p)) for p in path]
        if "head" in names and "kernel" in names:
            return jnp.full_like(leaf, kernel_value)
        if "head" in names and "bias" in names:
            return jnp.asarray(bias, leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(replace, params)


def test_transformer_loss_by_hand():
    task = transformer.task(vocab=4, length=5, width=8, heads=2, layers=1, test_sequences=16)
    params = task.init(jax.random.key(0))
    # A zero head: every position predicts log_softmax(bias), whatever the input.
    q = np.array([0.1, 0.2, 0.3, 0.4])
    params = _with_head(params, 0.0, np.log(q))
    tokens = np.array([[0, 1, 2, 3, 3], [3, 3, 3, 3, 3]])
    # Targets are tokens 1..4 of each sequence; per-sequence mean of -log q[target].
    expected = [-np.mean(np.log(q[[1, 2, 3, 3]])), -np.log(0.4)]
    np.testing.assert_allclose(task.loss(params, jnp.asarray(tokens)), expected, rtol=1e-5)
    uniform = _with_head(params, 0.0, np.zeros(4))
    np.testing.assert_allclose(task.evaluate(uniform)["test_loss"], np.log(4.0), rtol=1e-6)
    assert task.sample(jax.random.key(1), 3).shape == (3, 5)


def test_markov_entropy_rate_matches_numpy():
    chain = markov.random_chain(vocab=5, concentration=0.7, seed=3)
    p = chain.transition
    # Stationary distribution by a linear solve: pi (P - I) = 0 with sum(pi) = 1.
    a = np.vstack([(p - np.eye(5)).T, np.ones(5)])
    pi = np.linalg.lstsq(a, np.r_[np.zeros(5), 1.0], rcond=None)[0]
    np.testing.assert_allclose(chain.stationary, pi, atol=1e-10)
    entropy = -sum(pi[i] * p[i, j] * math.log(p[i, j]) for i in range(5) for j in range(5))
    np.testing.assert_allclose(markov.entropy_rate(chain), entropy, rtol=1e-10)
    # It is the mean surprise of the true next-token distribution on sampled sequences.
    tokens = np.asarray(markov.sample(chain, jax.random.key(0), 4000, 50))
    surprise = -np.log(p[tokens[:, :-1], tokens[:, 1:]])
    np.testing.assert_allclose(surprise.mean(), entropy, rtol=0.01)
    # Sequences start from pi: token frequencies at any position follow pi.
    np.testing.assert_allclose(np.bincount(tokens[:, 0], minlength=5) / 4000, pi, atol=0.03)


def test_transformer_floor_is_its_chains_entropy_rate():
    task = transformer.task(vocab=4, length=5, width=8, heads=2, layers=1, test_sequences=16)
    chain = markov.random_chain(4, transformer.CONCENTRATION, transformer.CHAIN_SEED)
    p, pi = chain.transition, chain.stationary
    assert task.loss_floor == pytest.approx(-np.sum(pi[:, None] * p * np.log(p)))


# --- Training ------------------------------------------------------------------------------


def test_trainer_matches_a_python_loop_of_synchronous_sgd():
    task = quadratic.task(dim=4, condition=10.0)
    workers, steps, batch, lr = 8, 6, 3, 0.1

    def make_tx(hp, seed):
        return training.flying_squirrel(fsq.sgd(hp["learning_rate"]), workers, seed, **base.OFF)

    outcome = training.train(
        task,
        make_tx,
        grid={"learning_rate": (lr,)},
        seeds=(5,),
        steps=steps,
        num_workers=workers,
        batch_size=batch,
        num_devices=8,
    )
    # The reference: the mean gradient of the workers' batches, one SGD step at a time.
    _, data_key = jax.random.split(jax.random.key(5))
    w, expected = np.zeros(4), []
    for t in range(steps):
        losses, grads = [], []
        for i in range(workers):
            x, y = map(
                np.asarray,
                task.sample(jax.random.fold_in(jax.random.fold_in(data_key, t), i), batch),
            )
            residual = x @ w - y
            losses.append(np.mean(0.5 * residual**2))
            grads.append(x.T @ residual / batch)
        expected.append(np.mean(losses))
        w = w - lr * np.mean(grads, axis=0)
    np.testing.assert_allclose(outcome.losses[0, 0], expected, rtol=1e-4)
    assert outcome.num_params == 4
    assert outcome.staleness[0, 0] == 0.0


def test_uniform_up_to_draws_fsq_uniform_delays():
    keys = jax.random.split(jax.random.key(0), 3000)

    def draws(model):
        return np.asarray(jax.vmap(lambda k: model(k, 0, 0))(keys))

    np.testing.assert_array_equal(
        draws(training.UniformUpTo(4, bound=4)), draws(fsq.delays.uniform(4))
    )
    bounded = draws(training.UniformUpTo(4, bound=jnp.asarray(2)))
    np.testing.assert_allclose(
        np.bincount(bounded, minlength=5) / 3000, [1 / 3] * 3 + [0, 0], atol=0.03
    )


def test_one_of_returns_the_chosen_update():
    g = jnp.array([1.0, -2.0])
    tx = base.one_of([fsq.sgd(0.1), fsq.sgd(1.0), optax.sign_sgd(0.5)], jnp.asarray(2))
    u, _ = tx.update(g, tx.init(jnp.zeros(2)))
    np.testing.assert_allclose(u, [-0.5, 0.5])

    def chosen(index):
        tx = base.one_of([fsq.sgd(0.1), fsq.sgd(1.0)], index)
        return tx.update(g, tx.init(jnp.zeros(2)))[0]

    np.testing.assert_allclose(
        jax.vmap(chosen)(jnp.array([1, 0])), [[-1, 2], [-0.1, 0.2]], rtol=1e-6
    )


def test_learning_rate_grid_and_curve_summaries():
    assert base.learning_rates(0.01, 5) == (0.001, 0.003, 0.01, 0.03, 0.1)
    assert base.learning_rates(0.3, 2) == (0.1, 0.3)
    losses = np.array([4.0, 3.0, 2.0, 1.0])
    np.testing.assert_allclose(records.curve(losses, points=2), [3.5, 1.5])
    # Four evaluations over 8 steps (after steps 2, 4, 6, 8): the third is at 2.
    assert records.steps_to(losses, 8, 2.0) == 6
    assert records.steps_to(losses, 8, 0.5) is None
    assert records.final_loss(np.arange(20.0)) == 18.5  # the mean of the last 10%: 18, 19
    assert records.has_diverged(np.array([1.0, np.nan]))
    assert records.has_diverged(np.array([1.0, 2.0]))
    assert not records.has_diverged(np.array([2.0, 1.0]))


# --- Runner and report ---------------------------------------------------------------------

FIELDS = set(records.Record._fields)


def test_runner_quick_path_end_to_end(tmp_path):
    path = main(["classic", "--tiny", "--out", str(tmp_path), "--devices", "8", "--no-progress"])
    assert path == tmp_path / "report.md"
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["meta"]["scale"] == "tiny" and payload["meta"]["devices"] == 8
    rows = payload["records"]
    # 2 optimizers x 2 learning rates x 2 delay levels x 1 seed.
    assert len(rows) == 8
    for row in rows:
        assert set(row) == FIELDS
        assert row["study"] == "classic" and row["task"] == "quadratic"
        assert row["method"] in ("sgd", "adam") and row["workers"] == 8
        assert row["delay"] in ("none", "uniform(2)") and row["seed"] == 0
        assert row["steps"] == 20 and len(row["curve"]) == 20 and row["test_curve"] is None
        assert row["hyperparameters"]["batch_size"] == 4
        assert row["bytes_per_step"] == 4 * 20  # 20 float32 parameters, one channel
        assert isinstance(row["diverged"], bool) and row["test_accuracy"] is None
        assert row["loss_floor"] == 0.5 and row["test_loss"] >= 0.5
        assert row["mean_staleness"] == 0.0 if row["delay"] == "none" else row["mean_staleness"] > 0
    with (tmp_path / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and set(table[0]) == FIELDS - {"curve", "test_curve"}
    text = path.read_text()
    assert "## Classic catalogue" in text
    assert {row[0] for row in table_rows(text)} >= {"sgd", "adam"}
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "classic_curves.png" in pngs
    assert (tmp_path / "classic_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _record(**fields) -> records.Record:
    defaults = {
        "study": "classic",
        "task": "mlp",
        "method": "sgd",
        "hyperparameters": {"learning_rate": 0.1, "max_delay": 0, "batch_size": 16},
        "workers": 8,
        "delay": "none",
        "seed": 0,
        "steps": 100,
        "final_train_loss": 1.0,
        "test_loss": 1.5,
        "test_accuracy": 0.5,
        "loss_floor": None,
        "diverged": False,
        "bytes_per_step": 400,
        "wall_seconds": 1.0,
        "mean_staleness": 0.0,
        "target_loss": None,
        "steps_to_target": None,
        "curve": [2.0, 1.5, 1.0],
        "test_curve": None,
    }
    return records.Record(**{**defaults, **fields})


def _saved_results() -> list[records.Record]:
    rows = []
    for seed, accuracy in ((0, 0.5), (1, 0.7)):
        for lr, bonus in ((0.1, 0.0), (0.3, -0.2)):
            for delay, bound, factor in (("none", 0, 1.0), ("uniform(16)", 16, 0.5)):
                rows.append(
                    _record(
                        seed=seed,
                        test_accuracy=(accuracy + bonus) * factor,
                        hyperparameters={"learning_rate": lr, "max_delay": bound, "batch_size": 16},
                        delay=delay,
                    )
                )
    for seed, accuracy in ((0, 0.30), (1, 0.36)):
        rows.append(
            _record(
                study="anchors", task="logistic", method="adam", seed=seed, test_accuracy=accuracy
            )
        )
    for w, steps in ((1, 80), (2, 40), (4, 30)):
        rows.append(
            _record(
                study="workers",
                task="quadratic",
                method="synchronous",
                workers=w,
                test_accuracy=None,
                loss_floor=0.5,
                target_loss=1.0,
                steps_to_target=steps,
                hyperparameters={"learning_rate": 0.1, "max_delay": 0, "batch_size": 1},
            )
        )
    return rows


def table_rows(text: str) -> set[tuple[str, ...]]:
    """The rows of every Markdown table of ``text``, as tuples of stripped cells."""
    return {
        tuple(cell.strip() for cell in line.strip().strip("|").split("|"))
        for line in text.splitlines()
        if line.startswith("|")
    }


def test_report_regenerated_from_json_is_deterministic(tmp_path):
    records.write(_saved_results(), {"command": "test", "scale": "tiny", "devices": 8}, tmp_path)
    first = report.write(tmp_path).read_text()
    pngs = {p.name: p.read_bytes() for p in tmp_path.glob("*.png")}
    assert {"classic_curves.png", "workers.png"} <= set(pngs)
    # Every run sends the same bytes: no one-column plot of the metric against them.
    assert "bytes.png" not in pngs and "bytes.png" not in first
    second = report.write(tmp_path).read_text()
    assert first == second
    assert pngs == {p.name: p.read_bytes() for p in tmp_path.glob("*.png")}
    # Numbers checked by hand. Classic, lr 0.1 is best: accuracies 50 and 70 -> 60 +- 10,
    # delayed 25 and 35 -> 30 +- 5, 50% of synchronous.
    rows = table_rows(first)
    assert ("sgd", "0.1", "1", "60.0 +- 10.0", "30.0 +- 5.0 (50%)") in rows
    # Anchors: 30 and 36 -> 33.0 +- 3.0, one point above the paper's 32.
    assert ("logistic", "100", "2", "32", "33.0 +- 3.0", "+1.0", "yes") in rows
    # Workers: 80 / 40 = 2.00 at W = 2 (efficiency 1.00), 80 / 30 = 2.67 at W = 4 (0.67).
    assert ("2", "0.1", "40", "2.00", "1.00") in rows
    assert ("4", "0.1", "30", "2.67", "0.67") in rows


def check_figure(fig) -> tuple[int, int]:
    """Asserts what a reader needs of a figure; returns its (diverged markers, "div." labels)."""
    from matplotlib.figure import Figure

    from experiments.presentation import DIVERGED

    assert isinstance(fig, Figure)
    markers = labels = 0
    for ax in fig.axes:
        lines = ax.get_lines()
        (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        for line in lines:
            x = np.asarray(line.get_xdata(), float)
            y = np.asarray(line.get_ydata(), float)
            labels += "div." in line.get_label()
            if line.get_gid() == DIVERGED:  # crosses on the axes' edge, in axes units
                markers += len(y)
                assert set(y) <= {0.0, 1.0}
                continue
            # No NaN drawn silently, and nothing off the axes (a log axis drops values <= 0).
            assert np.isfinite(y).all(), (fig.texts, ax.get_title(), line.get_label())
            assert ((y >= y0 - 1e-9 * abs(y0)) & (y <= y1 + 1e-9 * abs(y1))).all(), ax.get_title()
            if line.get_transform() == ax.transData:
                assert np.isfinite(x).all() and ((x >= x0) & (x <= x1)).all(), ax.get_title()
            if ax.get_yscale() == "log":
                assert (y > 0).all(), ax.get_title()
        labelled = {a.get_label() for a in [*lines, *ax.collections]} - {""}
        labelled = {label for label in labelled if not label.startswith("_")}
        shared = [{t.get_text() for t in legend.get_texts()} for legend in fig.legends]
        if len(labelled) > 1:  # its own legend, or the figure's with every label of it
            assert ax.get_legend() is not None or any(labelled <= s for s in shared), ax.get_title()
        if ax.get_legend() is not None:  # not both: two legends of one series crowd the axes
            assert not any(labelled & s for s in shared), ax.get_title()
    return markers, labels


def saved_figures(monkeypatch) -> dict:
    """``{file name: figure}`` of every figure saved from now on in this test."""
    from matplotlib.figure import Figure

    figures = {}
    save = Figure.savefig

    def keep(fig, path, *args, **kwargs):
        figures[pathlib.Path(path).name] = fig
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_every_study_runs_and_reports_with_readable_figures(name, tmp_path, monkeypatch):
    """The main job's path, each study at the tiny scale (one test a study, so that test
    workers share them): it writes its records and its section of the report, and every
    figure passes :func:`check_figure`."""
    figures = saved_figures(monkeypatch)
    path = main([name, "--tiny", "--out", str(tmp_path), "--devices", "8", "--no-progress"])
    rows = json.loads((tmp_path / "results.json").read_text())["records"]
    assert rows and {row["study"] for row in rows} == {name}
    text = path.read_text()
    heading = STUDIES[name].section([records.Record(**r) for r in rows])[0]
    assert heading.startswith("## ") and heading in text
    assert set(figures) == {p.name for p in tmp_path.glob("*.png")}
    marked = sum(sum(check_figure(fig)) for fig in figures.values())
    if name == "time":  # some of its tiny runs diverge: its figure marks them
        assert any(r["diverged"] for r in rows) and marked > 0
    # Every image the report shows exists, and none is shown that was not drawn.
    shown = set(re.findall(r"!\[[^]]*\]\(([^)]+)\)", text))
    assert shown == set(figures)


def test_local_section_reads_equal_compute_and_time_by_hand():
    """Synchronous: 100 steps at 12 ticks a step, its loss above the floor 0.3 at the end.
    DiLoCo: 300 steps at 1.5 ticks, 0.2 at step 100 (equal compute), 0.3 first reached at
    step 50: 75 ticks against 1200, 0.0625x. The other rate (0.5 at step 100) loses."""

    def local_record(method, curve, steps, ticks, lr=0.01):
        return _record(
            study="local",
            task="transformer",
            method=method,
            steps=steps,
            test_accuracy=None,
            loss_floor=1.0,
            test_loss=1.0 + curve[-1],
            test_curve=[1.0 + x for x in curve],
            hyperparameters={
                "learning_rate": lr,
                "batch_size": 16,
                "peak_bytes": 400.0,
                "ticks_per_step": ticks,
                "params": 100,
                "equal_compute_steps": 100,
                "model": "tiny",
            },
        )

    rows = [
        local_record("synchronous", [0.9, 0.3], 100, 12.0),
        local_record("DiLoCo H=50", [0.3, 0.2, 0.1, 0.1, 0.1, 0.1], 300, 1.5),
        local_record("DiLoCo H=50", [0.9, 0.5, 0.4, 0.1, 0.1, 0.1], 300, 1.5, lr=0.1),
    ]
    from experiments.studies import local

    text = "\n".join(local.section(rows))
    cells = {row[0]: row for row in table_rows(text)}
    assert cells["DiLoCo H=50"][1:5] == ("0.01", "0.2000", "66.7%", "-0.1000")
    assert cells["DiLoCo H=50"][-1] == "0.062x"
    assert cells["synchronous"][-1] == "1.000x"


def test_results_page_shows_the_checked_in_records():
    """docs/results.md's generated tables are those of the records beside it, today."""
    from experiments import results_page

    text = results_page.PAGE.read_text()
    assert results_page.render(text) == text
    assert "<!-- begin generated: coordination -->\n\n**momentum**" in text


def test_staleness_rules_on_request_weigh_as_their_papers_say(tmp_path):
    """The published rules and the default's variants that `--set methods=` adds, against
    their formulas evaluated by hand in numpy at delays uniform in 0..16."""
    from experiments.studies import staleness

    tau = np.arange(17.0)
    base_weights = np.minimum(1.0, 3.0 / np.maximum(1.0, tau))

    def weights(method):
        rule = staleness.options(method, jnp.asarray(16), 64)["staleness"]
        return np.asarray(fsq.staleness.resolve(rule, fsq.delays.uniform(16)).scale(tau))

    # Koloskova et al.: full steps up to the mean delay (8), then 8 / tau; gradient scope.
    np.testing.assert_allclose(weights("delay-adaptive"), np.minimum(1.0, 8.0 / np.maximum(1, tau)))
    assert staleness.options("delay-adaptive", jnp.asarray(16), 64)["compensation"] is None
    # Weight-preserving: the default's weights over their mean, which is then 1.
    preserved = weights("weight-preserving weighted step + DC-a")
    np.testing.assert_allclose(preserved, base_weights / base_weights.mean(), rtol=1e-6)
    assert preserved.mean() == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(weights("inverse"), 1.0 / np.maximum(1.0, tau))
    np.testing.assert_allclose(weights("weighted step tau_C 1 + DC-a"), 1.0 / np.maximum(1.0, tau))
    with pytest.raises(ValueError, match="staleness methods are"):
        main(
            [
                "staleness",
                "--tiny",
                "--no-progress",
                "--out",
                str(tmp_path),
                "--set",
                "methods=('nope',)",
            ]
        )


def figures_of_report(folder: pathlib.Path, out: pathlib.Path, monkeypatch) -> dict:
    """The figure objects of the report on ``folder``'s records, drawn again into ``out``."""
    import shutil

    figures = saved_figures(monkeypatch)
    out.mkdir(parents=True)
    shutil.copy(folder / records.RESULTS_JSON, out / records.RESULTS_JSON)
    report.write(out)
    return figures


@pytest.mark.parametrize(
    "folder",
    sorted(p.parent for p in pathlib.Path("docs/studies").rglob(records.RESULTS_JSON)),
    ids=str,
)
def test_the_checked_in_reports_figures_are_readable(folder, tmp_path, monkeypatch):
    """Every figure of the published study reports, drawn from their records, passes
    :func:`check_figure`, and is a figure the report shows (the faults study has tables
    only)."""
    figures = figures_of_report(folder, tmp_path / "report", monkeypatch)
    assert {p.name for p in folder.glob("*.png")} == set(figures)
    for fig in figures.values():
        check_figure(fig)


def test_local_methods_bytes_and_ticks_by_hand():
    """The tiny model with every variant: T = 20 steps, so streaming and async local SGD
    send every 10 steps; the slow link carries a dense gradient in 10 ticks after 1 of
    latency (11 ticks), a fragment of 2 in ceil(10 x its share) + 1."""
    from experiments.studies import local
    from experiments.tasks import transformer

    size = local.SIZES["tiny"]._replace(variants=local.VARIANTS)
    task = transformer.task(width=size.width, layers=size.layers, length=size.length)
    params = jax.eval_shape(task.init, jax.random.key(0))
    dense = 4 * sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    labels = jax.tree.leaves(fsq.fragment_labels(params, 2))
    shares = [
        4
        * sum(
            math.prod(x.shape)
            for x, f in zip(jax.tree.leaves(params), labels, strict=True)
            if f == k
        )
        for k in (0, 1)
    ]
    peak_ticks = 1 + math.ceil(max(shares) / (dense / 10))
    got = {name: m[1:] for name, m in local.methods(task, size).items()}
    want = {
        "synchronous": (dense, dense, 1 + 11),
        "DiLoCo H=5": (dense / 5, dense, 1 + 11 / 5),
        # The fragment's trip overlaps the next 9 steps at most: what is left, per 10 / 2.
        "streaming DiLoCo H=10, F=2": (
            dense / 10,
            max(shares),
            1 + max(0, peak_ticks - min(peak_ticks, 9)) / 5,
        ),
        "async local SGD H=10": (dense / 10, dense, 1 + (11 - 1) / 10),
    }
    for name, value in want.items():
        assert got[name] == pytest.approx(value), name
    assert set(got) == {*want, "flying squirrel + top-k 1% + EF"}


def test_an_unknown_local_variant_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"local variants are \('streaming DiLoCo'"):
        main(
            ["local", "--tiny", "--no-progress", "--out", str(tmp_path), "--set", "variants=('x',)"]
        )


def test_the_coordination_figure_reads_from_its_checked_in_results(tmp_path, monkeypatch):
    """The figure of the study behind the defaults, redrawn from docs/coordination.json:
    one legend for every method, the synchronous line named, every diverged cell marked."""
    from experiments.studies import coordination

    figures = saved_figures(monkeypatch)
    docs = pathlib.Path(__file__).parents[1] / "docs"
    records = json.loads((docs / "coordination.json").read_text())
    coordination.plot(records, tmp_path / "coordination.png")
    fig = figures["coordination.png"]
    markers, labels = check_figure(fig)
    assert markers >= 2 and labels >= 2  # plain async and delay-adaptive diverge at 64
    (shown,) = [{t.get_text() for t in legend.get_texts()} for legend in fig.legends]
    assert {"synchronous", "flying squirrel default (weighted step tau_C 3 + DC-a lam0 1)"} <= shown


def test_the_coordination_study_exchanges_as_the_runner_says(monkeypatch):
    """``--exchange ordered`` (not the default) reaches the coordination study's preset."""
    from experiments.studies import coordination

    seen = []
    original = fsq.flying_squirrel

    def recording(*args, **kwargs):
        seen.append(kwargs.get("exchange"))
        return original(*args, **kwargs)

    def building(make_tx, seeds, **kwargs):  # builds the transformation, trains nothing
        make_tx(seeds[0])
        return mnist1d.Result(*[np.zeros(len(seeds))] * 3)

    monkeypatch.setattr(fsq, "flying_squirrel", recording)
    monkeypatch.setattr(mnist1d, "train", building)
    monkeypatch.setattr(mnist1d, "load", lambda: None)
    token = training.EXCHANGE.set("ordered")
    try:
        coordination.run(fsq.sgd(0.1), fsq.delays.uniform(2), 4, (0,))
    finally:
        training.EXCHANGE.reset(token)
    assert seen == ["ordered"]


def test_one_run_shows_no_spread_and_diverged_runs_are_left_out_of_the_mean():
    from experiments.presentation import seed_count, summary

    one = [_record(study="classic", task="t", method="m", seed=0, test_accuracy=0.5)]
    assert summary(one) == "50.0"  # no "+- 0.0" for a single run
    two = one + [_record(study="classic", task="t", method="m", seed=1, test_accuracy=0.7)]
    assert summary(two) == "60.0 +- 10.0"
    lost = [_record(study="classic", task="t", method="m", seed=2, diverged=True)]
    assert summary(one + lost) == "50.0 div. (1/2)"
    assert summary(lost) == "div. (1/1)"
    assert (seed_count(1), seed_count(3)) == ("1 seed", "3 seeds")
