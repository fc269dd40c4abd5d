"""The TF-IDF blend (model.tfidf_weight): the model against scikit-learn's own predict_proba, its pickle-free files,
the blend's probabilities, and a run that fits, records, saves and serves it."""

import csv
import json

import numpy as np
import pytest

from conftest import tiny_config
from lorafit.tfidf import FORMAT_VERSION, JSON_FILE, WEIGHTS_FILE, TfidfModel, fit_tfidf

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
    meta = json.loads((tmp_path / JSON_FILE).read_text())  # plain JSON: vocabulary, options, C; not the weight
    assert "weight" not in meta and meta["format_version"] == FORMAT_VERSION == 2
    assert len(meta["vocabulary"]) == model.n_features
    loaded = TfidfModel.load(tmp_path, weight=0.6)  # the weight is the caller's (a run's: its config)
    query = ["stocks and phones", "derby striker"]
    np.testing.assert_array_equal(loaded.proba(query), model.proba(query))
    assert loaded.weight == 0.6
    assert TfidfModel.load(tmp_path / "missing", weight=0.3) is None


def test_format_1_with_its_weight_still_loads_at_the_given_weight(tmp_path):
    model, _ = fit_tfidf(TEXTS, LABELS, 4, weight=0.3)
    model.save(tmp_path)
    meta = json.loads((tmp_path / JSON_FILE).read_text())
    (tmp_path / JSON_FILE).write_text(json.dumps(dict(meta, format_version=1, weight=0.9)))  # as lorafit wrote it
    loaded = TfidfModel.load(tmp_path, weight=0.3)
    assert loaded.weight == 0.3
    np.testing.assert_array_equal(loaded.proba(["oil stocks"]), model.proba(["oil stocks"]))


def test_unknown_format_or_damaged_files_are_one_clear_error(tmp_path):
    from lorafit import LorafitError

    model, _ = fit_tfidf(TEXTS, LABELS, 4, weight=0.3)
    model.save(tmp_path)
    meta = json.loads((tmp_path / JSON_FILE).read_text())
    (tmp_path / JSON_FILE).write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(LorafitError, match="TF-IDF format 99"):
        TfidfModel.load(tmp_path, weight=0.3)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(LorafitError, match="TF-IDF model is unreadable"):
        TfidfModel.load(tmp_path, weight=0.3)


def test_a_run_fits_records_saves_and_predicts_with_the_blend(tiny_model_dir, tmp_path, monkeypatch):
    import lorafit
    from lorafit.recipe import TrainingRecipe

    evaluated = []
    evaluate = TrainingRecipe.evaluate
    monkeypatch.setattr(TrainingRecipe, "evaluate", lambda self, split: evaluated.append(split) or evaluate(self, split))
    run = lorafit.train(tiny_config(tiny_model_dir("bert"), tmp_path, epochs=1, tfidf_weight=0.25))
    record = json.loads((run.path / "run.json").read_text())
    info = record["tfidf"]
    # the encoder's validation accuracy is the best step's, kept from that evaluation: validation is evaluated
    # only in the training loop (each logged), never again after it
    logged = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert evaluated.count("validation") == sum(r.get("split") == "validation" for r in logged) > 0
    assert info["validation_accuracy_encoder"] == record["best_validation_accuracy"]
    assert info["test_accuracy_blend"] == run.test_metrics["accuracy"]
    assert "weight" not in json.loads((run.path / "model" / JSON_FILE).read_text())  # config.yaml holds it
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


def _set_config_weight(run_dir, weight):
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["model"]["tfidf_weight"] = weight
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_the_blend_weight_is_the_run_configs_for_every_reader(run_copy):
    """The weight is stored once, in config.yaml: a run whose config says W predicts, serves, reports and cards
    with W, whatever a stale copy elsewhere (run.json's tfidf section, a format 1 tfidf.json) says."""
    import lorafit
    from conftest import encoder_alone
    from lorafit.card import model_card
    from lorafit.report import RunView, tfidf_rows
    from lorafit.rundir import read_tfidf_weight
    from lorafit.serve import run_summary

    _set_config_weight(run_copy, 0.7)
    run_json = json.loads((run_copy / "run.json").read_text())
    run_json["tfidf"]["weight"] = 0.1  # stale copies that no reader may take
    (run_copy / "run.json").write_text(json.dumps(run_json))
    meta = json.loads((run_copy / "model" / JSON_FILE).read_text())
    (run_copy / "model" / JSON_FILE).write_text(json.dumps(dict(meta, format_version=1, weight=0.2)))

    assert read_tfidf_weight(run_copy) == 0.7
    clf = lorafit.load(run_copy, backend="torch")
    assert clf.tfidf.weight == 0.7
    texts = ["oil prices climb", "the striker scores twice"]
    expected = 0.3 * encoder_alone(lorafit.load(run_copy, backend="torch")).predict_proba(texts) \
        + 0.7 * clf.tfidf.proba(texts)
    np.testing.assert_allclose(clf.predict_proba(texts), expected, atol=1e-5)
    assert run_summary(run_copy)["tfidf_weight"] == 0.7
    assert "at weight 0.7:" in model_card(run_copy)
    view = RunView(run_copy)
    assert view.tfidf_weight == 0.7 and tfidf_rows(view.info["tfidf"], view.tfidf_weight)[0][3] == "blend (weight 0.7000)"


def test_a_run_without_a_tfidf_model_does_not_blend_whatever_its_config_says(run_copy):
    """A run from before the blend: no model/tfidf.json, and config.yaml without the key reads back the default."""
    import lorafit
    from lorafit.rundir import read_tfidf_weight
    from lorafit.serve import run_summary

    import yaml

    for name in (JSON_FILE, WEIGHTS_FILE):
        (run_copy / "model" / name).unlink()
    cfg = yaml.safe_load((run_copy / "config.yaml").read_text())
    del cfg["model"]["tfidf_weight"]
    (run_copy / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert lorafit.Config.from_yaml(run_copy / "config.yaml").model.tfidf_weight > 0  # the default, read back
    assert read_tfidf_weight(run_copy) == 0.0 and run_summary(run_copy)["tfidf_weight"] == 0.0
    assert lorafit.load(run_copy, backend="torch").tfidf is None
