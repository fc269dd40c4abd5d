"""The frozen-prefix cache's memory bound (issue 10, defect 3) and the one batching helper it shares with
evaluation and inference: the size estimate is the stored bytes, the cap turns the cache off with one line,
16-bit storage keeps the logits within a stated tolerance."""

import io

import numpy as np
import pytest
import torch

from conftest import SAMPLE_TEXTS, tiny_config
from lorafit.data import Collator, EncodedDataset, encode
from lorafit.evaluate import batched_apply
from lorafit.model import load_tokenizer, prepare_model
from lorafit.prefix_cache import FrozenPrefix, build_prefix_cache, estimate_bytes, first_trained_layer, hidden_size

# stated tolerances of 16-bit storage against fp32 storage on the tiny model's logits (10x the measured differences)
TOLERANCE = {torch.float16: 5e-4, torch.bfloat16: 5e-3}  # measured: 5e-5 and 6e-4


def _setup(tiny_model_dir, tmp_path, family="bert", **overrides):
    cfg = tiny_config(tiny_model_dir(family), tmp_path, pooling="mean", lora_layers=[1], **overrides)
    torch.manual_seed(0)
    model, _ = prepare_model(cfg.model, 4, list("abcd"))
    with torch.no_grad():  # non-trivial adapters so that a wrong path would show
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    tok = load_tokenizer(str(tiny_model_dir(family)))
    texts = SAMPLE_TEXTS * 5 + [t[: 10 + 7 * i] for i, t in enumerate(SAMPLE_TEXTS * 3)]
    encoded = {"train": encode(tok, texts, 48, np.arange(len(texts)) % 4),
               "test": encode(tok, SAMPLE_TEXTS, 48, np.arange(4))}
    return cfg, model, tok, encoded


def _console():
    from rich.console import Console

    return Console(file=io.StringIO(), width=400)


def test_batched_apply_restores_input_order():
    from lorafit.data import Encoded

    lengths = [3, 9, 1, 7, 7, 2, 5]
    enc = Encoded([list(range(10, 10 + n)) for n in lengths], np.zeros(len(lengths), dtype=np.int64), np.array(lengths))
    seen = []

    def run(batch):
        seen.append(batch["attention_mask"].sum(1).tolist())
        return torch.stack([batch["index"].float(), batch["attention_mask"].sum(1).float()], 1)

    out = batched_apply(enc, 3, 0, run)
    assert out[:, 0].tolist() == list(range(len(lengths)))  # row i is text i again
    assert out[:, 1].tolist() == lengths
    assert seen[0] == [9, 7, 7]  # longest first: minimal padding
    assert batched_apply(enc, 3, 0, lambda batch: None) is None  # a run that stores its own results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_estimate_is_the_stored_bytes(dtype, tiny_model_dir, tmp_path):
    cfg, model, tok, encoded = _setup(tiny_model_dir, tmp_path)
    prefix = FrozenPrefix(model, first_trained_layer(model), dtype)
    for split, enc in encoded.items():
        prefix.compute(split, enc, 4, tok.pad_token_id, "cpu")
    actual = sum(t.numel() * t.element_size() for t in prefix.flat.values())
    assert estimate_bytes(encoded, hidden_size(model), dtype) == actual == prefix.nbytes
    assert actual == sum(len(x) for e in encoded.values() for x in e.input_ids) * 32 * (4 if dtype == torch.float32 else 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_storage_keeps_logits_within_tolerance(dtype, tiny_model_dir, tmp_path):
    cfg, model, tok, encoded = _setup(tiny_model_dir, tmp_path)
    enc = encoded["train"]
    k = first_trained_layer(model)
    logits = {}
    for d in (torch.float32, dtype):
        prefix = FrozenPrefix(model, k, d)
        prefix.compute("train", enc, 5, tok.pad_token_id, "cpu")
        logits[d] = batched_apply(enc, 7, tok.pad_token_id, lambda b: prefix.logits(model.eval(), b, "train", "cpu"))
    plain = batched_apply(enc, 7, tok.pad_token_id, lambda b: model(input_ids=b["input_ids"],
                                                                       attention_mask=b["attention_mask"]).logits)
    np.testing.assert_allclose(logits[torch.float32], plain, atol=1e-5)
    diff = np.abs(logits[dtype] - logits[torch.float32]).max()
    assert 0 < diff < TOLERANCE[dtype], diff  # 0 would mean the 16-bit store was not used


def test_fp16_store_widens_to_fp32_on_overflow(tiny_model_dir, tmp_path):
    cfg, model, tok, encoded = _setup(tiny_model_dir, tmp_path)
    with torch.no_grad():  # block 0's output LayerNorm scaled past fp16's range (65504)
        model.get_base_model().encoder.encoder.layer[0].output.LayerNorm.weight.fill_(1e6)
    prefix = FrozenPrefix(model, first_trained_layer(model), torch.float16)
    prefix.compute("test", encoded["test"], 2, tok.pad_token_id, "cpu")
    assert prefix.storage_dtype() == "fp32" and torch.isfinite(prefix.flat["test"]).all()


def test_cap_turns_the_cache_off_with_one_line(tiny_model_dir, tmp_path):
    cfg, model, tok, encoded = _setup(tiny_model_dir, tmp_path, cache_max_gb=1e-7)  # 100 bytes
    console = _console()
    prefix, elapsed, decision = build_prefix_cache(cfg, model, encoded, tok.pad_token_id, "fp32", "cpu", None, console)
    assert prefix is None and elapsed == {}
    expected = estimate_bytes(encoded, 32, torch.float16)
    assert decision["enabled"] is False and decision["estimate_gb"] == round(expected / 1e9, 4)
    lines = console.file.getvalue().strip().splitlines()
    assert len(lines) == 1 and "cache off" in lines[0] and "cache_max_gb" in lines[0], lines


def test_build_prefix_cache_decides_and_records(tiny_model_dir, tmp_path):
    cfg, model, tok, encoded = _setup(tiny_model_dir, tmp_path)  # cache_max_gb 'auto'
    prefix, elapsed, decision = build_prefix_cache(cfg, model, encoded, tok.pad_token_id, "bf16", "cpu", None,
                                                   _console())
    assert set(elapsed) == {"train", "test"} and decision["enabled"] and decision["storage_dtype"] == "bf16"
    assert decision["size_gb"] == decision["estimate_gb"] and decision["cap_gb"] > 0 and decision["from_layer"] == 1
    _, _, fp32_training = build_prefix_cache(cfg, model, encoded, tok.pad_token_id, "fp32", "cpu", None, _console())
    assert fp32_training["storage_dtype"] == "fp16"
    off = cfg.with_overrides({"cache_frozen_prefix": False})
    assert build_prefix_cache(off, model, encoded, tok.pad_token_id, "fp32", "cpu", None, _console())[0] is None
    explicit = cfg.with_overrides({"cache_dtype": "fp32", "cache_max_gb": None})
    prefix, _, decision = build_prefix_cache(explicit, model, encoded, tok.pad_token_id, "fp32", "cpu", None, _console())
    assert decision["storage_dtype"] == "fp32" and decision["cap_gb"] is None
    # the cache serves the batches the training loader makes (index = row of the split)
    batch = Collator(tok.pad_token_id)([EncodedDataset(encoded["test"])[i] for i in (2, 0)])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(prefix.logits(model, batch, "test", "cpu"),
                                   model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                   rtol=1e-5, atol=1e-5)
