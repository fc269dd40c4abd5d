"""Leave lorafit behind: `merge` writes the adapter merged into the base as a plain Transformers model;
`export_onnx` writes the whole classifier (input_ids + attention_mask -> logits) as ONNX under RUN/export/,
optionally int8-quantised, and checks its labels against the run's own PyTorch model on the run's test texts."""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from .errors import LorafitError
from .evaluate import accuracy
from .fileio import atomic_directory, atomic_write_json, atomic_write_text
from .predict import EXPORT_DIR, ONNX_FILES, OnnxBackend, load
from .rundir import now, read_run, read_test_texts, read_tfidf_weight

MEAN_POOLING_README = """# {name}: merged encoder + mean-pooling head (exported by lorafit)

Transformers has no sequence-classification class with mean pooling, so this directory holds the merged
encoder as a plain Transformers model (`AutoModel`) and the linear head in `head.safetensors`
(`weight` {classes}x{hidden}, `bias` {classes}). Labels: `config.json` `id2label`: {labels}.

```python
import torch, transformers, safetensors.torch
tok, enc = transformers.AutoTokenizer.from_pretrained(DIR), transformers.AutoModel.from_pretrained(DIR).eval()
head = safetensors.torch.load_file(f"{{DIR}}/head.safetensors")
x = tok(texts, padding=True, truncation=True, max_length={max_length}, return_tensors="pt")
with torch.inference_mode(): h, m = enc(**x).last_hidden_state, x["attention_mask"].unsqueeze(-1).float()
labels = [enc.config.id2label[i] for i in (((h * m).sum(1) / m.sum(1)) @ head["weight"].T + head["bias"]).argmax(-1).tolist()]
```
{clean_note}"""

CLEAN_NOTE = ("lorafit cleaned every text with `lorafit.data.clean_text` (AG News artefacts such as `#39;`) before "
              "tokenizing; apply the same cleaning to get exactly the run's predictions.\n")


def _write_dir_atomically(out: Path, overwrite: bool, fill) -> None:
    """Fill a temporary sibling directory, then rename it into place: no half-written model directory."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise LorafitError(f"{out}: exists and is not empty; choose another -o DIR or pass --overwrite")
    if out.exists() and not out.is_dir():
        out.unlink()
    with atomic_directory(out) as tmp:
        fill(tmp)


def merge(run_dir: str | Path, out: str | Path, overwrite: bool = False,
          allow_different_base: bool = False) -> dict[str, Any]:
    """Write the run's model with LoRA merged into the base weights, loadable without lorafit.

    cls pooling: a plain AutoModelForSequenceClassification directory (with the tokenizer).
    mean pooling: the merged encoder (AutoModel) + head.safetensors + README.md with the pooling recipe.
    """
    from safetensors.torch import save_file

    from .model import MeanPoolingClassifier

    run_dir, cfg, _ = read_run(run_dir)
    clf = load(run_dir, backend="torch", allow_different_base=allow_different_base)
    model = clf.model
    mean = isinstance(model, MeanPoolingClassifier)

    def fill(tmp: Path) -> None:
        if mean:
            model.encoder.save_pretrained(tmp, safe_serialization=True)
            head = model.classifier
            save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
                      tmp / "head.safetensors")
            atomic_write_text(tmp / "README.md", MEAN_POOLING_README.format(
                name=Path(out).name, classes=head.out_features, hidden=head.in_features,
                labels=", ".join(clf.classes_), max_length=cfg.data.max_length,
                clean_note=CLEAN_NOTE if cfg.data.clean_text else ""))
        else:
            model.save_pretrained(tmp, safe_serialization=True)
            if cfg.data.clean_text:
                atomic_write_text(tmp / "README.md", f"# {Path(out).name} (exported by lorafit)\n\n"
                                  "Loads with `AutoModelForSequenceClassification.from_pretrained(DIR)`; truncate at "
                                  f"max_length={cfg.data.max_length}.\n\n{CLEAN_NOTE}")
        clf.tokenizer.save_pretrained(tmp)

    _write_dir_atomically(Path(out), overwrite, fill)
    return {"out": str(out), "pooling": "mean" if mean else "cls",
            "loads_with": "AutoModel + head.safetensors (see README.md)" if mean else "AutoModelForSequenceClassification",
            # the merged model is the encoder; the run's TF-IDF blend stays in the run (lorafit.load applies it)
            "tfidf_weight_not_merged": read_tfidf_weight(run_dir, cfg) or None}


class _LogitsOnly(nn.Module):
    """The classifier as ONNX sees it: two integer tensors in, logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _check_texts(run_dir: Path, limit: Optional[int]) -> tuple[list[str], Optional[np.ndarray]]:
    """The run's test texts and labels (from test_predictions.csv) to compare the exported model on."""
    texts, labels = read_test_texts(run_dir)
    if not texts:
        return [], None
    if limit:
        texts, labels = texts[:limit], labels[:limit]
    return texts, np.asarray(labels, dtype=object)


