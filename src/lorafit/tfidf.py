"""The TF-IDF + logistic regression model blended with the encoder (`model.tfidf_weight`).

A lexical model reads every word of a text however long it is, and on a few thousand training rows it errs on
other texts than a fine-tuned encoder does; averaging the two models' class probabilities beat the encoder alone
in 5-fold cross-validation on the bundled AG News training rows (docs/accuracy.md). scikit-learn fits both parts;
written here: the blend, and saving the model without pickle (vocabulary as JSON, idf and coefficients as
safetensors, read back into scikit-learn's own TfidfVectorizer), so that loading a run never runs code.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .errors import LorafitError
from .evaluate import accuracy, softmax
from .fileio import atomic_write_text

# inverse regularisation, fixed: one fit (about 2 s on 4,000 texts). The tfidf baseline of bench/accuracy.py, which
# picks C from 1-30 on validation, picked 30 in 6 of 8 seeds of the bundled sample (docs/accuracy.md)
C = 30.0
VECTORIZER = {"ngram_range": (1, 2), "sublinear_tf": True, "strip_accents": "unicode", "lowercase": True}
JSON_FILE, WEIGHTS_FILE = "tfidf.json", "tfidf.safetensors"
# 2: tfidf.json holds the fitted model only; the blend weight is the run's config.yaml model.tfidf_weight
# (rundir.read_tfidf_weight). Format 1 also held the weight (the same value): read, its weight ignored.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)


class TfidfModel:
    """Word 1-2-gram TF-IDF features and a multinomial logistic regression; `blend` mixes it into logits with
    `weight`, which is not saved with the model: a run's is its config's model.tfidf_weight."""

    def __init__(self, vectorizer, coef: np.ndarray, intercept: np.ndarray, weight: float, c: float):
        self.vectorizer = vectorizer
        self.coef = np.asarray(coef, dtype=np.float32)  # (classes, features)
        self.intercept = np.asarray(intercept, dtype=np.float32)  # (classes,)
        self.weight = float(weight)
        self.c = float(c)

    @property
    def n_features(self) -> int:
        return self.coef.shape[1]

    def proba(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities, shape (n_texts, n_classes)."""
        if not len(texts):
            return np.zeros((0, len(self.intercept)), dtype=np.float32)
        z = np.asarray(self.vectorizer.transform(texts) @ self.coef.T) + self.intercept
        return softmax(z).astype(np.float32)

    def blend(self, logits: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """Logits whose softmax is (1 - weight) * softmax(logits) + weight * proba(texts): every reader of
        logits (metrics, predictions, serving) then sees the blended probabilities."""
        mixed = (1.0 - self.weight) * softmax(np.asarray(logits, dtype=np.float64)) + self.weight * self.proba(texts)
        return np.log(np.clip(mixed, 1e-12, None)).astype(np.float32)

    # --- files: model/tfidf.json + model/tfidf.safetensors (the fitted model; not the weight) -----------------
    def save(self, directory: Path) -> None:
        from safetensors.numpy import save_file

        vocabulary = sorted(self.vectorizer.vocabulary_, key=self.vectorizer.vocabulary_.get)
        save_file({"idf": self.vectorizer.idf_.astype(np.float32), "coef": self.coef, "intercept": self.intercept},
                  str(Path(directory) / WEIGHTS_FILE))
        atomic_write_text(Path(directory) / JSON_FILE, json.dumps(
            {"format_version": FORMAT_VERSION, "C": self.c,
             "vectorizer": {k: list(v) if isinstance(v, tuple) else v for k, v in VECTORIZER.items()},
             "vocabulary": vocabulary}, ensure_ascii=False))

    @classmethod
    def load(cls, directory: Path, weight: float) -> Optional["TfidfModel"]:
        """The TF-IDF model saved in `directory`, blending at `weight`, or None when there is none (tfidf_weight 0,
        or a run from before it existed). A run's: rundir.read_tfidf, which takes the weight from its config."""
        from safetensors.numpy import load_file
        from sklearn.feature_extraction.text import TfidfVectorizer

        path = Path(directory) / JSON_FILE
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            arrays = load_file(str(Path(directory) / WEIGHTS_FILE))
        except Exception as exc:  # noqa: BLE001 - unreadable JSON or safetensors: one line, whatever the parser raised
            raise LorafitError(f"{path.parent}: the TF-IDF model is unreadable ({exc}); train the run again") from None
        if meta.get("format_version") not in READABLE_FORMATS:
            raise LorafitError(f"{path}: TF-IDF format {meta.get('format_version')} is not one this lorafit reads "
                               f"({', '.join(map(str, READABLE_FORMATS))}); upgrade lorafit")
        options = dict(meta["vectorizer"], ngram_range=tuple(meta["vectorizer"]["ngram_range"]))
        vectorizer = TfidfVectorizer(**options, dtype=np.float32,
                                     vocabulary={word: i for i, word in enumerate(meta["vocabulary"])})
        vectorizer.idf_ = arrays["idf"]
        return cls(vectorizer, arrays["coef"], arrays["intercept"], weight, meta["C"])


def fit_tfidf(texts: Sequence[str], labels: np.ndarray, n_classes: int, weight: float,
              validation: Optional[tuple[Sequence[str], np.ndarray]] = None) -> tuple[TfidfModel, dict[str, Any]]:
    """Fit on the training rows. Returns the model (blending at `weight`) and what run.json records about it:
    measurements (C, features, fit time, the TF-IDF model's own accuracy on the validation split when there is
    one), not the weight, which the run's config holds."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    t0 = time.time()
    labels = np.asarray(labels)
    vectorizer = TfidfVectorizer(**VECTORIZER, dtype=np.float32)
    x = vectorizer.fit_transform(texts)
    # one thread: the fit is small, and OpenMP's spin-waiting made such fits 10x slower on a loaded machine
    with threadpool_limits(1):
        lr = LogisticRegression(C=C, max_iter=3000).fit(x, labels)
    coef, intercept = _class_rows(lr, n_classes)
    model = TfidfModel(vectorizer, coef, intercept, weight, C)
    score = None
    if validation is not None and len(validation[0]):
        score = accuracy(model.proba(validation[0]), validation[1])
    info = {"C": C, "features": model.n_features, "validation_accuracy_tfidf": score,
            "fit_s": round(time.time() - t0, 2)}
    return model, info


def _class_rows(lr, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients with one row per class id: a binary fit's single row w becomes (-w/2, w/2), whose softmax is
    its sigmoid; a class absent from the training rows gets probability ~0."""
    coef, intercept = lr.coef_, lr.intercept_
    if coef.shape[0] == 1:
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    full_coef = np.zeros((n_classes, coef.shape[1]), dtype=np.float32)
    full_intercept = np.full(n_classes, -1e4, dtype=np.float32)
    for row, cls in enumerate(lr.classes_):
        full_coef[int(cls)], full_intercept[int(cls)] = coef[row], intercept[row]
    return full_coef, full_intercept
