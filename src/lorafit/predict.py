"""Inference from a run directory: `lorafit.load(run_dir)` gives a classifier with scikit-learn's
predict / predict_proba conventions. The logits come from a backend: the merged PyTorch model (fp32 or bf16
autocast) or the run's exported ONNX model under ONNX Runtime (`lorafit export`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch

from .data import clean_text, encode, pad_token_id, read_table
from .errors import LorafitError
from .evaluate import batched_apply, predict_logits, softmax
from .extras import require_extra
from .rundir import MODEL_DIR, TOKENIZER_DIR, read_label_offset, read_labels, read_run, read_tfidf
from .runtime import autocast as runtime_autocast, inference_batch_size, inference_precision, resolve_device

EXPORT_DIR = "export"
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}
BACKENDS = ("auto", "torch", "onnx", "onnx-int8")


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class TorchBackend:
    """The (merged) PyTorch model; `autocast` is a context factory, e.g. bf16 on CPUs with AVX512-BF16."""

    def __init__(self, model, device: str = "cpu", autocast=None, name: str = "torch"):
        self.model, self.device, self.autocast, self.name = model, device, autocast, name

    def logits(self, enc, batch_size: int, pad_id: int) -> np.ndarray:
        return predict_logits(self.model, enc, batch_size, pad_id, self.device, autocast=self.autocast)


class OnnxBackend:
    """An exported classifier (input_ids + attention_mask -> logits) under ONNX Runtime, one thread per core."""

    def __init__(self, path: Path, threads: Optional[int] = None, name: str = "onnx", device: str = "cpu"):
        require_extra("inference", f"the {name} backend", ("onnxruntime",))
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device != "cpu":  # onnxruntime-gpu brings CUDA's provider; the CPU package does not
            provider = {"cuda": "CUDAExecutionProvider", "mps": "CoreMLExecutionProvider"}[device.split(":")[0]]
            if provider not in ort.get_available_providers():
                raise LorafitError(f"backend {name} on {device}: this onnxruntime has no {provider}; use --backend "
                                   f"torch on a GPU (or --device cpu)")
            providers.insert(0, provider)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or cpu_cores()
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.path, self.name = Path(path), name

    def logits(self, enc, batch_size: int, pad_id: int) -> np.ndarray:
        def run(batch: dict) -> np.ndarray:
            feeds = {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()}
            return self.session.run(["logits"], feeds)[0]

        out = batched_apply(enc, batch_size, pad_id, run)
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)


class Classifier:
    """A trained text classifier. `classes_` holds the label names in id order; `backend.name` says what runs."""

    def __init__(self, model, tokenizer, label_names: list[str], max_length: int, clean: bool,
                 batch_size: int = 16, device: str = "cpu", autocast=None, run_dir: Optional[Path] = None,
                 backend=None, tfidf=None, label_offset: int = 0):
        self.model = model  # None when an ONNX backend serves
        # what the training data's integer ids counted from (data.json): class i is the data's id i + label_offset
        self.label_offset = label_offset
        self.tokenizer = tokenizer
        self.classes_ = np.asarray(label_names, dtype=object)
        self.max_length = max_length
        self.clean = clean
        self.batch_size = batch_size
        self.device = device
        self.autocast = autocast
        self.run_dir = run_dir
        self.backend = backend or TorchBackend(model, device, autocast)
        self.tfidf = tfidf  # the run's TF-IDF model (tfidf.TfidfModel), blended into every prediction; or None

    def _texts(self, texts: Sequence[str], allow_blank: bool = False) -> list[str]:
        if isinstance(texts, str):
            raise LorafitError("predict takes a list of texts, not a single string: wrap it as [text]")
        out = []
        for i, t in enumerate(texts):
            # a blank text is refused by default (usually a wrong column); batch prediction of a file asks for the
            # model's answer to it instead, so that every input row keeps its output row (issue 24)
            if not isinstance(t, str) or (not allow_blank and not t.strip()):
                raise LorafitError(f"text {i}: empty or not a string; every input needs some text")
            out.append(clean_text(t) if self.clean else t)
        return out

    def decision_function(self, texts: Sequence[str], allow_blank: bool = False) -> np.ndarray:
        """Logits, shape (n_texts, n_classes): the encoder's, or with a TF-IDF model the log of the blended
        probabilities (what the run's test metrics measured). allow_blank: accept empty or whitespace texts
        (the tokenizer's special tokens alone) instead of refusing them."""
        texts = self._texts(texts, allow_blank)
        if not texts:
            return np.zeros((0, len(self.classes_)), dtype=np.float32)
        logits = self.encoder_logits(texts)
        return self.tfidf.blend(logits, texts) if self.tfidf is not None else logits

    def encoder_logits(self, texts: Sequence[str]) -> np.ndarray:
        """The encoder's logits for `texts` as given (not cleaned, not blended), each tokenized once, truncated to
        the run's max length (the distillation teacher's texts are cleaned already)."""
        enc = encode(self.tokenizer, texts, self.max_length, full_lengths=False)
        return self.backend.logits(enc, self.batch_size, pad_token_id(self.tokenizer))

    def predict_proba(self, texts: Sequence[str], allow_blank: bool = False) -> np.ndarray:
        """Class probabilities, shape (n_texts, n_classes), columns in `classes_` order."""
        return softmax(self.decision_function(texts, allow_blank))

    def predict(self, texts: Sequence[str], allow_blank: bool = False) -> np.ndarray:
        """Label names, one per text."""
        return self.classes_[self.decision_function(texts, allow_blank).argmax(-1)]


def resolve_backend(run_dir: Path, backend: str, device: str = "cpu") -> tuple[str, Optional[Path]]:
    """'auto' takes the run's exported ONNX model on a CPU when there is one (int8 if it was exported), else
    torch: on a GPU torch in bf16 is the fast path, and the export exists for CPUs."""
    if backend not in BACKENDS:
        raise LorafitError(f"backend '{backend}': use one of {', '.join(BACKENDS)}")
    export = Path(run_dir) / EXPORT_DIR
    if backend == "auto":
        if device == "cpu":
            for name in ("onnx-int8", "onnx"):
                if (export / ONNX_FILES[name]).is_file():
                    return name, export / ONNX_FILES[name]
        return "torch", None
    if backend == "torch":
        return "torch", None
    path = export / ONNX_FILES[backend]
    if not path.is_file():
        flag = " --int8" if backend == "onnx-int8" else ""
        raise LorafitError(f"{path}: not exported yet; run: lorafit export {run_dir} --format onnx{flag}")
    return backend, path


def torch_backend_name(precision: str) -> str:
    """The PyTorch backend's name for a precision: 'torch' (fp32) or 'torch-bf16' (also a distill cache key)."""
    return "torch" if precision == "fp32" else "torch-bf16"


def load(run_dir: str | Path, device: str = "auto", batch_size: Union[int, str] = "auto", merge: bool = True,
         backend: str = "auto", precision: str = "auto", allow_different_base: bool = False) -> Classifier:
    """Load a completed run's classifier (weights are read as safetensors or ONNX; nothing is unpickled).

    The options are InferenceConfig's (config.py), as `lorafit predict` takes them:
    device: 'auto' (a CUDA GPU where there is one, then MPS, then the CPU), 'cpu', 'cuda' or 'mps'.
    backend: 'auto' (on a CPU the run's ONNX export if present, else torch), 'torch', 'onnx' or 'onnx-int8'.
    precision: torch only; 'auto' is bf16 on a GPU that has it and fp32 on a CPU; 'bf16' runs under bf16 autocast
    (fast on CPUs with AVX512-BF16 or AMX).
    batch_size: texts per forward, sorted by length; 'auto' is 16 on a CPU (faster than 64 on 2 cores,
    bench/inference.py) and 256 on a GPU.
    allow_different_base: rebuild a LoRA or head-only run (torch backend) on its backbone even when that backbone
    is no longer the one recorded in run.json (`backbone`); by default that is refused. Full fine-tuning runs
    and ONNX exports hold every weight themselves and are not checked.
    """
    # the grad mode is the caller's: whatever loading does to it is undone on return
    with torch.set_grad_enabled(torch.is_grad_enabled()):
        return _load(Path(run_dir), device, batch_size, merge, backend, precision, allow_different_base)


def _load(run_dir: Path, device: str, batch_size: Union[int, str], merge: bool, backend: str, precision: str,
          allow_different_base: bool) -> Classifier:
    from .model import check_backbone, load_trained, load_tokenizer

    run_dir, cfg, info = read_run(run_dir)
    label_names = read_labels(run_dir)
    device = resolve_device(device, field="device")
    batch_size = inference_batch_size(batch_size, device)
    tokenizer = load_tokenizer(str(run_dir / TOKENIZER_DIR))
    kind, onnx_path = resolve_backend(run_dir, backend, device)
    tfidf = read_tfidf(run_dir, cfg)  # blending at config.yaml's model.tfidf_weight
    model = autocast = None
    if kind != "torch":
        backend = OnnxBackend(onnx_path, name=kind, device=device)
    else:
        precision = inference_precision(precision, device)
        if cfg.model.method != "full":  # a full run saved every weight; the others are rebuilt on the backbone
            check_backbone(info.get("backbone"), cfg.model.model, run_dir, allow_different_base)
        model = load_trained(cfg.model, label_names, run_dir / MODEL_DIR, merge=merge).to(device)
        if precision == "bf16":
            device_type = torch.device(device).type
            autocast = lambda: runtime_autocast(precision, device_type)  # noqa: E731
        backend = TorchBackend(model, device, autocast, name=torch_backend_name(precision))
    return Classifier(model, tokenizer, label_names, cfg.data.max_length, cfg.data.clean_text, batch_size=batch_size,
                      device=device, autocast=autocast, run_dir=run_dir, backend=backend, tfidf=tfidf,
                      label_offset=read_label_offset(run_dir))


# --- files in, predictions out ------------------------------------------------------------------------------
def read_inputs(path: str | Path, allow_pickle: bool = False, text_column: str = "text") -> pd.DataFrame:
    """A table of texts to classify: whatever `read_table` reads, or plain text with one text per line
    (returned as a one-column table named `text_column`)."""
    path = Path(path)
    if path.name.lower().endswith(".txt"):
        if not path.is_file():
            raise LorafitError(f"{path}: file not found")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise LorafitError(f"{path}: not valid UTF-8 text (byte {exc.start}); re-save the file as UTF-8") from None
        while lines and not lines[-1].strip():  # a trailing newline is not a text
            lines.pop()
        if not lines:
            raise LorafitError(f"{path}: file is empty")
        return pd.DataFrame({text_column: lines})
    return read_table(path, allow_pickle=allow_pickle)


def input_texts(df: pd.DataFrame, columns: list[str], origin: str) -> list[str]:
    """The text of every row (columns joined with a space); an empty row is an error naming its line."""
    from .config import DataConfig
    from .data import texts_from

    cfg = DataConfig(text_columns=columns) if len(columns) > 1 else DataConfig(text_column=columns[0])
    return texts_from(df, cfg, origin)