def export_onnx(run_dir: str | Path, int8: bool = False, opset: int = 17, check_rows: Optional[int] = None,
                allow_different_base: bool = False) -> dict[str, Any]:
    """Export the merged classifier to RUN/export/model.onnx (dynamic batch and sequence axes) and, with
    int8, a dynamically quantised RUN/export/model.int8.onnx; compare both with the PyTorch model."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    run_dir, cfg, _ = read_run(run_dir)
    clf = load(run_dir, backend="torch", allow_different_base=allow_different_base)
    export = run_dir / EXPORT_DIR
    export.mkdir(exist_ok=True)
    wrapped = _LogitsOnly(clf.model).eval()  # eval first: the exporter restores the wrapper's mode afterwards
    # a padded example batch, so the traced graph keeps the attention-mask path
    sample = clf.tokenizer(["a short text", "a somewhat longer example text to classify"], padding=True,
                           return_tensors="pt")
    files = {"onnx": export / ONNX_FILES["onnx"]}
    tmp = export / f".{ONNX_FILES['onnx']}.tmp"
    try:
        # the exporter may leave grad mode changed: set_grad_enabled as a context restores the caller's on exit
        with warnings.catch_warnings(), torch.set_grad_enabled(torch.is_grad_enabled()):
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes are expected
            torch.onnx.export(
                wrapped, (sample["input_ids"], sample["attention_mask"]), str(tmp), dynamo=False,
                input_names=["input_ids", "attention_mask"], output_names=["logits"], opset_version=opset,
                dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                              "logits": {0: "batch"}},
            )
        tmp.replace(files["onnx"])
        int8_path = export / ONNX_FILES["onnx-int8"]
        if int8:
            tmp8 = export / f".{ONNX_FILES['onnx-int8']}.tmp"
            # the MatMuls only: int8 weights per output channel, activations quantised on the fly (no calibration
            # data). The embedding table (Gather) stays fp32: quantising it cost 0.2 more accuracy points on
            # AG News for no speed (a lookup), and onnxruntime's hint to pre-process first is noise here.
            with _quiet_root_logger():
                quantize_dynamic(files["onnx"], tmp8, weight_type=QuantType.QInt8, per_channel=True,
                                 op_types_to_quantize=["MatMul"])
            tmp8.replace(int8_path)
            files["onnx-int8"] = int8_path
        elif int8_path.exists():
            int8_path.unlink()  # the export directory reflects the last export; auto must not pick a stale file
    finally:
        for leftover in export.glob(".*.tmp"):
            leftover.unlink()

    report: dict[str, Any] = {
        "format": "onnx", "opset": opset, "created_at": now(),
        "files": {k: v.name for k, v in files.items()}, "inputs": ["input_ids", "attention_mask"], "outputs": ["logits"],
        "pooling": cfg.model.pooling, "versions": {"torch": torch.__version__, "onnxruntime": _ort_version()},
    }
    texts, labels = _check_texts(run_dir, check_rows)
    if texts:
        report["check"] = compare(clf, texts, labels, files)
    atomic_write_json(export / "export.json", report)
    return report


def compare(clf, texts: list[str], labels: Optional[np.ndarray], files: dict[str, Path]) -> dict[str, Any]:
    """Labels and logits of each exported file against the PyTorch model on the same texts."""
    ref = clf.decision_function(texts)
    ref_pred = ref.argmax(-1)
    truth = None
    if labels is not None:
        index = {n: i for i, n in enumerate(clf.classes_)}
        truth = np.array([index.get(str(x), -1) for x in labels])
    out: dict[str, Any] = {"n": len(texts), "texts": "the run's test split (test_predictions.csv)"}
    if truth is not None:
        out["torch"] = {"accuracy": accuracy(ref, truth)}
    torch_backend = clf.backend
    try:
        for name, path in files.items():
            clf.backend = OnnxBackend(path, name=name)
            logits = clf.decision_function(texts)
            row = {"agreement": accuracy(logits, ref_pred),
                   "max_abs_logit_diff": float(np.abs(logits - ref).max())}
            if truth is not None:
                row["accuracy"] = accuracy(logits, truth)
                row["accuracy_change_points"] = round(100 * (row["accuracy"] - out["torch"]["accuracy"]), 2)
            out[name] = row
    finally:
        clf.backend = torch_backend
    return out


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
