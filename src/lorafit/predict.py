"""Inference from a run directory: `lorafit.load(run_dir)` gives a classifier with scikit-learn's
predict / predict_proba conventions."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .data import clean_text, encode
from .errors import LorafitError
from .evaluate import predict_logits, softmax
from .rundir import read_labels, read_run


class Classifier:
    """A trained text classifier. `classes_` holds the label names in id order."""

    def __init__(self, model, tokenizer, label_names: list[str], max_length: int, clean: bool,
                 batch_size: int = 64, device: str = "cpu", autocast=None, run_dir: Optional[Path] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.classes_ = np.asarray(label_names, dtype=object)
        self.max_length = max_length
        self.clean = clean
        self.batch_size = batch_size
        self.device = device
        self.autocast = autocast
        self.run_dir = run_dir

    def _texts(self, texts: Sequence[str]) -> list[str]:
        if isinstance(texts, str):
            raise LorafitError("predict takes a list of texts, not a single string: wrap it as [text]")
        out = []
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise LorafitError(f"text {i}: empty or not a string; every input needs some text")
            out.append(clean_text(t) if self.clean else t)
        return out

    def decision_function(self, texts: Sequence[str]) -> np.ndarray:
        """Raw logits, shape (n_texts, n_classes)."""
        texts = self._texts(texts)
        if not texts:
            return np.zeros((0, len(self.classes_)), dtype=np.float32)
        enc = encode(self.tokenizer, texts, self.max_length)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return predict_logits(self.model, enc, self.batch_size, pad, self.device, autocast=self.autocast)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities, shape (n_texts, n_classes), columns in `classes_` order."""
        return softmax(self.decision_function(texts))

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Label names, one per text."""
        return self.classes_[self.decision_function(texts).argmax(-1)]


def load(run_dir: str | Path, device: str = "cpu", batch_size: int = 64, merge: bool = True) -> Classifier:
    """Load a completed run's classifier (weights are read as safetensors; nothing is unpickled)."""
    from .model import load_trained, load_tokenizer

    run_dir, cfg, _ = read_run(run_dir)
    label_names = read_labels(run_dir)
    tokenizer = load_tokenizer(str(run_dir / "tokenizer"))
    model = load_trained(cfg.model, label_names, run_dir / "model", merge=merge).to(device)
    torch.set_grad_enabled(True)  # loading must not leave global autograd state changed
    return Classifier(model, tokenizer, label_names, cfg.data.max_length, cfg.data.clean_text,
                      batch_size=batch_size, device=device, run_dir=run_dir)
