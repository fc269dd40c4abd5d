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
    args = SimpleNamespace(config=str(config), folds=2, cv_seed=0, max_rows=60, epochs=None, out=str(tmp_path / "cv"))
    encoder, tfidf, labels, folds = bench.out_of_fold(args)
    assert len(labels) == 60 and [f["rows"] for f in folds] == [30, 30]
    for probs in (encoder, tfidf):  # every row filled once, with probabilities
        np.testing.assert_allclose(probs.sum(1), 1, atol=1e-3)
    # each fold's figures are the out-of-fold predictions of its own rows
    assert np.mean([f["encoder"] for f in folds]) == np.mean(encoder.argmax(1) == labels)

    monkeypatch.setattr(sys, "argv", ["tfidf_cv.py", str(config), "--folds", "2", "--max-rows", "60",
                                      "--out", str(tmp_path / "cv2")])
    bench.main()
    out = capsys.readouterr().out
    assert "| 0.40 |" in out and "only the blend right" in out
    saved = json.loads((tmp_path / "cv2" / "results.json").read_text())
    assert saved["weights"]["0.0"] == np.mean(encoder.argmax(1) == labels)  # weight 0 is the encoder alone
