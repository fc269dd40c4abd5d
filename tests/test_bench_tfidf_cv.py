"""bench/tfidf_cv.py on a tiny model: every training row gets one out-of-fold prediction from each model, from the
fold that did not train on it, and the table is built from them."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np

from conftest import tiny_config


def test_out_of_fold_predictions_and_table(load_bench, tiny_model_dir, tmp_path, monkeypatch, capsys):
    bench = load_bench("tfidf_cv")
    config = tmp_path / "tiny.yaml"
    tiny_config(tiny_model_dir("bert"), tmp_path / "unused", epochs=1, pooling="cls").to_yaml(config)
    args = SimpleNamespace(config=str(config), folds=2, cv_seed=0, max_rows=60, epochs=None, out=str(tmp_path / "cv"),
                           partner=str(config), char_ngrams=True)
    probs, labels, folds = bench.out_of_fold(args)
    encoder = probs["encoder"]
    assert len(labels) == 60 and [f["rows"] for f in folds] == [30, 30]
    assert set(probs) == {"encoder", "partner", "tfidf", "tfidf_char"}
    for p in probs.values():  # every row filled once, with probabilities
        np.testing.assert_allclose(p.sum(1), 1, atol=1e-3)
    # the partner is the same recipe with other seeds: another model, not a copy of the first
    assert not np.allclose(probs["partner"], encoder)
    rows = bench.lever_rows(probs, 0.4)
    np.testing.assert_allclose(rows["encoder and partner 1:1, + TF-IDF at 0.4"],
                               0.3 * encoder + 0.3 * probs["partner"] + 0.4 * probs["tfidf"])
    assert bench.paired(encoder, encoder, labels) == (0, 0, 0.0)
    # each fold's figures are the out-of-fold predictions of its own rows
    assert np.mean([f["encoder"] for f in folds]) == np.mean(encoder.argmax(1) == labels)

    monkeypatch.setattr(sys, "argv", ["tfidf_cv.py", str(config), "--folds", "2", "--max-rows", "60",
                                      "--out", str(tmp_path / "cv2")])
    bench.main()
    out = capsys.readouterr().out
    assert "| 0.40 |" in out and "only the blend right" in out and "Against the recipe's blend" not in out
    saved = json.loads((tmp_path / "cv2" / "results.json").read_text())
    assert saved["weights"]["0.0"] == np.mean(encoder.argmax(1) == labels)  # weight 0 is the encoder alone

    monkeypatch.setattr(sys, "argv", ["tfidf_cv.py", str(config), "--folds", "2", "--max-rows", "60", "--char-ngrams",
                                      "--out", str(tmp_path / "cv3")])
    bench.main()
    out = capsys.readouterr().out
    assert "| encoder + word+char TF-IDF at 0.4 |" in out and "| encoder + TF-IDF at 0.4 (the recipe) |" in out
    levers = json.loads((tmp_path / "cv3" / "results.json").read_text())["levers"]
    reference = levers["encoder + TF-IDF at 0.4 (the recipe)"]
    assert reference["only_recipe"] == reference["only_this"] == 0 and reference["accuracy"] == saved["weights"]["0.4"]
