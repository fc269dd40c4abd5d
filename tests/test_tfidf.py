"""The TF-IDF blend (model.tfidf_weight): the model against scikit-learn's own predict_proba, its pickle-free files,
the blend's probabilities, and a run that fits, records, saves and serves it."""

import csv
import json

import numpy as np
import pytest

from conftest import tiny_config
from lorafit.tfidf import JSON_FILE, WEIGHTS_FILE, TfidfModel, fit_tfidf

TEXTS = ["stocks fall as oil climbs", "the team wins the cup final", "new chip speeds up phones",
         "bank profits rise again", "striker scores twice in derby", "rocket lands on the moon",
         "shares slide on rate fears", "coach quits after loss", "software update fixes bug"]
LABELS = np.array([2, 1, 3, 2, 1, 3, 2, 1, 3])


def _sklearn_proba(texts, labels, c, query):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from lorafit.tfidf import VECTORIZER

    vec = TfidfVectorizer(**VECTORIZER, dtype=np.float32)
    lr = LogisticRegression(C=c, max_iter=3000).fit(vec.fit_transform(texts), labels)
    return lr.predict_proba(vec.transform(query)), lr.classes_


@pytest.mark.parametrize("labels", [LABELS, (LABELS == 1).astype(int)], ids=["three-classes", "binary"])
def test_probabilities_are_scikit_learns(labels):
    n_classes = 4 if labels.max() > 1 else 2
    model, info = fit_tfidf(TEXTS, labels, n_classes, weight=0.3)
    query = ["oil stocks and the cup", "a phone chip", "nothing known here"]
    expected, classes = _sklearn_proba(TEXTS, labels, info["C"], query)
    got = model.proba(query)
    assert got.shape == (3, n_classes)
    np.testing.assert_allclose(got[:, classes], expected, atol=1e-5)
    # class 0 of the three-class case never occurs in training: probability ~0, rows still sum to 1
    np.testing.assert_allclose(got.sum(1), 1, atol=1e-5)
    if n_classes == 4:
        assert got[:, 0].max() < 1e-6


def test_validation_accuracy_and_size_are_recorded():
    validation = (["oil prices slide", "goalkeeper saves penalty", "laptop battery lasts"], np.array([2, 1, 3]))
    model, info = fit_tfidf(TEXTS, LABELS, 4, weight=0.3, validation=validation)
    assert info["validation_accuracy_tfidf"] is not None and info["C"] == model.c
    assert info["features"] == model.n_features > 0


def test_blend_mixes_probabilities():
    model, _ = fit_tfidf(TEXTS, LABELS, 4, weight=0.25)
    logits = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    texts = ["oil and stocks", "the cup final"]
    blended = model.blend(logits, texts)

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    np.testing.assert_allclose(softmax(blended), 0.75 * softmax(logits) + 0.25 * model.proba(texts), atol=1e-5)


def test_save_load_round_trip_without_pickle(tmp_path):
    model, _ = fit_tfidf(TEXTS, LABELS, 4, weight=0.3)
    model.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([JSON_FILE, WEIGHTS_FILE])
    meta = json.loads((tmp_path / JSON_FILE).read_text())  # plain JSON: vocabulary, options, weight, C
    assert meta["weight"] == 0.3 and len(meta["vocabulary"]) == model.n_features
    loaded = TfidfModel.load(tmp_path)
    query = ["stocks and phones", "derby striker"]
    np.testing.assert_array_equal(loaded.proba(query), model.proba(query))
    assert TfidfModel.load(tmp_path / "missing") is None


def test_unknown_format_or_damaged_files_are_one_clear_error(tmp_path):
    from lorafit import LorafitError

    model, _ = fit_tfidf(TEXTS, LABELS, 4, weight=0.3)
    model.save(tmp_path)
    meta = json.loads((tmp_path / JSON_FILE).read_text())
    (tmp_path / JSON_FILE).write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(LorafitError, match="TF-IDF format 99"):
        TfidfModel.load(tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(LorafitError, match="TF-IDF model is unreadable"):
        TfidfModel.load(tmp_path)


def test_a_run_fits_records_saves_and_predicts_with_the_blend(tiny_model_dir, tmp_path):
    import lorafit

    run = lorafit.train(tiny_config(tiny_model_dir("bert"), tmp_path, epochs=1, tfidf_weight=0.25))
    info = json.loads((run.path / "run.json").read_text())["tfidf"]
    assert info["weight"] == 0.25 and info["test_accuracy_blend"] == run.test_metrics["accuracy"]
    for key in ("validation_accuracy_encoder", "validation_accuracy_blend", "validation_accuracy_tfidf",
                "test_accuracy_encoder", "test_accuracy_tfidf", "C", "features"):
        assert info[key] is not None, key
    assert (run.path / "model" / JSON_FILE).is_file() and (run.path / "model" / WEIGHTS_FILE).is_file()
    # the loaded classifier predicts what the run's test predictions say (the blend, not the encoder alone)
    with open(run.path / "test_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    clf = lorafit.load(run.path, backend="torch")
    assert clf.tfidf is not None and clf.tfidf.weight == 0.25
    probs = clf.predict_proba([r["text"] for r in rows])
    saved = np.array([[float(r[f"prob_{name}"]) for name in clf.classes_] for r in rows])
    np.testing.assert_allclose(probs, saved, atol=2e-3)
    assert "TF-IDF blend" in (run.path / "report.md").read_text()


def test_weight_zero_is_the_encoder_alone(tiny_model_dir, tmp_path):
    import lorafit

    run = lorafit.train(tiny_config(tiny_model_dir("bert"), tmp_path, epochs=1, tfidf_weight=0))
    assert "tfidf" not in json.loads((run.path / "run.json").read_text())
    assert not (run.path / "model" / JSON_FILE).exists()
    assert lorafit.load(run.path).tfidf is None
