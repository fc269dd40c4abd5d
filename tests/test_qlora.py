"""QLoRA (model.quantize): the config path and the one-line errors on a machine without bitsandbytes or CUDA.
The CUDA path itself cannot run here; these tests check what it would be given."""

import re

import pytest
import torch
from typer.testing import CliRunner

from lorafit import model as model_mod
from lorafit.cli import app
from lorafit.config import Config
from lorafit.errors import LorafitError


def test_quantize_is_a_flag_and_a_yaml_key():
    result = CliRunner().invoke(app, ["train", "--quantize", "4bit", "--print-config"])
    assert result.exit_code == 0, result.output
    assert "quantize: 4bit" in result.output
    assert Config.from_dict({"model": {"quantize": "8bit"}}).model.quantize == "8bit"


@pytest.mark.parametrize("overrides, message", [
    ({"quantize": "4bit", "method": "full"}, "needs method lora"),
    ({"quantize": "8bit", "method": "head"}, "needs method lora"),
    ({"quantize": "4bit", "device": "cpu"}, "needs a CUDA GPU"),
    ({"quantize": "3bit"}, "quantize"),
])
def test_quantize_config_rules(overrides, message):
    with pytest.raises(LorafitError, match=message):
        Config().with_overrides(overrides)


def test_quantize_without_bitsandbytes_or_cuda_is_one_line_and_nothing_starts(tmp_path, monkeypatch):
    import sys

    import lorafit.data

    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded before the quantize check")

    for module in (lorafit.data, sys.modules["lorafit.train"]):  # wherever the recipe finds load_data
        monkeypatch.setattr(module, "load_data", no_data, raising=False)
    out = tmp_path / "runs"
    result = CliRunner().invoke(app, ["train", "--quantize", "4bit", "--output-dir", str(out)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "model.quantize=4bit" in message and "--quantize none" in message
    if not torch.cuda.is_available():
        assert "no CUDA GPU is visible" in message
    assert not out.exists()


def test_the_api_refuses_too_before_a_run_directory_exists(tiny_model_dir, tmp_path):
    import lorafit
    from conftest import tiny_config

    cfg = tiny_config(tiny_model_dir("bert"), tmp_path / "runs", quantize="8bit", max_train_samples=32)
    with pytest.raises(LorafitError, match="needs bitsandbytes on a CUDA GPU"):
        lorafit.train(cfg)
    assert not (tmp_path / "runs").exists()


def test_qlora_load_is_nf4_double_quant_bf16_and_kbit_prepared(tiny_model_dir, monkeypatch):
    """With the environment check passed, the base is loaded through BitsAndBytesConfig and PEFT's k-bit
    preparation runs before LoRA (the loader is intercepted: bitsandbytes cannot load on this CPU)."""
    import peft

    seen = {}
    monkeypatch.setattr(model_mod, "check_quantization", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    real = model_mod.load_pretrained

    def loader(load, name, **kwargs):
        if "quantization_config" in kwargs:
            seen.update(kwargs)
            kwargs = {k: v for k, v in kwargs.items() if k not in ("quantization_config", "device_map")}
        return real(load, name, **kwargs)

    def prepare(model, *args, **kwargs):
        seen["prepared"] = type(model).__name__
        return model

    monkeypatch.setattr(model_mod, "load_pretrained", loader)
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", prepare)
    cfg = Config().with_overrides({"model": str(tiny_model_dir("bert")), "quantize": "4bit", "pooling": "cls",
                                   "param_budget": None}).model
    model, info = model_mod.prepare_model(cfg, 4, ["a", "b", "c", "d"])
    bnb = seen["quantization_config"]
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16
    assert seen["device_map"] == {"": 0}
    # issue 23: the new head (and the pooler) stay float nn.Linear, named for bitsandbytes to skip
    assert bnb.llm_int8_skip_modules == ["bert.pooler.dense", "classifier"]
    assert seen["prepared"] == "BertForSequenceClassification"
    assert isinstance(model, peft.PeftModel) and info.trainable > 0
    assert model_mod.quantization_config("8bit").load_in_8bit


def test_a_quantized_base_gets_no_prefix_cache_and_no_frozen_weight_paths(tiny_model_dir):
    """What bitsandbytes leaves (integer weights) is skipped by the int8/bf16 frozen-weight paths and the cache."""
    from lorafit.frozen import _frozen_linears
    from lorafit.prefix_cache import FrozenPrefix

    cfg = Config().with_overrides({"model": str(tiny_model_dir("bert")), "param_budget": None,
                                   "lora_layers": [-1]}).model
    model, _ = model_mod.prepare_model(cfg, 4, ["a", "b", "c", "d"])
    assert FrozenPrefix.maybe(model, torch.float32) is not None and _frozen_linears(model)

    class Params4bit(torch.nn.Parameter):  # stands in for bitsandbytes' packed 4-bit weight
        pass

    for module in _frozen_linears(model):
        module.weight = Params4bit(module.weight.data.to(torch.uint8), requires_grad=False)
    assert model_mod.is_quantized(model)
    assert FrozenPrefix.maybe(model, torch.float32) is None
    assert _frozen_linears(model) == []


class Params4bit(torch.nn.Parameter):
    """Stands in for bitsandbytes' packed 4-bit weight (matched by type name, as lorafit matches the real one)."""

    quant_state = None


@pytest.mark.parametrize("family, pooling, expected", [
    ("bert", "cls", ["bert.pooler.dense", "classifier"]),
    ("bert", "mean", ["pooler.dense"]),
    ("distilbert", "cls", ["pre_classifier", "classifier"]),
    ("roberta", "cls", ["classifier.dense", "classifier.out_proj"]),
])
def test_only_encoder_block_linears_are_quantized(tiny_model_dir, family, pooling, expected):
    """Issue 23: Transformers' own skip list for BertForSequenceClassification is ['classifier.bias'], which names
    no module, so the new classifier was quantized; lorafit names every linear outside the blocks instead."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    hf_config = AutoConfig.from_pretrained(tiny_model_dir(family), num_labels=4)
    loader = AutoModelForSequenceClassification if pooling == "cls" else AutoModel
    keep = model_mod.unquantized_modules(loader, hf_config)
    assert keep == expected
    full = loader.from_config(hf_config)
    linears = [n for n, m in full.named_modules() if isinstance(m, torch.nn.Linear)]
    assert set(keep) < set(linears) and all(".layer." in n for n in set(linears) - set(keep))
    assert model_mod.quantization_config("8bit", keep).llm_int8_skip_modules == expected


def test_a_4bit_weight_without_its_quantization_state_is_one_line(tiny_model_dir):
    cfg = Config().with_overrides({"model": str(tiny_model_dir("bert")), "param_budget": None}).model
    model, _ = model_mod.prepare_model(cfg, 4, ["a", "b", "c", "d"])
    model_mod.check_quantized_weights(model)  # float weights: nothing to check
    query = next(m for n, m in model.named_modules() if n.endswith("layer.0.attention.self.query.base_layer"))
    query.weight = Params4bit(query.weight.data, requires_grad=False)  # as a weight missing from the checkpoint
    with pytest.raises(LorafitError, match=r"layer\.0\.attention\.self\.query\.base_layer\.weight was loaded as a "
                                           r"4-bit weight without its quantization state \(shape \(32, 32\)"):
        model_mod.check_quantized_weights(model)
    query.weight.quant_state = object()  # what bitsandbytes attaches when it quantizes
    model_mod.check_quantized_weights(model)


def test_a_4bit_layer_holding_a_plain_float_weight_is_one_line(tiny_model_dir):
    """What Transformers leaves for a weight the checkpoint lacks: a Linear4bit whose weight is a float tensor."""
    from transformers import AutoModel

    class Linear4bit(torch.nn.Linear):  # stands in for bitsandbytes.nn.Linear4bit (matched by name)
        pass

    model = AutoModel.from_pretrained(tiny_model_dir("bert"))
    model_mod.check_quantized_weights(model)
    model.pooler.dense = Linear4bit(32, 32)
    with pytest.raises(LorafitError, match=r"pooler\.dense\.weight was loaded as a 4-bit weight without its "
                                           r"quantization state \(shape \(32, 32\)"):
        model_mod.check_quantized_weights(model)


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_speed_paths_that_rewrite_the_model_are_off_for_a_quantized_base(quantize):
    from lorafit.forward_pass import speed_paths

    plain = Config().with_overrides({"precision": "fp32"})
    quantized = Config().with_overrides({"precision": "fp32", "quantize": quantize})
    for device_type in ("cpu", "cuda"):
        for precision in ("fp32", "bf16"):
            paths = speed_paths(quantized, precision, device_type)
            assert paths["quantized_base"] == quantize and paths["frozen_weights"] == "fp32"
            assert not paths["fused_lora"] and not paths["fast_dropout"]
    # the same config unquantized turns them on (fp32 on the CPU), so the switch above is the quantization's
    on = speed_paths(plain, "fp32", "cpu")
    assert on["fused_lora"] and on["fast_dropout"] and on["quantized_base"] == "none"
    assert speed_paths(plain, "bf16", "cuda")["frozen_weights"] == "bf16"


def test_restoring_the_best_weights_writes_only_trainable_parameters(tiny_model_dir):
    """The best-checkpoint restore (and --resume) copies LoRA + head weights in place and never a frozen or
    quantized weight: a state naming one is refused."""
    cfg = Config().with_overrides({"model": str(tiny_model_dir("bert")), "param_budget": None}).model
    model, _ = model_mod.prepare_model(cfg, 4, ["a", "b", "c", "d"])
    query = next(m for n, m in model.named_modules() if n.endswith("layer.0.attention.self.query.base_layer"))
    packed = Params4bit(query.weight.data.clone(), requires_grad=False)
    packed.quant_state = marker = object()
    query.weight = packed
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    best = {n: torch.full_like(v, 0.5) for n, v in model_mod.trainable_state_dict(model).items()}
    model_mod.load_trainable_state_dict(model, best)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, best[name]), name
        else:
            assert torch.equal(p, frozen_before[name]), name
    assert query.weight is packed and packed.quant_state is marker  # the same object, state kept
    frozen_name = next(n for n in frozen_before if "query.base_layer.weight" in n)
    with pytest.raises(LorafitError, match=f"best: {re.escape(frozen_name)} is not a trainable parameter"):
        model_mod.load_trainable_state_dict(model, {frozen_name: torch.zeros_like(frozen_before[frozen_name])},
                                            source="best")
    assert torch.equal(query.weight, frozen_before[frozen_name])
