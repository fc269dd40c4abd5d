"""The TF-IDF blend (model.tfidf_weight > 0), as a recipe extension. It never touches training: once the encoder
is trained (best weights restored), a TF-IDF model (tfidf.py) is fitted on the labelled training rows and mixed
into every later evaluation's logits, the test evaluation included, and saved beside the weights in model/, so
that predict and serve blend the same way."""

from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np

from .evaluate import accuracy
from .extensions import Extension
from .tfidf import TfidfModel, fit_tfidf


class TfidfBlend(Extension):
    def __init__(self, weight: float):
        self.weight = weight
        self.model: Optional[TfidfModel] = None  # fitted after training; until then evaluations are the encoder's
        self.encoder_logits: dict[str, np.ndarray] = {}  # each split's logits before the blend
        self.best_validation: Optional[np.ndarray] = None  # the encoder's validation logits at its best step
        self.info: dict[str, Any] = {}  # run.json's tfidf section

    def on_evaluate(self, recipe, split: str, step: int, metrics: dict) -> None:
        if step == recipe.state.best_step:  # this evaluation is the best so far: its weights are the ones kept
            self.best_validation = self.encoder_logits["validation"]

    def after_training(self, recipe) -> None:
        """Fit on the labelled training rows (every process fits the same deterministic model, so their metrics
        agree; a search's trials share one fit through `reuse`) and measure the blend on validation (the main
        process, which records it)."""
        cfg, b = recipe.cfg, recipe.data.bundle
        if recipe.main and recipe.has_validation and self.best_validation is None:  # resumed after the best step
            recipe.evaluate("validation")  # the restored best weights
            self.best_validation = self.encoder_logits["validation"]
        validation_logits = self.best_validation
        key = ("tfidf", json.dumps([cfg.data.model_dump(mode="json"), cfg.data_seed], sort_keys=True))
        found = recipe.reuse.get(key) if recipe.reuse is not None else None
        if found is None:
            labelled = b.train.labels >= 0  # a distilled student's teacher-only rows carry no label
            validation = (b.validation.texts, b.validation.labels) if recipe.has_validation else None
            found = fit_tfidf([t for t, keep in zip(b.train.texts, labelled) if keep], b.train.labels[labelled],
                              len(b.label_names), self.weight, validation)
            if recipe.reuse is not None:
                recipe.reuse[key] = found
        fitted, info = found
        self.model = TfidfModel(fitted.vectorizer, fitted.coef, fitted.intercept, self.weight, fitted.c)
        self.info = dict(info)
        if validation_logits is not None:
            labels = b.validation.labels
            self.info.update(validation_accuracy_encoder=accuracy(validation_logits, labels),
                             validation_accuracy_blend=accuracy(self.model.blend(validation_logits,
                                                                                 b.validation.texts), labels))

    def transform_logits(self, recipe, split: str, logits: np.ndarray) -> np.ndarray:
        self.encoder_logits[split] = logits
        if self.model is None:
            return logits
        return self.model.blend(logits, getattr(recipe.data.bundle, split).texts)

    def model_parts(self, recipe) -> list:
        return [self.model]

    def on_finish(self, recipe, test_metrics: dict[str, Any]) -> None:
        if test_metrics:
            b = recipe.data.bundle
            self.info.update(test_accuracy_encoder=accuracy(self.encoder_logits["test"], b.test.labels),
                             test_accuracy_tfidf=accuracy(self.model.proba(b.test.texts), b.test.labels),
                             test_accuracy_blend=test_metrics["accuracy"])
        recipe.record.update(tfidf=self.info)
