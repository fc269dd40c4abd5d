"""The model card: `model/README.md` in Hugging Face's model-card format (YAML metadata with the test results
as model-index, then data, method, hyperparameters, test metrics, usage and limitations), written from the run
directory alone (config.yaml, run.json, labels.json, data.json, test_metrics.json).

The metadata goes through huggingface_hub's ModelCardData/EvalResult so the Hub reads it as it writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .config import DEFAULT_MODEL, Config
from .fileio import atomic_write_text
from .rundir import MODEL_DIR, read_data_summary, read_labels, read_run, read_test_metrics, read_tfidf_weight

CARD_FILE = "README.md"  # inside model/: the Hub shows a repo's README.md as its card
EMBEDDED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the bundled weights are a copy of
AG_NEWS_HUB_ID = "fancyzhx/ag_news"  # the bundled sample is drawn from it
# (key in test_metrics.json, model-index metric type, display name, averaging)
CARD_METRICS = (
    ("accuracy", "accuracy", "Accuracy", None),
    ("f1_macro", "f1", "F1 (macro)", "macro"),
    ("precision_macro", "precision", "Precision (macro)", "macro"),
    ("recall_macro", "recall", "Recall (macro)", "macro"),
    ("f1_weighted", "f1", "F1 (weighted)", "weighted"),
    ("precision_weighted", "precision", "Precision (weighted)", "weighted"),
    ("recall_weighted", "recall", "Recall (weighted)", "weighted"),
)


def base_model_id(model: str) -> Optional[str]:
    """The Hub id of the backbone, or None for a local directory (the Hub rejects a base_model that is not a repo)."""
    if model == DEFAULT_MODEL:
        return EMBEDDED_HUB_ID
    if Path(model).exists() or model.count("/") > 1:
        return None
    return model


def base_license(model: str) -> Optional[str]:
    """The backbone's license from its own card, when that card is on this machine (never a download)."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    from .model import resolve_model_path

    try:
        path = Path(resolve_model_path(model))
        readme = path / "README.md" if path.exists() else try_to_load_from_cache(model, "README.md")
        if not isinstance(readme, (str, Path)) or not Path(readme).is_file():
            return None
        return ModelCard.load(readme, ignore_metadata_errors=True).data.license
    except Exception:  # noqa: BLE001 - an unreadable base card only means the license stays unstated
        return None


def dataset_id(data: dict, cfg: Config) -> Optional[str]:
    source = data.get("source", {})
    if source.get("type") == "bundled":
        return AG_NEWS_HUB_ID
    if source.get("type") == "hub":
        return source.get("name") or cfg.data.dataset
    return None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) <= 1 else f"{v:g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return "—" if v is None else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _metadata(cfg: Config, name: str, labels: list[str], data: dict, test: dict, base: Optional[str],
              license_: Optional[str]):
    from huggingface_hub import EvalResult, ModelCardData

    dataset = dataset_id(data, cfg)
    results = [
        EvalResult(task_type="text-classification", task_name="Text classification",
                   dataset_type=dataset or "custom", dataset_name=dataset or "local files", dataset_split="test",
                   metric_type=kind, metric_name=display, metric_value=float(test[key]),
                   metric_args={"average": average} if average else None)
        for key, kind, display, average in CARD_METRICS if isinstance(test.get(key), (int, float))
    ]
    library = "peft" if cfg.model.method == "lora" else "transformers"
    return ModelCardData(
        model_name=name, base_model=base, library_name=library, pipeline_tag="text-classification",
        license=license_, datasets=[dataset] if dataset else None, metrics=["accuracy", "f1", "precision", "recall"],
        tags=["lorafit", "text-classification"] + (["lora"] if cfg.model.method == "lora" else [])
        + ([f"{cfg.model.quantize}-quantized-base", "qlora"] if cfg.model.quantize != "none" else []),
        eval_results=results or None,
    )


