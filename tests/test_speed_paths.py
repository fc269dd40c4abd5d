"""The training speed paths change how, not what, the model computes: dropout settings reach the right modules,
the cheap dropout mask drops at rate p, frozen weights held in bf16 give the autocast logits, and the CPU
attention kernel gives the default kernel's gradients."""

import numpy as np
import pytest
import torch
from torch import nn

from conftest import SAMPLE_TEXTS, tiny_config
from lorafit.data import Collator, EncodedDataset, encode
from lorafit.model import FastDropout, load_tokenizer, prepare_model
from lorafit.train import frozen_linears_in, training_attention


def _dropouts(module: nn.Module) -> list[float]:
    return [m.p for m in module.modules() if isinstance(m, nn.Dropout)]


@pytest.mark.parametrize("family,head_p", [("bert", 0.1), ("roberta", 0.1), ("distilbert", 0.2)])
def test_encoder_dropout_settings_leave_the_head_alone(family, head_p, tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir(family), tmp_path, pooling="cls", encoder_dropout=0.0, attention_dropout=0.0)
    model, _ = prepare_model(cfg.model, 4, list("abcd"))
    base = model.base_model.model
    prefix = base.base_model_prefix
    assert set(_dropouts(getattr(base, prefix))) == {0.0}
    head = [m.p for name, m in base.named_modules() if isinstance(m, nn.Dropout) and not name.startswith(prefix + ".")]
    assert head and set(head) == {head_p}  # the architecture's head dropout (DistilBERT: seq_classif_dropout)
    hf = base.config
    assert all(getattr(hf, k) == 0.0 for k in ("attention_probs_dropout_prob", "attention_dropout") if hasattr(hf, k))


def test_default_keeps_hidden_dropout_and_drops_attention_dropout(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir("bert"), tmp_path)  # mean pooling, the defaults' dropout settings
    model, _ = prepare_model(cfg.model, 4, list("abcd"))
    hf = model.base_model.model.encoder.config
    assert hf.attention_probs_dropout_prob == 0.0 and hf.hidden_dropout_prob == 0.1
    assert all(type(m) is not nn.Dropout for m in model.modules())  # every nn.Dropout became FastDropout
    assert set(_dropouts(model)) == {0.1, 0.0}  # 0.0: the LoRA path (lora_dropout 0)


def test_fast_dropout_drops_at_rate_p_and_scales_survivors():
    torch.manual_seed(0)
    drop = FastDropout(0.1).train()
    x = torch.ones(512, 1024, requires_grad=True)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 26 / 256) < 0.003  # p rounds to 26/256
    assert torch.allclose(y[y != 0], torch.tensor(256 / 230))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the same mask, scaled the same
    torch.manual_seed(0)
    assert torch.equal(FastDropout(0.1).train()(torch.ones(512, 1024)), y.detach())  # seeded: reproducible
    assert torch.equal(drop.eval()(x), x)
    other = FastDropout(0.5).train()(torch.ones(256, 1024, dtype=torch.bfloat16))
    assert other.dtype == torch.bfloat16 and abs((other == 0).float().mean().item() - 0.5) < 0.01


def _batch(family, tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir(family)))
    enc = encode(tok, SAMPLE_TEXTS, 48, np.arange(4) % 4)
    return Collator(tok.pad_token_id, 8)([EncodedDataset(enc)[i] for i in range(4)])


def test_frozen_linears_in_bf16_give_the_autocast_logits_and_are_restored(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir("bert"), tmp_path, lora_layers=[1])
    torch.manual_seed(0)
    model, _ = prepare_model(cfg.model, 4, list("abcd"))
    model.eval()
    batch = _batch("bert", tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def logits():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    expected = logits()
    with frozen_linears_in(model, torch.bfloat16):
        held = {n: p.dtype for n, p in model.named_parameters()}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        got = logits()
    assert torch.equal(got, expected)
    assert held["base_model.model.encoder.encoder.layer.1.attention.self.query.base_layer.weight"] == torch.bfloat16
    assert trainable and all(held[n] == torch.float32 for n in trainable)  # adapters and head train in fp32
    for n, p in model.named_parameters():  # restored exactly, in fp32
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n


def test_cpu_training_attention_kernel_gives_the_same_gradients(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir("roberta"), tmp_path, lora_layers=None)
    torch.manual_seed(0)
    model, _ = prepare_model(cfg.model, 4, list("abcd"))
    model.eval()  # no dropout: both kernels must agree
    batch = _batch("roberta", tiny_model_dir)

    def grads(ctx):
        model.zero_grad()
        with ctx:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    import contextlib

    ref_out, ref = grads(contextlib.nullcontext())
    out, got = grads(training_attention(torch.device("cpu")))
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
