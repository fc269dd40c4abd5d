"""bench/accuracy.py: the table arithmetic, --resume, and end-to-end runs of its cheapest contender (TF-IDF)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lorafit.config import Config

BENCH = Path(__file__).resolve().parents[1] / "bench" / "accuracy.py"


def test_summary_and_table(load_bench):
    bench = load_bench("accuracy")
    runs = [{"accuracy": a, "f1_macro": a - 0.01, "train_time_s": t, "wall_s": t + 10} for a, t in
            [(0.90, 100), (0.92, 110), (0.91, 120)]]
    s = bench.summarise(runs)
    assert s["runs"] == 3 and s["accuracy"]["mean"] == pytest.approx(0.91)
    assert s["accuracy"]["std"] == pytest.approx(0.01) and (s["accuracy"]["min"], s["accuracy"]["max"]) == (0.90, 0.92)
    assert s["train_time_s"] == 110 and s["wall_s"] == 120
    table = bench.markdown_table({"default": s, "one-seed": bench.summarise(runs[:1])}).splitlines()
    # no validation accuracy in these runs (as the peer's): the column says so instead of averaging nothing
    assert table[2] == "| default | 3 | 0.9100 | 0.0100 | 0.9000 | 0.9200 | 0.9000 | 0.0100 | 0.8900 | 0.9100 | – | 110 | 120 |"
    assert table[3].startswith("| one-seed | 1 | 0.9000 | – | 0.9000 | 0.9000 |")  # no spread from one seed
    with_val = bench.summarise([dict(r, val_accuracy=v) for r, v in zip(runs, (0.85, 0.86, 0.87))])
    assert with_val["val_accuracy"] == pytest.approx(0.86)
    assert bench.contender_name("configs/quality.yaml") == "quality" and bench.contender_name("peer") == "peer"


def test_tfidf_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--only", "tfidf", "--seeds", "1", "--max-train-samples", "200",
                           "--max-eval-samples", "100", "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CPU: " in proc.stdout and "| tfidf | 1 |" in proc.stdout
    assert "| tfidf | 1 |" in (tmp_path / "table.md").read_text()
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [(r["contender"], r["seed"], r["n_test"]) for r in rows] == [("tfidf", "1", "100")]
    assert 0.4 < float(rows[0]["accuracy"]) <= 1.0  # chance is 0.25
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["header"]["seeds"] == [1] and results["summary"]["tfidf"]["runs"] == 1


def test_resume_reuses_only_unchanged_runs(tmp_path):
    def bench(*extra):
        proc = subprocess.run([sys.executable, str(BENCH), "--only", "tfidf", "--seeds", "1", "--max-eval-samples",
                               "100", "--out", str(tmp_path), "--resume", *extra], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    first = bench("--max-train-samples", "200")
    assert "running tfidf seed 1" in first and (tmp_path / "results" / "tfidf-seed1.json").exists()
    again = bench("--max-train-samples", "200")
    assert "reusing tfidf seed 1" in again and "running tfidf" not in again
    assert first.split("| tfidf | 1 |")[1].split("|")[0] == again.split("| tfidf | 1 |")[1].split("|")[0]
    changed = bench("--max-train-samples", "300")  # another definition: run again, not reused
    assert "running tfidf seed 1" in changed and "reusing" not in changed


def test_resume_key_follows_the_resolved_config(tmp_path, load_bench):
    bench = load_bench("accuracy")
    args = SimpleNamespace(epochs=None, max_train_samples=None, max_eval_samples=None)
    epochs = Config().train.epochs
    (tmp_path / "a.yaml").write_text(f"train:\n  epochs: {epochs}\n")
    (tmp_path / "b.yaml").write_text(f"train:\n  epochs: {epochs + 1}\n")
    # a YAML that spells out the default resolves to the default preset's key; another value does not
    assert bench.run_key(str(tmp_path / "a.yaml"), args) == bench.run_key("default", args)
    assert bench.run_key(str(tmp_path / "b.yaml"), args) != bench.run_key("default", args)
    assert bench.run_key("peer", args)["definition"] == "peer"


def test_resume_treats_a_field_added_since_at_its_default_as_unchanged(tmp_path, load_bench):
    bench = load_bench("accuracy")
    args = SimpleNamespace(epochs=None, max_train_samples=None, max_eval_samples=None)
    key = bench.run_key("default", args)
    saved = json.loads(json.dumps(key))
    del saved["definition"]["train"]["rdrop_alpha"]  # saved before the field existed
    assert bench.same_run(saved, key)
    (tmp_path / "r.yaml").write_text("train:\n  rdrop_alpha: 1.0\n")
    assert not bench.same_run(saved, bench.run_key(str(tmp_path / "r.yaml"), args))  # the new field is set
    saved["definition"]["train"]["epochs"] += 1
    assert not bench.same_run(saved, key)
    assert bench.same_run({**key, "definition": "peer"}, {**key, "definition": "peer"})
    assert not bench.same_run({**key, "definition": "peer"}, {**key, "definition": "tfidf"})


def test_resume_knows_a_field_whose_default_changed_what_runs_do(tmp_path, load_bench):
    bench = load_bench("accuracy")
    args = SimpleNamespace(epochs=None, max_train_samples=None, max_eval_samples=None)
    saved = json.loads(json.dumps(bench.run_key("default", args)))
    del saved["definition"]["model"]["tfidf_weight"]  # saved before the blend existed: the encoder alone
    assert not bench.same_run(saved, bench.run_key("default", args))  # the default now blends: run it again
    (tmp_path / "alone.yaml").write_text("model:\n  tfidf_weight: 0\n")
    assert bench.same_run(saved, bench.run_key(str(tmp_path / "alone.yaml"), args))
