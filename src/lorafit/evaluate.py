"""Evaluation: run a model over encoded texts and compute the metrics every stage reports (scikit-learn)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .data import Collator, Encoded, EncodedDataset, sorted_batches


def batched_apply(enc: Encoded, batch_size: int, pad_token_id: int, run: Callable[[dict], Any]) -> Optional[np.ndarray]:
    """The one batching loop of inference, evaluation and the prefix cache: batches sorted by length (longest
    first: minimal padding, memory peaks early), padded by the training Collator, then `run(batch)` on each.
    `batch` holds input_ids, attention_mask and index (each row's position in `enc`). When `run` returns
    per-row outputs (batch dimension first), they come back as one array in input order; when it stores its
    results itself (the prefix cache, by `index`), it returns None and so does this."""
    collate, dataset = Collator(pad_token_id), EncodedDataset(enc)
    out = None
    for batch_idx in sorted_batches([len(x) for x in enc.input_ids], batch_size):
        result = run(collate([dataset[i] for i in batch_idx]))
        if result is None:
            continue
        result = result.detach().float().cpu().numpy() if isinstance(result, torch.Tensor) else np.asarray(result)
        if out is None:
            out = np.empty((len(enc), *result.shape[1:]), dtype=np.float32)
        out[np.asarray(batch_idx)] = result  # back to input order
    return out


@torch.inference_mode()
def predict_logits(model, enc: Encoded, batch_size: int, pad_token_id: int, device, autocast=None,
                   forward=None) -> np.ndarray:
    """Logits in input order (see batched_apply).
    `forward(batch) -> logits` replaces the plain model call (the frozen-prefix cache uses it)."""
    was_training = model.training
    model.eval()

    def run(batch: dict) -> torch.Tensor:
        with autocast() if autocast is not None else contextlib.nullcontext():
            if forward is not None:
                return forward(batch)
            return model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits

    try:
        out = batched_apply(enc, batch_size, pad_token_id, run)
    finally:
        model.train(was_training)
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    return F.softmax(torch.from_numpy(logits), dim=-1).numpy()


def accuracy(scores: np.ndarray, labels) -> float:
    """The share of rows whose highest score (logit or probability) is their label; nan without rows."""
    return float((np.asarray(scores).argmax(-1) == np.asarray(labels)).mean()) if len(labels) else float("nan")


def compute_metrics(labels: np.ndarray, logits: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro/weighted precision-recall-F1, loss, per-class report and confusion matrix."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    labels = np.asarray(labels)
    preds = logits.argmax(-1)
    k = len(label_names)
    ids = list(range(k))
    loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()) if len(labels) else float("nan")
    out: dict[str, Any] = {"n": int(len(labels)), "accuracy": float(accuracy_score(labels, preds)), "loss": loss}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=ids, average=avg, zero_division=0)
        out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = float(p), float(r), float(f)
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=ids, average=None, zero_division=0)
    out["per_class"] = {
        name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, name in enumerate(label_names)
    }
    out["confusion_matrix"] = confusion_matrix(labels, preds, labels=ids).tolist()
    return out


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers worth a line in metrics.jsonl (no per-class tables)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def better(metric: str, new: float, best: Optional[float]) -> bool:
    if best is None:
        return True
    return new < best if metric == "loss" else new > best
