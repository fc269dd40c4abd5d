"""The model card model/README.md: Hub format (parsed back with huggingface_hub), numbers equal the run's, and
its plain-PEFT snippet runs and agrees with lorafit."""

import json
import re

import pytest
from huggingface_hub import ModelCard

from conftest import encoder_alone
from lorafit import card


def test_training_writes_a_hub_model_card(tiny_run):
    parsed = ModelCard.load(tiny_run / "model" / "README.md")
    test = json.loads((tiny_run / "test_metrics.json").read_text())
    meta = parsed.data
    assert meta.pipeline_tag == "text-classification"
    assert meta.library_name == "peft"
    assert meta.base_model is None  # a local directory is not a Hub repo, so the card does not claim one
    assert meta.datasets == [card.AG_NEWS_HUB_ID]
    results = {(r.metric_type, (r.metric_args or {}).get("average")): r.metric_value for r in meta.eval_results}
    assert results[("accuracy", None)] == test["accuracy"]
    assert results[("f1", "macro")] == test["f1_macro"]
    assert results[("f1", "weighted")] == test["f1_weighted"]
    assert all(r.dataset_split == "test" for r in meta.eval_results)
    for name, row in test["per_class"].items():
        assert re.search(rf"^\| {re.escape(name)} \| .* \| {row['support']} \|$", parsed.text, re.M), name


def test_card_names_the_hub_base_and_its_license(run_copy):
    cfg = (run_copy / "config.yaml").read_text()
    model = re.search(r"^  model: (.+)$", cfg, re.M).group(1)
    (run_copy / "config.yaml").write_text(cfg.replace(f"  model: {model}", "  model: embedded:all-MiniLM-L6-v2"))
    path = card.write_model_card(run_copy)
    meta = ModelCard.load(path).data
    assert meta.base_model == card.EMBEDDED_HUB_ID
    assert meta.license == "apache-2.0"  # read from the bundled model's own card


def test_cli_report_rewrites_the_card(run_copy):
    from typer.testing import CliRunner

    from lorafit.cli import app

    (run_copy / "model" / "README.md").unlink()
    result = CliRunner().invoke(app, ["report", str(run_copy)])
    assert result.exit_code == 0, result.output
    assert ModelCard.load(run_copy / "model" / "README.md").data.pipeline_tag == "text-classification"


def test_plain_peft_snippet_in_the_card_matches_lorafit(tiny_run):
    import lorafit

    text = (tiny_run / "model" / "README.md").read_text()
    snippet = re.search(r"With plain PEFT and Transformers:\n\n```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    exec(snippet.replace('"path/to/run"', repr(str(tiny_run))), scope)  # the card's own code, as a user runs it
    import numpy as np
    import torch

    texts, clf = scope["texts"], encoder_alone(lorafit.load(tiny_run))
    assert "give the encoder alone" in text.replace("\n", " ")
    assert scope["labels"] == list(clf.predict(texts))
    with torch.inference_mode():
        logits = scope["model"](**scope["x"]).logits.numpy()
    np.testing.assert_allclose(logits, clf.decision_function(texts), atol=1e-4)


@pytest.mark.parametrize("pooling, method, heading", [
    ("mean", "lora", "With plain PEFT and Transformers"),
    ("cls", "full", "With plain Transformers"),
])
def test_plain_snippets_of_other_methods_run_and_agree(pooling, method, heading, tiny_model_dir, tmp_path):
    import numpy as np
    import torch

    import lorafit
    from conftest import tiny_config

    run = lorafit.train(tiny_config(tiny_model_dir("bert"), tmp_path, pooling=pooling, method=method, epochs=1,
                                    max_train_samples=32, max_eval_samples=16))
    text = (run.path / "model" / "README.md").read_text()
    assert ModelCard.load(run.path / "model" / "README.md").data.library_name == ("peft" if method == "lora" else "transformers")
    snippet = re.search(rf"{heading}[^\n]*\n\n```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    exec(snippet.replace('"path/to/run"', repr(str(run.path))), scope)
    clf = encoder_alone(lorafit.load(run.path))
    assert scope["labels"] == list(clf.predict(scope["texts"]))
    with torch.inference_mode():
        out = scope["model"](**scope["x"])
    logits = (out.logits if hasattr(out, "logits") else out).numpy()
    np.testing.assert_allclose(logits, clf.decision_function(scope["texts"]), atol=1e-4)
