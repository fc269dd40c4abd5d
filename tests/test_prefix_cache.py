"""The cached frozen-prefix path computes the same logits as the plain path."""

import numpy as np
import pytest
import torch

from conftest import SAMPLE_TEXTS, tiny_config
from lorafit.data import Collator, EncodedDataset, encode
from lorafit.model import load_tokenizer, prepare_model
from lorafit.prefix_cache import FrozenPrefix, first_trained_layer


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("pooling,method,layers", [("cls", "lora", [1]), ("mean", "lora", [1]), ("cls", "head", None),
                                                   ("mean", "lora", None)])
def test_cached_prefix_logits_equal_plain_logits(family, pooling, method, layers, tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir(family), tmp_path, pooling=pooling, method=method, lora_layers=layers)
    torch.manual_seed(0)
    model, _ = prepare_model(cfg.model, 4, list("abcd"))
    # make the adapters non-trivial so a wrong path would show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    k = first_trained_layer(model)
    if layers is None and method == "lora":
        assert k == 0 and FrozenPrefix.maybe(model, torch.float32) is None  # nothing frozen to cache
        return
    assert k == (1 if method == "lora" else 2)
    tok = load_tokenizer(str(tiny_model_dir(family)))
    enc = encode(tok, SAMPLE_TEXTS, 48, np.arange(4) % 4)
    prefix = FrozenPrefix(model, k, torch.float32)
    prefix.compute("x", enc, 3, tok.pad_token_id, "cpu")
    batch = Collator(tok.pad_token_id)([EncodedDataset(enc)[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        cached = prefix.logits(model, batch, "x", "cpu")
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-5)
    # the swap is undone: the model's own modules are back
    assert len(getattr(prefix.parent, prefix.attr)) == 2


def test_training_with_and_without_cache_runs(tiny_model_dir, tmp_path):
    import lorafit

    cfg = tiny_config(tiny_model_dir("bert"), tmp_path, pooling="cls", lora_layers=[1], max_train_samples=64, epochs=1)
    cached = lorafit.train(cfg.with_overrides({"run_name": "cached"}))
    plain = lorafit.train(cfg.with_overrides({"run_name": "plain", "cache_frozen_prefix": False}))
    assert cached.info["prefix_cache_from_layer"] == 1 and plain.info["prefix_cache_from_layer"] is None
    assert 0 <= cached.test_metrics["accuracy"] <= 1
