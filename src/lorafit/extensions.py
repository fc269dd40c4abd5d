"""The recipe's extension points: what a feature may change in a training run without the loop knowing it.

A feature is an Extension whose hooks the recipe (recipe.py) calls at named moments, or a loss function that
replaces or wraps the default one; train.extensions_for picks them from the config. lorafit's own: distillation
(distill.Distillation), the TF-IDF blend (blend.TfidfBlend) and R-Drop (rdrop.RDrop).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .data_prep import PreparedData

# loss_fn(forward, batch) -> (loss, logits of the batch's rows): runs the forward as it needs (R-Drop runs every
# row twice), so the loss is the one extension point for what a step optimises
LossFn = Callable[[Callable[[dict], torch.Tensor], dict], tuple[torch.Tensor, torch.Tensor]]


class CrossEntropyLoss:
    """The default loss: cross-entropy of the logits against the labels (train.label_smoothing)."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def __call__(self, forward, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = forward(batch)
        return F.cross_entropy(logits.float(), batch["labels"], label_smoothing=self.label_smoothing), logits


class Extension:
    """A feature that plugs into the recipe. Each hook is a no-op here; a feature defines those it needs. `recipe`
    is the running recipe.TrainingRecipe (its cfg, runtime, data, record, run_dir, evaluate()). Hooks
    run on every process, in the order the extensions were given, except on_start, on_evaluate, model_parts and
    on_finish (the main process only, which writes the run directory)."""

    def prepare_data(self, recipe, data: PreparedData) -> PreparedData:
        """The data is encoded; no model or run directory yet: may return other data (more training rows)."""
        return data

    def loss_fn(self, recipe, loss_fn: LossFn) -> LossFn:
        """Replace or wrap the loss (the plain cross-entropy, or what an earlier extension made of it)."""
        return loss_fn

    def on_start(self, recipe) -> None:
        """The run directory is open and the model ready: run.json may be updated."""

    def on_evaluate(self, recipe, split: str, step: int, metrics: dict) -> None:
        """After each validation evaluation; what it raises ends the run (marked failed), e.g. optuna.TrialPruned."""

    def after_training(self, recipe) -> None:
        """Training is over and the best weights are back; the test split is not evaluated yet."""

    def transform_logits(self, recipe, split: str, logits: np.ndarray) -> np.ndarray:
        """What an evaluation reports instead of the model's logits (the TF-IDF blend)."""
        return logits

    def model_parts(self, recipe) -> list:
        """What prediction needs beside the weights, saved into model/ with them (each has save(directory))."""
        return []

    def on_finish(self, recipe, test_metrics: dict) -> None:
        """The run is complete in run.json: facts for the record."""
