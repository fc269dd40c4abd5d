"""A short end-to-end run of the embedded MiniLM through the CLI, on the bundled sample; no network."""

import csv
import json

import numpy as np
from typer.testing import CliRunner

import lorafit
from lorafit.cli import app
from lorafit.config import Config


def test_embedded_model_end_to_end(tmp_path):
    result = CliRunner().invoke(app, [
        "train", "--max-train-samples", "400", "--max-eval-samples", "200", "--epochs", "1",
        "--output-dir", str(tmp_path), "--run-name", "e2e",
    ])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    run = tmp_path / "e2e"
    assert "\nreport: " in result.output and (run / "report.html").is_file()  # the report this run wrote
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["layout_version"] == 2
    assert info["model"]["trainable_params"] <= 1_000_000
    assert info["train_samples_per_s"] > 0 and info["wall_time_s"] > 0
    assert Config.from_yaml(run / "config.yaml").data.max_train_samples == 400
    assert json.loads((run / "labels.json").read_text()) == ["World", "Sports", "Business", "Sci/Tech"]
    assert sorted(p.name for p in (run / "model").iterdir()) == ["README.md", "adapter_config.json",
                                                                 "adapter_model.safetensors", "tfidf.json",
                                                                 "tfidf.safetensors"]

    metrics = json.loads((run / "test_metrics.json").read_text())
    with open(run / "test_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["n"] == 200
    assert metrics["accuracy"] == np.mean([r["label"] == r["predicted"] for r in rows])
    assert metrics["accuracy"] > 0.6  # chance is 0.25; even 400 rows and one epoch learn the topics
    assert np.array(metrics["confusion_matrix"]).sum() == 200

    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["type"] == "train" for r in logged)
    assert [r["split"] for r in logged if r["type"] == "eval"] == ["validation", "test"]

    clf = lorafit.load(run)
    texts = [r["text"] for r in rows[:16]]
    assert list(clf.predict(texts)) == [r["predicted"] for r in rows[:16]]
