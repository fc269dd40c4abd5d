"""R-Drop (train.rdrop_alpha; Liang et al., 2021), as a recipe extension: every row runs twice in one batch, so
each copy gets its own dropout masks, and the loss adds alpha x the symmetric KL between the two predictions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .extensions import Extension


def symmetric_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """R-Drop's penalty: (KL(p_a || p_b) + KL(p_b || p_a)) / 2 of two predictions of the same rows, mean over rows."""
    la, lb = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
    return (F.kl_div(lb, la, reduction="batchmean", log_target=True) +
            F.kl_div(la, lb, reduction="batchmean", log_target=True)) / 2


class RDropLoss:
    """Wraps a loss function (recipe.LossFn): the base loss over both copies of every row, plus the penalty; the
    logits it returns are the first copy's, so the loop's statistics count every row once."""

    def __init__(self, base, alpha: float):
        self.base = base
        self.alpha = alpha

    def __call__(self, forward, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        rows = len(batch["labels"])
        loss, logits = self.base(forward, {k: torch.cat([v, v]) for k, v in batch.items()})
        return loss + self.alpha * symmetric_kl(*logits.float().split(rows)), logits[:rows]


class RDrop(Extension):
    def __init__(self, alpha: float):
        self.alpha = alpha

    def loss_fn(self, recipe, loss_fn):
        return RDropLoss(loss_fn, self.alpha)
