"""bench/distill.py: the options it passes to every student, its summary and table."""

from __future__ import annotations

import pytest


def test_student_set_values_are_yaml(load_bench):
    bench = load_bench("distill")
    assert bench.student_options(["temperature=1", "hard-weight=0.25", "lora_layers=[-6, -5]", "epochs=4"]) == {
        "temperature": 1, "hard_weight": 0.25, "lora_layers": [-6, -5], "epochs": 4}
    assert bench.student_options([]) == {}
    for bad in ("temperature", "=1"):
        with pytest.raises(ValueError, match="NAME=VALUE"):
            bench.student_options([bad])


def test_summary_and_table(load_bench):
    bench = load_bench("distill")
    runs = [{"accuracy": a, "fp32_accuracy": a + 0.001, "int8_accuracy": a - 0.002, "f1_macro": a - 0.01,
             "train_time_s": t} for a, t in [(0.90, 100), (0.92, 110), (0.91, 120)]]
    s = bench.summarise(runs)
    assert s["accuracy"]["mean"] == pytest.approx(0.91) and s["accuracy"]["std"] == pytest.approx(0.01)
    assert s["int8_accuracy"]["mean"] == pytest.approx(0.908) and s["train_time_s"] == 110
    speeds = {"minilm2": {"torch": 100.0, "onnx": 150.0, "onnx-int8": 300.0}}
    table = bench.markdown_table({"minilm2": s, "teacher": bench.summarise(runs[:1])}, speeds, peer=60.0).splitlines()
    assert table[2] == ("| minilm2 | 3 | 0.9100 | 0.0100 | 0.9000 | 0.9200 | 0.9110 | 0.9080 | 0.9000 | 110 | "
                        "100.0 (1.67x) | 150.0 (2.50x) | 300.0 (5.00x) |")
    assert table[3] == ("| teacher | 1 | 0.9000 | – | 0.9000 | 0.9000 | 0.9010 | 0.8980 | 0.8900 | 100 | "
                        "– | – | – |")
