"""Inference from a run: classify / predict / evaluate through the CLI, every input format, pickle refused without
the flag, merge loadable without lorafit, ONNX export agreeing with the run."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import lorafit
from lorafit.cli import app

from conftest import SAMPLE_TEXTS, CountedTokenizer, encoder_alone, tiny_config, write_table

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def mean_run(tiny_model_dir, tmp_path_factory):
    """A tiny BERT LoRA run with mean pooling (lorafit's own head)."""
    out = tmp_path_factory.mktemp("mean-run")
    return lorafit.train(tiny_config(tiny_model_dir("bert"), out, pooling="mean", epochs=1, max_train_samples=120,
                                     max_eval_samples=40)).path


@pytest.fixture(scope="module")
def labelled(tiny_run):
    """The run's test split as (texts, label names)."""
    df = pd.read_csv(tiny_run / "test_predictions.csv", keep_default_na=False)
    return df["text"].tolist(), df["label"].tolist()


def test_classify_human_and_json(tiny_run):
    res = invoke("classify", tiny_run, SAMPLE_TEXTS[0], SAMPLE_TEXTS[1], "--json", "--backend", "torch")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    clf = lorafit.load(tiny_run, backend="torch")
    assert [r["label"] for r in rows] == list(clf.predict(SAMPLE_TEXTS[:2]))
    for r in rows:
        assert set(r["probabilities"]) == set(clf.classes_)
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-4
    res = invoke("classify", tiny_run, SAMPLE_TEXTS[2], "--backend", "torch")
    assert res.exit_code == 0 and SAMPLE_TEXTS[2][:30] in res.stdout
    assert res.stdout.split()[0] == clf.predict(SAMPLE_TEXTS[2:3])[0]  # "<label> <probability>  <text>"


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet", "txt", "pkl"])
def test_predict_formats(tiny_run, labelled, tmp_path, fmt):
    texts = labelled[0][:20]
    df = pd.DataFrame({"ID": [f"q{i}" for i in range(len(texts))], "text": texts})
    src = tmp_path / f"in.{fmt}"
    write_table(df, src, fmt)
    out = tmp_path / "preds.csv"
    extra = ["--allow-pickle"] if fmt == "pkl" else []
    res = invoke("predict", tiny_run, "--input", src, "--output", out, "--backend", "torch", *extra)
    assert res.exit_code == 0, res.output
    preds = pd.read_csv(out)
    assert list(preds.columns) == ["ID", "Label"]
    expected_ids = list(range(len(texts))) if fmt == "txt" else list(df["ID"])
    assert list(preds["ID"]) == expected_ids
    assert list(preds["Label"]) == list(lorafit.load(tiny_run, backend="torch").predict(texts))


def test_pickle_needs_flag_and_dataset_pickle_reads(tiny_run, labelled, tmp_path):
    import datasets

    texts = labelled[0][:10]
    src = tmp_path / "board.pkl"
    with open(src, "wb") as f:
        pickle.dump(datasets.Dataset.from_dict({"text": texts}), f)
    out = tmp_path / "preds.csv"
    res = invoke("predict", tiny_run, "--input", src, "--output", out)
    assert res.exit_code == 2 and "--allow-pickle" in res.output and not out.exists()
    res = invoke("predict", tiny_run, "--input", src, "--output", out, "--allow-pickle", "--labels", "id",
                 "--probabilities", "--backend", "torch")
    assert res.exit_code == 0, res.output
    preds = pd.read_csv(out)
    assert list(preds["ID"]) == list(range(10))
    clf = lorafit.load(tiny_run, backend="torch")
    probs = clf.predict_proba(texts)
    assert list(preds["Label"]) == probs.argmax(-1).tolist()
    np.testing.assert_allclose(preds[[f"prob_{c}" for c in clf.classes_]].to_numpy(), probs, atol=1e-5)


def test_predict_errors_name_the_problem(tiny_run, tmp_path):
    src = tmp_path / "in.csv"
    pd.DataFrame({"sentence": ["a b c"]}).to_csv(src, index=False)
    res = invoke("predict", tiny_run, "--input", src, "--output", tmp_path / "p.csv")
    assert res.exit_code == 2 and "no column 'text'" in res.output and "sentence" in res.output
    res = invoke("predict", tiny_run, "--input", src, "--output", tmp_path / "p.csv", "--text-column", "sentence",
                 "--backend", "onnx")
    assert res.exit_code == 2 and "lorafit export" in res.output


def test_evaluate_matches_training_metrics(tiny_run, labelled, tmp_path):
    texts, labels = labelled
    src = tmp_path / "test.jsonl"
    pd.DataFrame({"text": texts, "label": labels}).to_json(src, orient="records", lines=True)
    res = invoke("evaluate", tiny_run, "-i", src, "-o", tmp_path / "eval", "--json", "--backend", "torch")
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)
    trained = json.loads((tiny_run / "test_metrics.json").read_text())
    assert metrics["n"] == trained["n"]
    assert metrics["accuracy"] == pytest.approx(trained["accuracy"])
    assert metrics["f1_macro"] == pytest.approx(trained["f1_macro"])
    assert metrics["confusion_matrix"] == trained["confusion_matrix"]
    res = invoke("evaluate", tiny_run, "--data", src, "-o", tmp_path / "eval2", "--backend", "torch")  # older flag
    assert res.exit_code == 0 and "accuracy" in res.stdout


