"""QLoRA (model.quantize): the config path and the one-line errors on a machine without bitsandbytes or CUDA.
The CUDA path itself cannot run here; these tests check what it would be given."""

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
    real = model_mod._from_pretrained

    def loader(load, name, **kwargs):
        if "quantization_config" in kwargs:
            seen.update(kwargs)
            kwargs = {k: v for k, v in kwargs.items() if k not in ("quantization_config", "device_map")}
        return real(load, name, **kwargs)

    def prepare(model, *args, **kwargs):
        seen["prepared"] = type(model).__name__
        return model

    monkeypatch.setattr(model_mod, "_from_pretrained", loader)
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", prepare)
    cfg = Config().with_overrides({"model": str(tiny_model_dir("bert")), "quantize": "4bit", "pooling": "cls",
                                   "param_budget": None}).model
    model, info = model_mod.prepare_model(cfg, 4, ["a", "b", "c", "d"])
    bnb = seen["quantization_config"]
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16
    assert seen["device_map"] == {"": 0}
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
