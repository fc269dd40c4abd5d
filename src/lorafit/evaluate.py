"""Evaluation: run a model over encoded texts and compute the metrics every stage reports (scikit-learn)."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .data import Collator, Encoded, EncodedDataset, sorted_batches


@torch.inference_mode()
def predict_logits(model, enc: Encoded, batch_size: int, pad_token_id: int, device, autocast=None,
                   forward=None) -> np.ndarray:
    """Logits in input order. Batches are sorted by length so padding is minimal, then un-sorted.
    `forward(batch) -> logits` replaces the plain model call (the frozen-prefix cache uses it)."""
    was_training = model.training
    model.eval()
    collate = Collator(pad_token_id)
    dataset = EncodedDataset(enc)
    chunks, order = [], []
    for batch_idx in sorted_batches([len(x) for x in enc.input_ids], batch_size):
        batch = collate([dataset[i] for i in batch_idx])
        ctx = autocast() if autocast is not None else torch.autocast(device_type="cpu", enabled=False)
        with ctx:
            if forward is not None:
                logits = forward(batch)
            else:
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits
        chunks.append(logits.float().cpu().numpy())
        order += batch_idx
    out = np.zeros((0, 0), dtype=np.float32)
    if chunks:
        out = np.empty((len(enc), chunks[0].shape[1]), dtype=np.float32)
        out[np.asarray(order)] = np.concatenate(chunks)
    model.train(was_training)
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    return F.softmax(torch.from_numpy(logits), dim=-1).numpy()


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
