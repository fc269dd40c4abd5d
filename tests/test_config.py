"""Config: YAML round trip, flags map onto fields, recipes load, the budget check."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorafit.cli import app
from lorafit.config import FIELD_SECTIONS, Config
from lorafit.errors import LorafitError

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_round_trip(tmp_path):
    cfg = Config().with_overrides({"lora_r": 4, "target_modules": ["query", "value"], "learning_rate": 2e-4})
    cfg.to_yaml(tmp_path / "c.yaml")
    assert Config.from_yaml(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_validate(recipe):
    cfg = Config.from_yaml(recipe)
    assert cfg.model.method in ("lora", "full", "head")


def test_every_field_has_a_train_flag():
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in FIELD_SECTIONS:
        assert "--" + name.replace("_", "-") in result.output, name


def test_flags_override_yaml_and_print_the_resolved_config(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  lora_r: 16\ntrain:\n  epochs: 5\n")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml"), "--lora-r", "4", "--target-modules",
                                      "query,value", "--param-budget", "none", "--no-clean-text", "--print-config"])
    assert result.exit_code == 0, result.output
    cfg = Config.model_validate(__import__("yaml").safe_load(result.output))
    assert cfg.model.lora_r == 4 and cfg.train.epochs == 5
    assert cfg.model.target_modules == ["query", "value"]
    assert cfg.model.param_budget is None and cfg.data.clean_text is False


@pytest.mark.parametrize("args", [["--learning-rate", "-1"], ["--lora-r", "0"], ["--scheduler", "cubic"],
                                  ["--no-such-option", "1"]])
def test_invalid_values_exit_2(args):
    result = CliRunner().invoke(app, ["train", *args, "--print-config"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_unknown_yaml_key_names_the_field(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  learnin_rate: 0.1\n")
    with pytest.raises(LorafitError, match="learnin_rate"):
        Config.from_yaml(tmp_path / "c.yaml")


def test_budget_check_counts_and_refuses(tiny_model_dir):
    from lorafit.model import prepare_model

    cfg = Config().with_overrides({"model": str(tiny_model_dir("bert")), "param_budget": None, "pooling": "cls"})
    _, info = prepare_model(cfg.model, 4, list("abcd"))
    # tiny BERT: hidden 32, 2 layers, 6 linear layers per block, r=8 -> 8*(in+out) per layer; head 32*4+4
    per_block = 8 * ((32 + 32) * 4 + (32 + 64) + (64 + 32))
    assert info.trainable == 2 * per_block + 32 * 4 + 4
    assert 0 < info.percent < 100
    with pytest.raises(LorafitError, match="exceed the budget"):
        prepare_model(cfg.model.model_copy(update={"param_budget": info.trainable - 1}), 4, list("abcd"))
    _, full = prepare_model(cfg.model.model_copy(update={"method": "full"}), 4, list("abcd"))
    assert full.trainable == full.total


def test_target_modules_by_name_and_layer(tiny_model_dir):
    from lorafit.model import prepare_model

    cfg = Config().with_overrides({"model": str(tiny_model_dir("bert")), "target_modules": ["query", "value"],
                                   "lora_layers": [1], "pooling": "cls"})
    _, info = prepare_model(cfg.model, 4, list("abcd"))
    assert info.target_modules == ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"]
    with pytest.raises(LorafitError, match="no module named 'qkv'"):
        prepare_model(cfg.model.model_copy(update={"target_modules": ["qkv"]}), 4, list("abcd"))


def test_default_recipe_file_is_the_default_config():
    assert Config.from_yaml(ROOT / "configs" / "minilm-lora.yaml") == Config()


def test_a_config_can_extend_another_field_by_field(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "base.yaml").write_text("model:\n  lora_r: 16\n  lora_layers: [-3, -2, -1]\ntrain:\n  epochs: 5\n")
    (tmp_path / "recipes" / "child.yaml").write_text("base: ../base.yaml\nmodel:\n  lora_layers: [-1]\n")
    cfg = Config.from_yaml(tmp_path / "recipes" / "child.yaml")
    assert cfg.model.lora_r == 16 and cfg.train.epochs == 5  # from the base
    assert cfg.model.lora_layers == [-1]  # the child's field replaces the base's list whole
    assert "base" not in cfg.to_yaml()  # YAML out is the resolved config


def test_a_bad_base_is_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(LorafitError, match="leads back"):
        Config.from_yaml(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(LorafitError, match=r"missing.yaml: config file not found \(the base of"):
        Config.from_yaml(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: [1, 2]\n")
    with pytest.raises(LorafitError, match="base: expected the path"):
        Config.from_yaml(tmp_path / "d.yaml")
