"""bench/gpu.py in its CPU mode (--tiny): every row it can run on a CPU runs and lands in the table; the QLoRA rows
say why they are skipped; lorafit's peer-recipe row trains with the peer's recipe."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import yaml


def test_mfu_counts_four_flops_per_weight_and_token(load_bench):
    bench = load_bench("gpu")
    # 1M weights x 1M tokens x 4 FLOPs in 2 s against 1 TFLOP/s: 2 TFLOP/s achieved, twice the peak
    assert bench.mfu(10**6, 10**6, 2.0, 1.0) == pytest.approx(2.0)
    assert bench.mfu(10**6, 10**6, 0.0, 1.0) is None


def test_the_recipe_rows_are_the_peers_recipe(load_bench, tmp_path):
    bench = load_bench("gpu")
    args = bench.parse_args(["--out", str(tmp_path)])
    data = {"train_csv": tmp_path / "train.csv", "test_csv": tmp_path / "test.csv"}
    peer = bench.lorafit_overrides("lorafit-peer", args, tmp_path / "m", data, tmp_path)
    assert {k: peer[k] for k in bench.PEER_RECIPE} == {
        "pooling": "cls", "target_modules": ["query", "value"], "lora_layers": None, "head_learning_rate": None,
        "label_smoothing": 0.0, "tfidf_weight": 0.0, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
        "validation_size": 0}
    assert bench.lorafit_overrides("qlora-8bit", args, tmp_path / "m", data, tmp_path)["quantize"] == "8bit"
    default = bench.lorafit_overrides("lorafit", args, tmp_path / "m", data, tmp_path)
    assert not set(bench.PEER_RECIPE) & set(default) and "quantize" not in default
    assert bench.predict_cli_command("RUN", Path("in.csv"), Path("out.csv"))[-8:] == [
        "predict", "RUN", "-i", "in.csv", "-o", "out.csv", "--device", "cuda"]


def test_tiny_mode_gives_the_whole_table(load_bench, tmp_path):
    """On this CPU the QLoRA rows are skipped with their reason; on a GPU with bitsandbytes they run too."""
    import torch

    bench = load_bench("gpu")
    report = tmp_path / "report"  # the GPU command's $OUT: only what comes back goes there
    results = bench.main(["--tiny", "--out", str(tmp_path / "work"), "--report-dir", str(report)])
    cuda = torch.cuda.is_available()
    rows = {r["row"]: r for r in results["training"]}
    assert list(rows) == ["peer", "lorafit-peer", "lorafit", "qlora-4bit", "qlora-8bit"]
    skipped = bench.qlora_unavailable("4bit")
    ran = ["peer", "lorafit-peer", "lorafit"] + (["qlora-4bit", "qlora-8bit"] if skipped is None else [])
    for name in ran:
        r = rows[name]
        assert "error" not in r, r
        assert r["samples_per_s"] > 0 and r["train_s"] > 0 and 0 <= r["accuracy"] <= 1 and r["mfu"] > 0
        assert (r["peak_gpu_gb"] is None) == (not cuda)  # GPU memory only where there is a GPU
    if skipped is not None:
        assert rows["qlora-4bit"] == {"row": "qlora-4bit", "note": skipped}
        skipped_8bit = bench.qlora_unavailable("8bit")  # each row gives its own mode's reason
        assert "quantize=8bit" in skipped_8bit and "quantize=4bit" not in skipped_8bit
        assert f"| qlora-8bit | – | – | – | – | – | {skipped_8bit} |" in (report / "results.md").read_text()
    assert rows["peer"]["train_samples"] == rows["lorafit-peer"]["train_samples"] == 64  # the same rows
    recorded = yaml.safe_load((Path(rows["lorafit-peer"]["run"]) / "config.yaml").read_text())
    assert recorded["model"]["pooling"] == "cls" and recorded["model"]["target_modules"] == ["query", "value"]
    assert recorded["model"]["lora_layers"] is None and recorded["model"]["lora_dropout"] == 0.1
    assert recorded["model"]["tfidf_weight"] == 0 and recorded["train"]["head_learning_rate"] is None
    contenders = ["pipeline", "hand-loop", "overlap", "lorafit-api"] + (["lorafit-cli"] if cuda else [])
    assert [(r["contender"], r.get("texts_per_s", 0) > 0) for r in results["inference"]] == [
        (c, True) for c in contenders]
    table = (report / "results.md").read_text()
    assert table.startswith(f"GPU: {bench.device_name()}\n")
    assert json.loads((report / "results.json").read_text())["block_params"] == 2 * (4 * 64 * 64 + 2 * 64 * 128)
    # where the time goes: the recipe's steps for both lorafit rows and the two stages of prediction, profiled
    profile = {r["part"]: r for r in results["profile"]}
    assert list(profile) == ["train lorafit-peer", "train lorafit", "predict 64 texts"], results["profile"]
    for part in profile.values():
        assert "error" not in part, part
        # the CUDA runtime's calls exist only on a GPU: none on a CPU, and some on a GPU
        assert part["wall_ms"] > 0 and (part["syncs"] > 0) == cuda and (part["launches"] > 0) == cuda
        assert (part["gpu_busy_share"] is None) == (not cuda)  # device intervals only where there is a device
    assert profile["train lorafit-peer"]["units"] == 4 and profile["predict 64 texts"]["per"] == "batch of 32"
    assert 0 < profile["predict 64 texts"]["tokenize_s"] < profile["predict 64 texts"]["total_s"]
    assert "| train lorafit | step |" in table
    top = (report / "profile.txt").read_text()
    assert "## train lorafit-peer (per step)" in top and "aten::mm" in top  # the profiler's own op table
    for trace in ("trace-train-lorafit-peer", "trace-train-lorafit", "trace-predict"):
        assert "traceEvents" in json.loads(gzip.decompress((report / f"{trace}.json.gz").read_bytes()))
    assert sorted(p.name for p in report.iterdir()) == [
        "profile.txt", "results.json", "results.md", "trace-predict.json.gz", "trace-train-lorafit-peer.json.gz",
        "trace-train-lorafit.json.gz"]  # within the device tool's 8 files, with the log


def test_a_run_stopped_midway_keeps_the_rows_it_measured(load_bench, tmp_path, monkeypatch):
    """The device's time limit kills the run where it is (SIGKILL: no handler, no cleanup runs): every finished row
    is already in results.md/.json when the next one starts."""
    bench = load_bench("gpu")
    measured = bench.run_lorafit
    report = tmp_path / "report"

    def stopped_at_the_second_row(row, *args):
        if row == "lorafit":  # what is on disk at this moment is what a kill here leaves
            on_disk = json.loads((report / "results.json").read_text())
            assert [r["row"] for r in on_disk["training"]] == ["lorafit-peer"]
            raise KeyboardInterrupt  # stands in for the kill: the run ends here
        return measured(row, *args)

    monkeypatch.setattr(bench, "run_lorafit", stopped_at_the_second_row)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--tiny", "--out", str(tmp_path / "work"), "--report-dir", str(report),
                    "--only", "lorafit-peer,lorafit"])
    saved = json.loads((report / "results.json").read_text())
    assert [r["row"] for r in saved["training"]] == ["lorafit-peer"] and saved["training"][0]["samples_per_s"] > 0
    assert "| lorafit-peer | " in (report / "results.md").read_text()


def test_gpu_busy_time_is_the_union_of_the_device_intervals(load_bench):
    """Overlapping kernels (two streams) count once; the gaps between them are the GPU waiting."""
    from torch.autograd import DeviceType

    bench = load_bench("gpu")

    class Interval:
        def __init__(self, start, end):
            self.start, self.end = start, end

    class Event:
        def __init__(self, name, start, end, device_type=DeviceType.CUDA):
            self.name, self.time_range, self.device_type = name, Interval(start, end), device_type

    class Average:
        def __init__(self, key, count):
            self.key, self.count = key, count

    class Averages(list):
        def table(self, **kwargs):
            return "the op table"

    class Profile:
        def events(self):
            return [Event("gemm", 0, 400), Event("gemm", 300, 500),
                    Event("Memcpy HtoD (Pageable -> Device)", 900, 1000), Event("aten::mm", 0, 2000, DeviceType.CPU)]

        def key_averages(self):
            return Averages([Average("cudaLaunchKernel", 4), Average("cudaStreamSynchronize", 2),
                             Average("aten::mm", 4)])

    summary = bench.profile_summary(Profile(), wall_s=0.002, units=2)
    # busy 0-500 and 900-1000 us: 600 us of 2,000, i.e. 0.3 ms a step over 2 steps
    assert summary["gpu_busy_ms"] == 0.3 and summary["gpu_busy_share"] == 0.3
    assert summary["syncs"] == 1 and summary["launches"] == 2 and summary["pageable_copies"] == 0.5
    assert summary["wall_ms"] == 1.0 and summary["top_ops"] == "the op table"


def test_the_hand_loops_give_the_models_own_labels(load_bench, tmp_path):
    """The hand-written inference contenders sort, pad and scatter back: their labels are the plain forward's, for
    the whole list at once and in chunks tokenized ahead (3 chunks, the last one short, each put at its offset)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

    bench = load_bench("gpu")
    tokenizer_dir = bench.tokenizer_dir(None)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    # large random weights, so that the texts get different labels and a row put back in the wrong place shows
    config = BertConfig(vocab_size=len(tok), num_labels=4, initializer_range=1.0, **bench.TINY_SHAPE)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    texts = ["short", "a somewhat longer text about markets", "sports " * 30, "science and technology news", "x",
             "the central bank raised rates again", "goal in the last minute", "new chip announced"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():  # one text at a time: no padding at all
        expected = [int(model(**tok([t], truncation=True, max_length=16, return_tensors="pt")).logits.argmax(-1))
                    for t in texts]
    assert len(set(expected)) >= 3
    labels = bench.hand_loop(str(tmp_path), batch_size=3, max_length=16)(texts)
    assert labels.tolist() == expected
    labels = bench.hand_loop(str(tmp_path), batch_size=2, max_length=16, chunk=3)(texts)
    assert labels.tolist() == expected
