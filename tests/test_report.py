"""The run report: written at the end of training, drawn from the run directory, numbers equal the run's."""

import json
import re

import pytest
from typer.testing import CliRunner

from lorafit import report
from lorafit.cli import app


def test_training_writes_the_report(tiny_run):
    for name in ("report.md", "report.html"):
        assert (tiny_run / name).is_file()
    assert sorted(p.name for p in (tiny_run / "plots").iterdir()) == sorted(report.PLOTS)


def test_report_numbers_equal_test_metrics(run_copy):
    report.write_report(run_copy)
    md = (run_copy / "report.md").read_text()
    test = json.loads((run_copy / "test_metrics.json").read_text())
    section = md.split("## Test metrics")[1].split("## ")[0]
    table = dict(re.findall(r"^\| ([a-z0-9 ]+) \| ([0-9.]+) \|$", section, flags=re.M))
    assert float(table["accuracy"]) == pytest.approx(test["accuracy"], abs=5e-5)
    assert float(table["f1 macro"]) == pytest.approx(test["f1_macro"], abs=5e-5)
    assert float(table["precision weighted"]) == pytest.approx(test["precision_weighted"], abs=5e-5)
    per_class = md.split("## Per-class test metrics")[1].split("## ")[0]
    for name, values in test["per_class"].items():
        row = re.search(rf"^\| {re.escape(name)} \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9,]+) \|$", per_class, re.M)
        assert row, name
        assert float(row.group(3)) == pytest.approx(values["f1"], abs=5e-5)
        assert int(row.group(4).replace(",", "")) == values["support"]


def test_confused_pairs_come_from_the_predictions(run_copy):
    view = report.RunView(run_copy)
    pairs = report.confused_pairs(view)
    cm = json.loads((run_copy / "test_metrics.json").read_text())["confusion_matrix"]
    labels = view.labels
    for p in pairs:
        assert p["count"] == cm[labels.index(p["true"])][labels.index(p["predicted"])]
        probs = [e["prob"] for e in p["examples"]]
        assert probs == sorted(probs, reverse=True)
        assert all(e["label"] == p["true"] and e["predicted"] == p["predicted"] for e in p["examples"])


def test_html_is_self_contained(run_copy):
    html = (run_copy / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:|//)""", html)
    assert html.count("src='data:image/png;base64,") == len(report.PLOTS)
    assert "<script" not in html


def test_a_broken_plot_is_a_warning_not_a_failure(run_copy, monkeypatch):
    def broken(view, ax):
        raise RuntimeError("no ink")

    monkeypatch.setitem(report.PLOTS, "loss.png", ("Loss", broken))
    (run_copy / "plots" / "loss.png").unlink()
    with pytest.warns(UserWarning, match="loss.png"):
        report.write_report(run_copy)
    md = (run_copy / "report.md").read_text()
    assert "## Warnings" in md and "no ink" in md
    assert not (run_copy / "plots" / "loss.png").exists()
    assert (run_copy / "plots" / "accuracy.png").is_file()


def test_training_survives_a_failing_report(tiny_model_dir, tmp_path, monkeypatch):
    import lorafit
    from conftest import tiny_config

    monkeypatch.setattr(report, "write_report", lambda run_dir: (_ for _ in ()).throw(RuntimeError("boom")))
    run = lorafit.train(tiny_config(tiny_model_dir("bert"), tmp_path, max_train_samples=32, max_eval_samples=16, epochs=1))
    assert json.loads((run.path / "run.json").read_text())["status"] == "completed"
    assert (run.path / "test_metrics.json").is_file()


def test_cli_report_and_compare(run_copy, tiny_run, tmp_path):
    (run_copy / "report.md").unlink()
    result = CliRunner().invoke(app, ["report", str(run_copy)])
    assert result.exit_code == 0, result.output
    assert (run_copy / "report.md").is_file()
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", str(tiny_run), str(run_copy), "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = (out / "compare.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("run,")
    assert (out / "compare_accuracy.png").is_file()
    assert CliRunner().invoke(app, ["report", str(tmp_path / "nope")]).exit_code == 2


def test_report_leaves_matplotlib_global_state_alone(run_copy):
    import matplotlib

    backend = matplotlib.get_backend()
    rc = dict(matplotlib.rcParams)
    report.write_report(run_copy)
    assert matplotlib.get_backend() == backend
    assert dict(matplotlib.rcParams) == rc


def test_training_accuracy_is_plotted_beside_validation(run_copy, monkeypatch):
    rows = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    for i, row in enumerate(r for r in rows if r["type"] == "train"):
        row["accuracy"] = 0.5 + 0.01 * i  # as the loop logs it: mean training accuracy over the log interval
    (run_copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = {}

    def spy(view, ax):
        report.plot_accuracy(view, ax)
        drawn["labels"] = [line.get_label() for line in ax.get_lines()]
        drawn["train"] = list(ax.get_lines()[0].get_ydata())

    monkeypatch.setitem(report.PLOTS, "accuracy.png", ("Accuracy", spy))
    report.write_report(run_copy)
    assert drawn["labels"][:2] == ["training accuracy (log interval)", "validation accuracy"]
    assert drawn["train"] == [r["accuracy"] for r in rows if r["type"] == "train"]


def test_html_shows_results_first_and_folds_the_hyperparameters(run_copy):
    report.write_report(run_copy)
    page = (run_copy / "report.html").read_text()
    at = {name: page.index(marker) for name, marker in [
        ("cards", "<div class='headline'>"), ("first image", "<img"),
        ("loss curve", "<img alt='Training and validation loss'"),
        ("confusion matrix", "<img alt='Test confusion matrix, counts'"),
        ("confused pairs", "<h2>Most confused class pairs</h2>"), ("data", "<h2>Data</h2>"),
        ("hyperparameters", "<h2>Hyperparameters</h2>"), ("test metrics", "<h2>Test metrics</h2>")]}
    assert list(at) == sorted(at, key=at.get), at
    assert at["first image"] == at["loss curve"]
    folded = re.search(r"<h2>Hyperparameters</h2>\s*<details><summary>[^<]+</summary>(.*?)</details>", page, re.S)
    assert folded and "<td>learning_rate</td>" in folded.group(1) and "<td>max_length</td>" in folded.group(1)
    assert page.count("<details>") == 1  # only the hyperparameters are folded
    assert "<script" not in page.lower()
    md = (run_copy / "report.md").read_text()
    headings = re.findall(r"^## (.+)$", md, re.M)
    assert headings.index("Learning curves") < headings.index("Most confused class pairs") < headings.index("Data")
