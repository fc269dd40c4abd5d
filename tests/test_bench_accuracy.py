"""bench/accuracy.py: the table arithmetic, and one end-to-end run of its cheapest contender (TF-IDF)."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "accuracy.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_accuracy", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_and_table():
    bench = load_bench()
    runs = [{"accuracy": a, "f1_macro": a - 0.01, "train_time_s": t, "wall_s": t + 10} for a, t in
            [(0.90, 100), (0.92, 110), (0.91, 120)]]
    s = bench.summarise(runs)
    assert s["runs"] == 3 and s["accuracy"]["mean"] == pytest.approx(0.91)
    assert s["accuracy"]["std"] == pytest.approx(0.01) and (s["accuracy"]["min"], s["accuracy"]["max"]) == (0.90, 0.92)
    assert s["train_time_s"] == 110 and s["wall_s"] == 120
    table = bench.markdown_table({"default": s, "one-seed": bench.summarise(runs[:1])}).splitlines()
    assert table[2] == "| default | 3 | 0.9100 | 0.0100 | 0.9000 | 0.9200 | 0.9000 | 0.0100 | 0.8900 | 0.9100 | 110 | 120 |"
    assert table[3].startswith("| one-seed | 1 | 0.9000 | – | 0.9000 | 0.9000 |")  # no spread from one seed
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