def _usage(cfg: Config, labels: list[str], base: str, tfidf_weight: float = 0.0) -> str:
    """How to load the model: with lorafit, and with plain PEFT / Transformers where that is possible.
    tfidf_weight: the run's TF-IDF blend weight (rundir.read_tfidf_weight; 0: none)."""
    m, max_length = cfg.model, cfg.data.max_length
    id2label = {i: n for i, n in enumerate(labels)}
    out = ["With lorafit (the run directory, or a repo pushed by `lorafit push`, after `snapshot_download`):", "",
           "```python", "import lorafit", "",
           'clf = lorafit.load("path/to/run")  # or lorafit.load(huggingface_hub.snapshot_download("REPO_ID"))',
           f'clf.predict(["{_example(labels)}"])  # label names; predict_proba gives the class probabilities',
           "```", ""]
    tokenize = (f'x = tok(texts, padding=True, truncation=True, max_length={max_length}, return_tensors="pt")')
    if m.method == "lora" and m.pooling == "cls":
        out += ["With plain PEFT and Transformers:", "", "```python", "import torch",
                "from peft import PeftModel",
                "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
                'DIR = "path/to/run"  # holds model/ (the adapter) and tokenizer/',
                'tok = AutoTokenizer.from_pretrained(f"{DIR}/tokenizer")',
                f"id2label = {id2label!r}",
                f'base = AutoModelForSequenceClassification.from_pretrained("{base}", num_labels={len(labels)}, '
                "id2label=id2label, label2id={v: k for k, v in id2label.items()})",
                'model = PeftModel.from_pretrained(base, f"{DIR}/model").eval()',
                f"texts = [\"{_example(labels)}\"]", tokenize,
                "with torch.inference_mode():",
                "    labels = [id2label[i] for i in model(**x).logits.argmax(-1).tolist()]", "```", ""]
    elif m.method == "lora":
        out += ["With plain PEFT and Transformers: this run pools by the mean of the token states, which "
                "Transformers has no classification class for, so the module is four lines:", "",
                "```python", "import torch",
                "from peft import PeftModel",
                "from transformers import AutoModel, AutoTokenizer", "",
                "class MeanPoolingClassifier(torch.nn.Module):  # lorafit's: encoder, mean over tokens, linear head",
                "    def __init__(self, encoder, num_labels):",
                "        super().__init__()",
                "        self.encoder, self.config = encoder, encoder.config",
                "        self.classifier = torch.nn.Linear(encoder.config.hidden_size, num_labels)",
                "    def forward(self, input_ids=None, attention_mask=None, **kwargs):",
                "        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state",
                "        mask = attention_mask.unsqueeze(-1).to(h.dtype)",
                "        return self.classifier((h * mask).sum(1) / mask.sum(1).clamp(min=1.0))", "",
                'DIR = "path/to/run"  # holds model/ (the adapter) and tokenizer/',
                'tok = AutoTokenizer.from_pretrained(f"{DIR}/tokenizer")',
                f"id2label = {id2label!r}",
                f'base = MeanPoolingClassifier(AutoModel.from_pretrained("{base}"), {len(labels)})',
                'model = PeftModel.from_pretrained(base, f"{DIR}/model").eval()',
                f"texts = [\"{_example(labels)}\"]", tokenize,
                "with torch.inference_mode():",
                "    labels = [id2label[i] for i in model(**x).argmax(-1).tolist()]", "```", ""]
    elif m.method == "full" and m.pooling == "cls":
        out += ["With plain Transformers (`model/` is a complete sequence-classification model):", "",
                "```python", "import torch", "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
                "", 'DIR = "path/to/run"',
                'tok = AutoTokenizer.from_pretrained(f"{DIR}/tokenizer")',
                'model = AutoModelForSequenceClassification.from_pretrained(f"{DIR}/model").eval()',
                f"texts = [\"{_example(labels)}\"]", tokenize,
                "with torch.inference_mode():",
                "    labels = [model.config.id2label[i] for i in model(**x).logits.argmax(-1).tolist()]", "```", ""]
    out.append("`lorafit merge RUN -o merged/` writes a plain Transformers model "
               + ("(the adapter merged into the base) " if m.method == "lora" else "")
               + "that loads without lorafit or PEFT; its README shows how.")
    if tfidf_weight:
        out += ["", f"lorafit's predictions blend this encoder's class probabilities with a TF-IDF + logistic "
                f"regression model (`model/tfidf.json`, `model/tfidf.safetensors`) at weight {tfidf_weight:g}: "
                "(1 - w) encoder + w TF-IDF. The plain PEFT / Transformers code above and the merged model give the "
                "encoder alone (run.json `tfidf` has both accuracies)."]
    if cfg.data.clean_text:
        out += ["", "lorafit cleaned every text with `lorafit.data.clean_text` (AG News artefacts such as `#39;`) "
                "before tokenizing; outside lorafit, apply the same cleaning to get exactly its predictions."]
    return "\n".join(out)


def _example(labels: list[str]) -> str:
    return "Oil prices climb as OPEC cuts output" if "Business" in labels else "an example text"


