"""lorafit distill: the loss mix, the cached teacher logits, layer dropping, students served through predict,
a student with another tokenizer, and every bad input as one line with exit code 2."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from lorafit.cli import app
from lorafit.distill import (CACHE_DIR, IGNORE_LABEL, augment_texts, check_teacher, distillation_loss,
                             teacher_logits)
from lorafit.errors import LorafitError


# --- the loss -----------------------------------------------------------------------------------------------
def test_loss_mix_known_numbers():
    # teacher/T = [ln 3, 0] -> p = [0.75, 0.25]; student [0, 0] -> q = [0.5, 0.5]
    # KL(p || q) = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.130812; x T^2 = 0.523248; CE(label 0) = ln 2
    student, teacher, labels = torch.zeros(1, 2), torch.tensor([[2 * math.log(3), 0.0]]), torch.tensor([0])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    loss = distillation_loss(student, labels, teacher, temperature=2.0, soft_weight=0.5, hard_weight=2.0)
    assert loss.item() == pytest.approx(2.0 * math.log(2) + 0.5 * 4 * kl, abs=1e-5)
    # an unlabelled row (student = teacher) adds nothing to the hard mean and halves the soft batch mean
    loss2 = distillation_loss(torch.zeros(2, 2), torch.tensor([0, IGNORE_LABEL]),
                              torch.cat([teacher, torch.zeros(1, 2)]), 2.0, 0.5, 2.0)
    assert loss2.item() == pytest.approx(2.0 * math.log(2) + 0.5 * 4 * kl / 2, abs=1e-5)


def test_loss_without_soft_weight_is_plain_cross_entropy():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(6, 4), torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 0])
    for smoothing in (0.0, 0.1):
        assert distillation_loss(student, labels, teacher, 3.0, 0.0, 1.0, smoothing).item() == pytest.approx(
            F.cross_entropy(student, labels, label_smoothing=smoothing).item(), abs=1e-6)
    # the same teacher and student: the soft term is zero at any temperature
    assert distillation_loss(student, labels, student, 5.0, 1.0, 0.0).item() == pytest.approx(0.0, abs=1e-6)
    # unlabelled rows are masked out of the hard term, with label smoothing too
    masked = labels.clone()
    masked[3:] = IGNORE_LABEL
    assert distillation_loss(student, masked, teacher, 2.0, 0.0, 1.0, 0.1).item() == pytest.approx(
        F.cross_entropy(student[:3], labels[:3], label_smoothing=0.1).item(), abs=1e-6)


# --- augmented texts -----------------------------------------------------------------------------------------
def test_augmented_texts_are_fixed_by_the_seed_and_made_of_the_training_words():
    texts = [f"title{i} alpha{i} beta{i} gamma{i} delta{i} epsilon{i} zeta{i} eta{i}" for i in range(30)] + ["short"]
    copies = augment_texts(texts, 2, seed=5)
    assert len(copies) == 2 * len(texts) and copies == augment_texts(texts, 2, seed=5)
    assert copies != augment_texts(texts, 2, seed=6) and augment_texts(texts, 0, seed=5) == []
    spliced = 0
    for k, copy in enumerate(copies):
        i, words = k % len(texts), copy.split()
        own = texts[i].split()
        assert words and (copy != texts[i] or len(own) == 1)  # every copy is altered (one word can only stay)
        assert words[0] in own or words[0] == own[0], copy
        foreign = [w for w in words if w not in own]
        if foreign:  # a splice: the first part is the text's own, the rest one other text's tail, in order
            spliced += 1
            other = next(t.split() for t in texts if foreign[0] in t.split())
            assert words[:len(words) - len(foreign)] == own[:len(words) - len(foreign)]
            assert foreign == other[len(other) - len(foreign):]
        else:  # words dropped or a span kept: the text's own words in their order
            assert all(own.index(a) < own.index(b) for a, b in zip(words, words[1:]))
    assert 0 < spliced < len(copies)  # every edit is drawn


# --- the cache ----------------------------------------------------------------------------------------------
def test_teacher_logits_are_computed_once_and_keyed_by_text(run_copy, monkeypatch):
    texts = ["Stocks fall as oil climbs", "Federer wins the final", "New chip is faster"]
    first, info = teacher_logits(run_copy, texts)
    assert not info["cache_reused"] and first.shape == (3, 4)
    cache = run_copy / CACHE_DIR
    assert [p.suffix for p in cache.iterdir()] == [".npz"]

    import lorafit.predict

    def no_model(*args, **kwargs):
        raise AssertionError("the teacher model was loaded although its logits are cached")

    monkeypatch.setattr(lorafit.predict, "load", no_model)
    again, info = teacher_logits(run_copy, texts)
    assert info["cache_reused"] and np.array_equal(first, again)
    monkeypatch.undo()

    changed, info = teacher_logits(run_copy, texts[:2] + ["A different text"])  # other texts: another key
    assert not info["cache_reused"] and len(list(cache.iterdir())) == 2
    assert np.allclose(changed[:2], first[:2], atol=1e-5)
    # a cache file whose key does not match its name (damaged, copied) is recomputed, never used
    path = next(p for p in cache.iterdir() if p.name == info["cache_file"].split("/")[-1])
    shutil.copy(next(p for p in cache.iterdir() if p != path), path)
    _, info = teacher_logits(run_copy, texts[:2] + ["A different text"])
    assert not info["cache_reused"]


def test_bf16_teacher_logits_have_their_own_cache_entry(run_copy):
    texts = ["Stocks fall as oil climbs", "Federer wins the final", "New chip is faster"]
    fp32, info32 = teacher_logits(run_copy, texts)
    bf16, info16 = teacher_logits(run_copy, texts, precision="bf16")
    assert (info32["teacher_backend"], info16["teacher_backend"]) == ("torch", "torch-bf16")
    assert not info16["cache_reused"] and info16["cache_file"] != info32["cache_file"]
    # bf16 keeps 8 bits of mantissa: close to fp32, and not the same numbers (the fp32 entry was not reused)
    assert np.allclose(bf16, fp32, atol=0.1) and not np.array_equal(bf16, fp32)
    assert teacher_logits(run_copy, texts, precision="bf16")[1]["cache_reused"]


def test_an_exported_teacher_teaches_in_fp32_never_int8(run_copy):
    from lorafit.export import export_onnx

    texts = ["Stocks fall as oil climbs", "Federer wins the final", "New chip is faster"]
    torch_fp32, _ = teacher_logits(run_copy, texts)
    export_onnx(run_copy, int8=True)
    onnx, info = teacher_logits(run_copy, texts)  # the export gives a new key: computed with ONNX fp32
    assert info["teacher_backend"] == "onnx" and not info["cache_reused"]
    assert np.allclose(onnx, torch_fp32, atol=1e-4)
    # a bf16 student gets the PyTorch model under bf16 autocast, not the export
    assert teacher_logits(run_copy, texts, precision="bf16")[1]["teacher_backend"] == "torch-bf16"

    # without its backbone, the exported teacher still teaches fp32 students (from the export) but not bf16 ones
    _break("backbone", run_copy, run_copy.parent)
    check_teacher(run_copy, precision="fp32")
    with pytest.raises(LorafitError, match="backbone .* cannot be found"):
        check_teacher(run_copy, precision="bf16")


# --- layer dropping -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_layer_dropping_keeps_the_first_k_pretrained_layers(tiny_model_dir, family):
    from transformers import AutoModel

    from lorafit.config import ModelConfig
    from lorafit.model import build_base

    path = tiny_model_dir(family)
    full = AutoModel.from_pretrained(path)
    student = build_base(ModelConfig(model=str(path), num_layers=1), 4, ["a", "b", "c", "d"])
    layers = student.encoder.transformer.layer if family == "distilbert" else student.encoder.encoder.layer
    full_layers = full.transformer.layer if family == "distilbert" else full.encoder.layer
    assert len(layers) == 1 and len(full_layers) == 2
    for (name, p), (_, q) in zip(layers[0].state_dict().items(), full_layers[0].state_dict().items()):
        assert torch.equal(p, q), name


# --- students end to end ------------------------------------------------------------------------------------
def _distill(*args):
    result = CliRunner().invoke(app, ["distill", *map(str, args)])
    return result.exit_code, result.output


def test_student_run_is_a_normal_run_served_through_predict(tiny_run, tmp_path):
    unlabelled = tmp_path / "unlabelled.txt"
    unlabelled.write_text("Oil prices climb again\nThe match ended in a draw\nA new phone ships\n", encoding="utf-8")
    code, out = _distill(tiny_run, "--student-layers", 1, "--max-steps", 4, "--temperature", 3, "--hard-weight", 1,
                         "--unlabelled-file", unlabelled, "--augment-copies", 1, "--output-dir", tmp_path / "students",
                         "--run-name", "s1", "--seed", 7)
    assert code == 0, out
    student = tmp_path / "students" / "s1"
    info = json.loads((student / "run.json").read_text())
    d = info["distillation"]
    assert info["status"] == "completed" and d["student_layers"] == 1 and d["teacher_layers"] == 2
    train = info["data_sizes"]["train"]
    assert d["unlabelled_rows"] == 3 and d["augmented_rows"] == train
    assert d["teacher_test_metrics"]["accuracy"] > 0 and d["student_texts_per_s"] > 0
    # validation and test are exactly the teacher's although the student's seed differs
    assert json.loads((student / "splits.json").read_text()) == json.loads((tiny_run / "splits.json").read_text())
    with np.load(d["cache_file"], allow_pickle=False) as cached:
        assert cached["logits"].shape == (train + 3 + train, 4)
    assert "Distillation: teacher vs student" in (student / "report.md").read_text()

    texts = tmp_path / "texts.txt"
    texts.write_text("Stocks rally\nFederer wins\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["predict", str(student), "--input", str(texts), "--output", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == "ID,Label"

    import lorafit  # a second student (another seed) reuses the teacher's cached logits

    again = lorafit.distill(tiny_run, student_layers=1, max_steps=2, unlabelled_file=str(unlabelled), seed=8,
                            augment_copies=1, output_dir=str(tmp_path / "students"), run_name="s2")
    assert again.info and json.loads((again.path / "run.json").read_text())["distillation"]["cache_reused"]


def test_student_with_another_tokenizer(tiny_run, tiny_model_dir, tmp_path):
    """The cache is keyed by text, not token ids: a RoBERTa (BPE) student learns from a BERT (WordPiece) teacher."""
    roberta = tiny_model_dir("roberta")
    code, out = _distill(tiny_run, "--student", roberta, "--pooling", "mean", "--max-steps", 3,
                         "--output-dir", tmp_path / "students", "--run-name", "bpe")
    assert code == 0, out
    student = tmp_path / "students" / "bpe"
    d = json.loads((student / "run.json").read_text())["distillation"]
    assert json.loads((student / "tokenizer" / "tokenizer_config.json").read_text())["tokenizer_class"] != \
        json.loads((tiny_run / "tokenizer" / "tokenizer_config.json").read_text())["tokenizer_class"]
    losses = [r["loss"] for r in map(json.loads, (student / "metrics.jsonl").read_text().splitlines())
              if r["type"] == "train"]
    assert losses and all(math.isfinite(x) for x in losses) and d["teacher_backbone"] != str(roberta)


# --- bad input: one line, exit code 2, nothing written --------------------------------------------------------
def _edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _break(case, run, tmp_path):
    if case == "not completed":
        _edit_json(run / "run.json", status="interrupted")
    elif case == "no weights":
        shutil.rmtree(run / "model")
    elif case == "labels":
        (run / "labels.json").write_text(json.dumps(["a", "b", "c", "d"]))
    elif case == "backbone":
        text = (run / "config.yaml").read_text()
        (run / "config.yaml").write_text(text.replace(f"model: {json.loads((run / 'run.json').read_text())['backbone']['model']}",
                                                      f"model: {tmp_path}/gone/backbone"))


BAD = [
    ("not completed", [], "not 'completed'"),
    ("no weights", [], "no final weights"),
    ("labels", [], "labels"),
    ("backbone", [], "cannot be found"),
    (None, ["--student-layers", "0"], "num_layers"),
    (None, ["--student-layers", "9"], "more than the 2 encoder layers"),
    (None, ["--unlabelled-file", "{tmp}/u.csv"], "no text column 'text'"),
    (None, ["--unlabelled-file", "{tmp}/missing.csv"], "missing.csv"),
    (None, ["--soft-weight", "0", "--hard-weight", "0"], "nothing to learn"),
]


@pytest.mark.parametrize("case,flags,needle", BAD, ids=[b[2] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(case, flags, needle, run_copy, tmp_path):
    (tmp_path / "u.csv").write_text("body\nsome text\n", encoding="utf-8")
    _break(case, run_copy, tmp_path)
    flags = [f.format(tmp=tmp_path) for f in flags]
    code, out = _distill(run_copy, *flags, "--epochs", 1, "--output-dir", tmp_path / "students")
    assert code == 2, out
    lines = [line for line in out.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in out.replace("\n", " "), out
    assert not (tmp_path / "students").exists()


def test_the_students_data_is_the_teachers(tiny_run, tmp_path):
    import lorafit
    from lorafit.distill import student_config

    with pytest.raises(lorafit.LorafitError, match="max_train_samples cannot change"):
        lorafit.distill(tiny_run, max_train_samples=10, output_dir=str(tmp_path / "students"))
    assert not (tmp_path / "students").exists()
    result = CliRunner().invoke(app, ["distill", str(tiny_run), "--max-train-samples", "10"])
    assert result.exit_code == 2 and "No such option" in result.output  # not offered on the command line
    cfg = student_config(tiny_run, seed=5, max_length=32)
    teacher = lorafit.Config.from_yaml(tiny_run / "config.yaml")
    assert cfg.data_seed == teacher.data_seed and cfg.train.seed == 5 and cfg.data.max_length == 32
    assert cfg.output.run_name != teacher.output.run_name and cfg.distill.teacher_run == str(tiny_run)


def test_killed_student_resumes_to_the_uninterrupted_result(tiny_run, tmp_path):
    """SIGKILL mid-run, then `lorafit train --resume`: the teacher's logits come back from its cache and the
    resumed student ends with the uninterrupted student's weights and metrics (test_resume's checks)."""
    import signal
    import sys

    import lorafit
    from lorafit.distill import student_config
    from test_resume import assert_same_run, checkpoint_exists, kill_when

    values = dict(epochs=1, checkpoint_every=3, lora_dropout=0.1, num_threads=1, student_layers=1)
    lorafit.train(student_config(tiny_run, output_dir=str(tmp_path / "ref"), run_name="run", **values))
    cfg = student_config(tiny_run, output_dir=str(tmp_path / "killed"), run_name="run", **values)
    cfg.to_yaml(tmp_path / "student.yaml")
    run = tmp_path / "killed" / "run"
    killed = kill_when([sys.executable, "-m", "lorafit.cli", "train", str(tmp_path / "student.yaml")],
                       checkpoint_exists(run, 6))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    info = json.loads((run / "run.json").read_text())
    assert info["resumed"] and info["distillation"]["cache_reused"]
    assert_same_run(tmp_path / "ref" / "run", run)
