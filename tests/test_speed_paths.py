"""The training speed paths change how, not what, the model computes: dropout settings reach the right modules,
the cheap dropout mask drops at rate p, frozen weights held in bf16 give the autocast logits, and the CPU
attention kernel gives the default kernel's gradients."""

import numpy as np
import pytest
import torch
from torch import nn

from conftest import SAMPLE_TEXTS, tiny_config
from lorafit.data import Collator, EncodedDataset, encode
from lorafit.model import load_tokenizer, prepare_model
from lorafit.frozen import frozen_linears, int8_available
from lorafit.forward_pass import FastDropout, frozen_mode, training_attention


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
    assert set(_dropouts(model)) == {0.1, 0.0}  # 0.0: the LoRA path (lora_dropout 0)
    from lorafit.forward_pass import fast_dropout

    with fast_dropout(model):  # the recipe's speed path (forward_pass.fast_dropout): every nn.Dropout is FastDropout ...
        assert all(type(m) is not nn.Dropout for m in model.modules())
        assert set(_dropouts(model)) == {0.1, 0.0}
    assert not any(isinstance(m, FastDropout) for m in model.modules())  # ... and only within the block


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
    with frozen_linears(model, "bf16"):
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


@pytest.mark.skipif(not int8_available(), reason="fbgemm int8 kernels exist on x86 CPUs only")
def test_int8_frozen_weights_train_close_to_fp32_evaluate_exactly_and_are_restored(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir("bert"), tmp_path, lora_layers=None)
    torch.manual_seed(0)
    model, _ = prepare_model(cfg.model, 4, list("abcd"))
    batch = _batch("bert", tiny_model_dir)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def run(train: bool):
        model.train(train)
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks in both runs
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out.square().sum().backward()
        return out.detach(), torch.cat([p.grad.flatten() for p in trainable])

    ref_out, ref_grad = run(True)
    ref_eval, _ = run(False)
    with frozen_linears(model, "int8"):
        assert any("forward" in vars(m) for m in model.modules())  # the frozen linears run the int8 kernel
        out, grad = run(True)
        eval_out, _ = run(False)
    assert not torch.equal(out, ref_out)  # int8 was used in training ...
    assert (out - ref_out).norm() / ref_out.norm() < 0.05  # ... and stays close to fp32
    assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0) > 0.99
    assert torch.equal(eval_out, ref_eval)  # evaluation uses the fp32 weights
    assert not any("forward" in vars(m) or hasattr(m, "_lorafit_int8") for m in model.modules())  # restored
    torch.testing.assert_close(run(True)[0], ref_out, rtol=0, atol=0)


def test_frozen_mode_follows_precision_and_the_int8_switch(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir("bert"), tmp_path)
    assert frozen_mode(cfg, "bf16", "cpu") == "bf16"
    assert frozen_mode(cfg, "fp16", "cuda") == "fp16"
    assert frozen_mode(cfg, "fp32", "cpu") is None  # int8 frozen weights are an option, off by default
    on = cfg.with_overrides({"int8_frozen_weights": True})
    assert frozen_mode(on, "fp32", "cpu") == ("int8" if int8_available() else None)
    assert frozen_mode(on, "fp32", "cuda") is None  # fbgemm kernels are CPU kernels


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_fused_lora_node_computes_what_peft_computes(family, tiny_model_dir, tmp_path):
    from unittest import mock

    from lorafit import frozen

    cfg = tiny_config(tiny_model_dir(family), tmp_path, lora_layers=None, target_modules=["all-linear"])
    torch.manual_seed(0)
    model, _ = prepare_model(cfg.model, 4, list("abcd"))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would hide a wrong gradient of A
            nn.init.normal_(p, std=0.1)
    batch = _batch(family, tiny_model_dir)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def run():
        model.train()
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks in both runs
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in trainable}

    ref_out, ref_grads = run()
    with frozen_linears(model, None), mock.patch.object(frozen._LoraLinear, "apply", wraps=frozen._LoraLinear.apply) as node:
        out, grads = run()
    assert node.call_count == sum(1 for n, _ in trainable if n.endswith("lora_A.default.weight"))
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert not any("forward" in vars(m) for m in model.modules())  # PEFT's forward is back


@pytest.mark.skipif(not int8_available(), reason="fbgemm int8 kernels exist on x86 CPUs only")
def test_int8_smoothing_tames_outlier_channels_and_calibration_sees_every_call():
    from lorafit.frozen import Int8Weight, calibrate_int8

    torch.manual_seed(0)
    linear = nn.Linear(64, 48).requires_grad_(False)
    x = torch.randn(200, 64)
    x[:, 3] *= 60  # one outlier channel, as LayerNorm outputs of BERT-like encoders have
    ref = linear(x)

    def error(int8):
        return ((int8(x) - ref).norm() / ref.norm()).item()

    plain, smoothed = error(Int8Weight(linear, None)), error(Int8Weight(linear, x.abs().amax(0)))
    assert smoothed < plain / 2 and smoothed < 0.03

    model = nn.Sequential(linear)
    with frozen_linears(model, "int8"):
        halves = [x[:100], x[100:] * 2]
        assert calibrate_int8(model, lambda: [model.eval()(h) for h in halves]) == 1
        expected = torch.maximum(halves[0].abs().amax(0), halves[1].abs().amax(0))
        torch.testing.assert_close(linear._lorafit_int8.inv_smooth, Int8Weight(linear, expected).inv_smooth)
    assert "_lorafit_int8" not in vars(linear)