def test_evaluate_writes_the_reports_metrics_plots_and_errors(run_copy, labelled, tmp_path):
    """An evaluation directory, by default inside the run: what the run report shows for test, for any file."""
    texts, labels = labelled
    src = tmp_path / "news.test.csv"
    pd.DataFrame({"text": texts, "label": labels}).to_csv(src, index=False)
    res = invoke("evaluate", run_copy, "-i", src, "--backend", "torch")
    assert res.exit_code == 0, res.output
    out = run_copy / "evaluations" / "news"
    metrics = json.loads((out / "metrics.json").read_text())
    trained = json.loads((run_copy / "test_metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(trained["accuracy"]) and metrics["data"] == str(src)
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions["text"]) == texts and len(predictions) == len(texts)
    assert (predictions["label"] != predictions["predicted"]).sum() == sum(
        trained["confusion_matrix"][i][j] for i in range(4) for j in range(4) if i != j)
    assert {p.name for p in (out / "plots").iterdir()} == {"confusion_counts.png", "confusion_normalised.png"}
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "Most confused class pairs" in page and "Per-class metrics" in page
    assert page.index("Confusion matrix") < page.index("Most confused class pairs") < page.index("Per-class metrics")


def test_merge_cls_loads_with_auto_class(tiny_run, labelled, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "merged"
    res = invoke("merge", tiny_run, "-o", out)
    assert res.exit_code == 0 and "AutoModelForSequenceClassification" in res.output
    texts = labelled[0]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in model.named_parameters())
    with torch.inference_mode():
        logits = model(**tok(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")).logits
    labels = [model.config.id2label[i] for i in logits.argmax(-1).tolist()]
    assert labels == list(encoder_alone(lorafit.load(tiny_run, backend="torch")).predict(texts))
    assert "it is the encoder alone" in res.output.replace("\n", " ")
    assert invoke("merge", tiny_run, "-o", out).exit_code == 2  # no silent overwrite


def test_merge_mean_pooling_recipe(mean_run, labelled, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "merged-mean"
    res = invoke("merge", mean_run, "-o", out)
    assert res.exit_code == 0 and "mean pooling" in res.output and "README.md" in res.output
    assert "head.safetensors" in (out / "README.md").read_text()
    texts = labelled[0]
    # the README's recipe
    tok, enc = AutoTokenizer.from_pretrained(out), AutoModel.from_pretrained(out).eval()
    head = load_file(out / "head.safetensors")
    x = tok(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")
    with torch.inference_mode():
        h, m = enc(**x).last_hidden_state, x["attention_mask"].unsqueeze(-1).float()
    labels = [enc.config.id2label[i] for i in (((h * m).sum(1) / m.sum(1)) @ head["weight"].T + head["bias"]).argmax(-1).tolist()]
    assert labels == list(encoder_alone(lorafit.load(mean_run, backend="torch")).predict(texts))


@pytest.mark.parametrize("which", ["tiny_run", "mean_run"])
def test_onnx_export_agrees(which, request, labelled, tmp_path):
    run = request.getfixturevalue(which)
    res = invoke("export", run, "--format", "onnx", "--int8")
    assert res.exit_code == 0, res.output
    assert "onnx-int8: labels agree with torch on" in res.output
    report = json.loads((run / "export" / "export.json").read_text())
    assert report["check"]["onnx"]["agreement"] == 1.0
    assert report["check"]["onnx"]["max_abs_logit_diff"] < 1e-3
    assert 0 <= report["check"]["onnx-int8"]["agreement"] <= 1
    texts = labelled[0]
    ref = lorafit.load(run, backend="torch")
    fp32 = lorafit.load(run, backend="onnx")
    assert fp32.backend.name == "onnx"
    np.testing.assert_allclose(fp32.decision_function(texts), ref.decision_function(texts), atol=1e-3)
    assert list(fp32.predict(texts)) == list(ref.predict(texts))
    assert lorafit.load(run).backend.name == "onnx-int8"  # auto takes the export
    res = invoke("classify", run, SAMPLE_TEXTS[0], "--json", "--backend", "onnx")
    assert res.exit_code == 0 and json.loads(res.stdout)[0]["label"] == ref.predict(SAMPLE_TEXTS[:1])[0]
    # re-export without --int8 drops the stale int8 file, so auto falls back to fp32 ONNX
    assert invoke("export", run, "--format", "onnx").exit_code == 0
    assert not (run / "export" / "model.int8.onnx").exists() and lorafit.load(run).backend.name == "onnx"
    import shutil

    shutil.rmtree(run / "export")  # leave the shared run as other tests expect it


def test_bf16_backend_runs(tiny_run, labelled):
    clf = lorafit.load(tiny_run, backend="torch", precision="bf16")
    assert clf.backend.name == "torch-bf16"
    ref = lorafit.load(tiny_run, backend="torch")
    agree = (clf.predict(labelled[0]) == ref.predict(labelled[0])).mean()
    assert agree > 0.8


def test_prediction_tokenizes_each_text_once(tiny_run):
    """Long texts too: prediction needs no untruncated lengths, so it makes one truncating pass (data.encode)."""
    clf = lorafit.load(tiny_run, backend="torch")
    texts = [SAMPLE_TEXTS[0] * 40, SAMPLE_TEXTS[1]]  # the first is far longer than the run's max_length
    assert len(clf.tokenizer(texts[:1])["input_ids"][0]) > clf.max_length
    clf.tokenizer = counted = CountedTokenizer(clf.tokenizer)
    assert clf.predict_proba(texts).shape == (2, len(clf.classes_)) and counted.calls == [2]