def model_card(run_dir: str | Path, require_completed: bool = True) -> str:
    """The card's text (YAML metadata block + markdown), from the run directory's files alone."""
    from huggingface_hub import ModelCard

    path, cfg, info = read_run(run_dir, require_completed=require_completed)
    labels = read_labels(path)
    data = read_data_summary(path)
    test = read_test_metrics(path)
    m, t = cfg.model, cfg.train
    base = base_model_id(m.model)
    shown_base = base or m.model
    name = path.name
    minfo = info.get("model", {})
    quantize = m.quantize
    meta = _metadata(cfg, name, labels, data, test, base, base_license(m.model))

    method = {"lora": "LoRA adapters (PEFT) on the frozen encoder, with the classification head trained in full",
              "full": "full fine-tuning of every weight", "head": "the head alone on a frozen encoder"}[m.method]
    sizes = data.get("sizes", {})
    source = data.get("source", {})
    source_text = {"bundled": f"the AG News sample bundled with lorafit (drawn from [{AG_NEWS_HUB_ID}]"
                              f"(https://huggingface.co/datasets/{AG_NEWS_HUB_ID}))",
                   "hub": f"the Hub dataset `{source.get('name')}`" + (f" ({source.get('config')})" if source.get("config") else ""),
                   "files": "local files: " + ", ".join(f"{k} `{Path(v).name}`" for k, v in source.items()
                                                        if k != "type" and v)}.get(source.get("type"), "—")
    if data.get("split") == "resplit":
        split_text = f"all rows pooled and split into stratified train/validation/test (seed {data.get('seed')})"
    elif sizes.get("validation", 1) == 0:
        split_text = "the given test split kept; no validation split (the last epoch's weights are the model)"
    else:
        split_text = f"the given test split kept; a stratified validation set carved from train (seed {data.get('seed')})"
    lines = [
        f"# {name}", "",
        f"A text classifier for {len(labels)} classes ({', '.join(labels)}): {m.method} fine-tuning of "
        f"`{shown_base}` by lorafit, with {method}.", "",
        "## Data", "",
        f"- Source: {source_text}",
        f"- Split: {split_text}",
        f"- Rows: train {_fmt(sizes.get('train'))}, validation {_fmt(sizes.get('validation'))}, "
        f"test {_fmt(sizes.get('test'))}",
        f"- Texts truncated at {cfg.data.max_length} tokens"
        + ("; AG News artefacts repaired (`clean_text`)" if cfg.data.clean_text else ""), "",
        "## Method", "",
        f"- Backbone: `{shown_base}`" + ("" if base else " (a local directory)") + f", {m.pooling} pooling",
        f"- Trainable parameters: {_fmt(minfo.get('trainable_params'))} of {_fmt(minfo.get('total_params'))} "
        f"({_fmt(minfo.get('trainable_percent'))}%), budget {_fmt(m.param_budget) if m.param_budget else 'none'}",
    ]
    if m.method == "lora":
        lines += [f"- LoRA: r {m.lora_r}, alpha {m.lora_alpha:g}, dropout {m.lora_dropout:g}, bias {m.lora_bias}, "
                  f"targets {_fmt(m.target_modules)}, layers "
                  f"{'all' if m.lora_layers is None else _fmt(m.lora_layers)} "
                  f"({_fmt(minfo.get('lora_target_count'))} adapted linear layers)"]
    if quantize != "none":
        lines += [f"- Frozen base loaded in {quantize} through bitsandbytes (QLoRA-style k-bit training)"]
    lines += [f"- Device / precision: {info.get('device', '—')} / {info.get('precision', '—')}; "
              f"{_fmt(info.get('steps'))} steps, {_fmt(info.get('epochs_completed'))} epochs, "
              f"stopped: {info.get('stop_reason', '—')}", "",
              "## Hyperparameters", "",
              _table(["name", "value"], [[k, v] for k, v in t.model_dump().items()
                                         if k not in ("device", "num_threads", "checkpoint_every", "keep_checkpoints")]),
              "", "## Test metrics", "",
              _table(["metric", "value"], [[display, test.get(key)] for key, _, display, _ in CARD_METRICS]
                     + [["Loss", test.get("loss")], ["Examples", test.get("n")]]),
              "", _table(["class", "precision", "recall", "F1", "support"],
                         [[c, v.get("precision"), v.get("recall"), v.get("f1"), v.get("support")]
                          for c, v in test.get("per_class", {}).items()]),
              "", "## Usage", "", _usage(cfg, labels, shown_base, read_tfidf_weight(path, cfg)), "",
              "## Limitations", "",
              f"- Trained and tested on {source_text.split(' (')[0]} only; on text from other sources, topics or "
              "languages expect lower accuracy, and the classes are fixed to the ones above (no 'other').",
              f"- Texts longer than {cfg.data.max_length} tokens are truncated: only their beginning counts.",
              f"- The figures are from one run with seed {t.seed} on one test split; another seed moves them by "
              "a few tenths of a point.",
              "- Inherits the biases of the backbone's pretraining data and of the training data."]
    if quantize != "none":
        lines.append("- Trained on a quantized base: lorafit loads the base in full precision for inference, so "
                     "predictions can differ slightly from the quantized model's during training.")
    card = ModelCard(f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    return str(card)


def write_model_card(run_dir: str | Path, require_completed: bool = True) -> Path:
    """Write model/README.md atomically; return its path."""
    path = Path(run_dir) / MODEL_DIR / CARD_FILE
    text = model_card(run_dir, require_completed=require_completed)
    atomic_write_text(path, text)
    return path
