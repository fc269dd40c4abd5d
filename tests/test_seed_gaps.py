"""The seeds' remaining gaps: --validation-size 0 (data side), weighted-F1 selection, the RoBERTa recipes'
trainable-parameter counts. (Integer-id leaderboard predictions, `predict --labels id`: test_inference.py.)"""

import json
from pathlib import Path

import numpy as np
import pytest

from lorafit.config import Config, DataConfig
from lorafit.data import encode, load_data
from lorafit.errors import LorafitError


@pytest.mark.parametrize("split", ["given", "resplit"])
def test_validation_size_zero_carves_no_validation(split):
    full = load_data(DataConfig(split=split), seed=0)
    bundle = load_data(DataConfig(split=split, validation_size=0), seed=0)
    assert len(bundle.validation.texts) == 0 and bundle.validation.labels.dtype == np.int64
    assert bundle.summary["sizes"]["validation"] == 0
    assert len(bundle.train.texts) == len(full.train.texts) + len(full.validation.texts)
    assert len(bundle.test.texts) == len(full.test.texts)
    if split == "given":  # the whole train file, in order
        assert bundle.train.source_rows.tolist() == list(range(bundle.summary["rows_read"]["train"]))


def test_an_empty_split_encodes_to_nothing(tiny_model_dir):
    from lorafit.model import load_tokenizer

    enc = encode(load_tokenizer(str(tiny_model_dir("bert"))), [], 32, np.zeros(0, dtype=np.int64))
    assert len(enc) == 0 and enc.full_lengths.shape == (0,)


def test_validation_size_must_not_be_negative():
    with pytest.raises(LorafitError, match="validation_size"):
        Config().with_overrides({"validation_size": -1})


def test_weighted_f1_selects_the_best_checkpoint(tiny_model_dir, tmp_path):
    import lorafit
    from conftest import tiny_config

    cfg = tiny_config(tiny_model_dir("bert"), tmp_path, metric_for_best="f1_weighted", eval_every=5, epochs=1,
                      max_train_samples=96, max_eval_samples=48)
    run = lorafit.train(cfg)
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r.get("split") == "validation"]
    best = max(val, key=lambda r: r["f1_weighted"])  # the first of equals, as `better` keeps the earlier one
    assert run.info["best_validation_f1_weighted"] == pytest.approx(best["f1_weighted"])
    assert run.info["best_step"] == best["step"]


ROBERTA_BASE = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                    bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)


@pytest.mark.parametrize("recipe, trainable, peft_total", [
    ("roberta-base-lora-r16.yaml", 3_330_820, 127_896_584),  # the notebook's print_trainable_parameters line
    ("roberta-base-lora.yaml", 741_124, None),                # the seed README's count
])
def test_roberta_recipes_train_the_seeds_parameter_counts(recipe, trainable, peft_total, tmp_path, monkeypatch):
    """Each recipe on roberta-base's shape (config only, weights on the meta device: no download, no memory)."""
    import torch
    from transformers import RobertaConfig

    from lorafit import model as model_mod
    from lorafit.data import AG_NEWS_LABELS

    RobertaConfig(**ROBERTA_BASE).save_pretrained(tmp_path)
    real = model_mod.load_pretrained

    def from_config(loader, name, config=None, **kwargs):  # the architecture, without the checkpoint's weights
        if config is None:
            return real(loader, name, **kwargs)
        return loader.__self__.from_config(config)  # loader: AutoModel(ForSequenceClassification).from_pretrained

    monkeypatch.setattr(model_mod, "load_pretrained", from_config)
    cfg = Config.from_yaml(Path(__file__).resolve().parents[1] / "configs" / recipe)
    with torch.device("meta"):
        model, info = model_mod.prepare_model(cfg.model.model_copy(update={"model": str(tmp_path)}), 4, AG_NEWS_LABELS)
    assert info.trainable == trainable
    if peft_total:
        assert model.get_nb_trainable_parameters() == (trainable, peft_total)
        assert model.base_model.model.config.hidden_dropout_prob == 0.07
