"""The seed recipes (configs/) reproduce their seeds (the reports and notebooks lorafit started from): each value a
seed states is set, and none of lorafit's own defaults that no seed used (the TF-IDF blend, length-grouped
batches, label smoothing, ...) is inherited silently."""

from pathlib import Path

import pytest
import yaml

from lorafit.config import Config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# What each seed states (its report, README or notebook), field by field.
STATED = {
    "bert-base-lora.yaml": dict(  # "Lab Assignment 2"
        dataset="SetFit/ag_news", split="resplit", validation_size=0.1, test_size=0.1, max_length=128,
        model="bert-base-uncased", method="lora", lora_r=8, lora_alpha=16, lora_dropout=0.1, epochs=5, batch_size=16,
        learning_rate=5e-5, weight_decay=0.01, warmup_ratio=0.1, pad_to_multiple_of=None),
    "bert-base-full.yaml": dict(  # "BERT Fine-Tuning for Text Classification"
        model="bert-base-uncased", method="full", clean_text=True, learning_rate=2e-5, batch_size=64,
        eval_batch_size=32, epochs=4, weight_decay=0.01, grad_accum_steps=2),
    "roberta-base-lora.yaml": dict(  # "LoRA-BERT_News_Classifier"
        dataset="ag_news", validation_size=0, model="roberta-base", lora_r=4, lora_alpha=16, lora_dropout=0.1,
        target_modules=["query", "value"], learning_rate=2e-4, weight_decay=0.01, scheduler="cosine", epochs=5,
        batch_size=16, warmup_steps=500, log_every=100),
    "roberta-base-lora-optuna.yaml": dict(  # "LoRA Lords"
        model="roberta-base", learning_rate=3.99e-4, batch_size=32, grad_accum_steps=4, weight_decay=0.0, lora_r=10,
        lora_alpha=64, lora_dropout=0.1, target_modules=["query", "value"], eval_every=400),
    "roberta-base-lora-r16.yaml": dict(  # "Finetuning with LoRA for News dataset", its notebook
        dataset="ag_news", validation_size=640, max_length=128, model="roberta-base", lora_r=16, lora_alpha=32,
        lora_dropout=0.03, lora_bias="lora_only", encoder_dropout=0.07, learning_rate=2e-4, batch_size=32,
        eval_batch_size=64, epochs=6, weight_decay=0.01, warmup_ratio=0.1, grad_accum_steps=1, scheduler="linear",
        metric_for_best="f1_weighted", seed=42, pad_to_multiple_of=8),
}

# lorafit's defaults that a seed's Trainer + PEFT code did not have: each recipe must spell these out (so a change
# of lorafit's default never changes a seed recipe), LoRA's only for LoRA recipes.
MUST_BE_EXPLICIT = ("tfidf_weight", "group_by_length", "label_smoothing", "head_learning_rate", "attention_dropout",
                    "pad_to_multiple_of", "fast_dropout", "pooling", "max_length", "scheduler", "max_grad_norm",
                    "precision", "seed", "clean_text")
MUST_BE_EXPLICIT_LORA = ("lora_layers", "lora_dropout", "lora_bias", "target_modules")


def _leaves(path: Path) -> dict:
    raw = yaml.safe_load(path.read_text())
    return {k: v for section in raw.values() for k, v in section.items()}


@pytest.mark.parametrize("recipe", sorted(STATED))
def test_seed_recipe_sets_what_the_seed_states(recipe):
    cfg = Config.from_yaml(CONFIGS / recipe)  # validates
    flat = {**cfg.data.model_dump(), **cfg.model.model_dump(), **cfg.train.model_dump()}
    for name, value in STATED[recipe].items():
        assert flat[name] == pytest.approx(value) if isinstance(value, float) else flat[name] == value, name


@pytest.mark.parametrize("recipe", sorted(STATED))
def test_seed_recipe_uses_none_of_lorafits_own_defaults(recipe):
    cfg = Config.from_yaml(CONFIGS / recipe)
    m, t = cfg.model, cfg.train
    assert m.tfidf_weight == 0  # no seed blends a TF-IDF model into its predictions
    assert t.group_by_length is False  # the Trainer's default: random batches
    assert t.label_smoothing == 0 and t.head_learning_rate is None and t.rdrop_alpha == 0
    assert m.attention_dropout is None and m.pooling == "cls"  # the checkpoint's dropout, its own head
    assert t.fast_dropout is False and t.int8_frozen_weights is False
    assert t.max_grad_norm == 1.0 and t.seed == 42  # the Trainer's defaults
    if t.warmup_steps is None and "warmup_ratio" not in STATED[recipe]:
        assert t.warmup_ratio == 0  # the Trainer's default, not lorafit's 0.06
    if m.method == "lora":
        assert m.lora_layers is None  # PEFT adapts every layer, not lorafit's top two
    explicit = _leaves(CONFIGS / recipe)
    wanted = MUST_BE_EXPLICIT + (MUST_BE_EXPLICIT_LORA if m.method == "lora" else ())
    assert [name for name in wanted if name not in explicit] == []


def test_every_seed_recipe_is_covered():
    seeds = {p.name for p in CONFIGS.glob("*.yaml")} - {"minilm-lora.yaml", "quality.yaml"}  # lorafit's own
    assert seeds == set(STATED)
