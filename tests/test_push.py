"""`lorafit push`: the staged folder holds what a repo needs (no network), offline is one line and exit 2."""

import json

from huggingface_hub import ModelCard
from typer.testing import CliRunner

from lorafit import push
from lorafit.cli import app


def test_staged_folder_holds_model_tokenizer_labels_config_and_card(tiny_run, tmp_path):
    staged = push.stage(tiny_run, tmp_path / "repo")
    top = sorted(p.name for p in staged.iterdir())
    assert top == sorted([*push.PUSHED_FILES, "README.md"])
    assert (staged / "model" / "adapter_model.safetensors").is_file()
    assert (staged / "model" / "adapter_config.json").is_file()
    assert not (staged / "model" / "README.md").exists()  # one card, at the root
    assert any((staged / "tokenizer").iterdir())
    assert json.loads((staged / "labels.json").read_text()) == json.loads((tiny_run / "labels.json").read_text())
    card = ModelCard.load(staged / "README.md")
    assert card.data.pipeline_tag == "text-classification"
    # the staged folder is a run directory lorafit.load reads (as after snapshot_download of the pushed repo)
    import lorafit

    texts = ["Stocks fall as oil prices climb"]
    assert list(lorafit.load(staged).predict(texts)) == list(lorafit.load(tiny_run).predict(texts))


def test_push_offline_is_one_line_and_exit_2(tiny_run, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["push", str(tiny_run), "--repo-id", "someone/model"])
    assert result.exit_code == 2, result.output
    assert "offline" in result.output and "nothing was uploaded" in result.output
    assert "Traceback" not in result.output


def test_push_without_network_is_one_line_and_exit_2(tiny_run, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: connection refused
    result = CliRunner().invoke(app, ["push", str(tiny_run), "--repo-id", "someone/model", "--token", "hf_x"])
    assert result.exit_code == 2, result.output
    assert "failed" in result.output and "nothing was uploaded" in result.output
