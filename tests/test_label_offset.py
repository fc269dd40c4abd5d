"""Issue 24: integer labels numbered 1..K (the original AG News CSVs' 'Class Index') are classes 0..K-1, said
once and recorded in the run (data.json label_offset, config.yaml data.label_offset, Classifier.label_offset)."""

import io
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_config

from lorafit.config import DataConfig
from lorafit.data import load_data
from lorafit.errors import LorafitError


@pytest.fixture(scope="module")
def ag_rows():
    """Bundled AG News rows (ids 0..3) to write out with any numbering."""
    bundle = load_data(DataConfig(max_train_samples=240, max_eval_samples=80), seed=0)
    return bundle.train.texts, bundle.train.labels, bundle.test.texts, bundle.test.labels


def _csv(path, texts, ids):
    pd.DataFrame({"Class Index": ids, "Description": texts}).to_csv(path, index=False)
    return str(path)


def _cfg(train, test, **kw):
    return DataConfig(train_file=train, test_file=test, label_column="Class Index", text_column="Description", **kw)


def test_labels_1_to_k_are_classes_0_to_k_minus_1(ag_rows, tmp_path):
    texts, ids, test_texts, test_ids = ag_rows
    bundle = load_data(_cfg(_csv(tmp_path / "train.csv", texts, ids + 1), _csv(tmp_path / "test.csv", test_texts,
                                                                                  test_ids + 1)), seed=0)
    assert bundle.label_names == ["1", "2", "3", "4"]  # the file's own numbering names the classes
    assert bundle.summary["label_offset"] == 1
    assert sorted(set(bundle.train.labels.tolist())) == [0, 1, 2, 3]
    first = bundle.test.source_rows.tolist().index(0)
    assert bundle.test.labels[first] == test_ids[0]  # id k in the file is class k - 1


def test_given_names_with_1_based_ids_and_the_flag(ag_rows, tmp_path):
    texts, ids, test_texts, test_ids = ag_rows
    train, test = _csv(tmp_path / "train.csv", texts, ids + 1), _csv(tmp_path / "test.csv", test_texts, test_ids + 1)
    names = ["World", "Sports", "Business", "Sci/Tech"]
    bundle = load_data(_cfg(train, test, label_names=names), seed=0)
    assert bundle.label_names == names and bundle.summary["label_offset"] == 1
    assert sorted(set(bundle.train.labels.tolist())) == [0, 1, 2, 3]
    with pytest.raises(LorafitError, match=r"label 4 is outside 0\.\.3"):  # --label-offset 0: ids as they are
        load_data(_cfg(train, test, label_names=names, label_offset=0), seed=0)


def test_labels_0_to_k_minus_1_keep_their_ids(ag_rows, tmp_path):
    texts, ids, test_texts, test_ids = ag_rows
    bundle = load_data(_cfg(_csv(tmp_path / "train.csv", texts, ids), _csv(tmp_path / "test.csv", test_texts,
                                                                              test_ids)), seed=0)
    assert bundle.label_names == ["0", "1", "2", "3"] and bundle.summary["label_offset"] == 0


def test_ids_with_no_0_that_are_not_1_to_k_are_refused_not_guessed(ag_rows, tmp_path):
    texts, ids, test_texts, test_ids = ag_rows
    gap = lambda i: np.where(i == 3, 5, i + 1)  # noqa: E731 - 1, 2, 3, 5
    cfg = _cfg(_csv(tmp_path / "train.csv", texts, gap(ids)), _csv(tmp_path / "test.csv", test_texts, gap(test_ids)))
    with pytest.raises(LorafitError, match=r"train.csv: integer labels 1, 2, 3, 5 have no 0 and are not 1\.\.5 "
                                           r"\(missing 4\).*--label-offset 0"):
        load_data(cfg, seed=0)
    kept = load_data(cfg.model_copy(update={"label_offset": 0}), seed=0)  # said explicitly: the ids as they are
    assert kept.label_names == ["0", "1", "2", "3", "4", "5"] and kept.summary["label_offset"] == 0


def test_a_split_numbered_from_0_against_1_based_training_labels_is_refused(ag_rows, tmp_path):
    texts, ids, test_texts, test_ids = ag_rows
    cfg = _cfg(_csv(tmp_path / "train.csv", texts, ids + 1), _csv(tmp_path / "test.csv", test_texts, test_ids))
    with pytest.raises(LorafitError, match=r"test.csv.*label 0 is outside 1\.\.4 .*data.label_offset 1"):
        load_data(cfg, seed=0)


def test_a_run_on_1_based_labels_has_4_classes_and_label_offset_1(ag_rows, tiny_model_dir, tmp_path):
    import lorafit
    from rich.console import Console

    from lorafit.cli import app
    from lorafit.rundir import read_label_offset

    texts, ids, test_texts, test_ids = ag_rows
    train_file = _csv(tmp_path / "train.csv", texts, ids + 1)
    test_file = _csv(tmp_path / "test.csv", test_texts, test_ids + 1)
    cfg = tiny_config(tiny_model_dir("bert"), tmp_path / "runs", train_file=train_file, test_file=test_file,
                      label_column="Class Index", text_column="Description", epochs=1)
    out = io.StringIO()
    run = lorafit.train(cfg, console=Console(file=out, width=300))
    assert "labels: the training ids are 1..4 with no 0, so they count from 1: classes 0..3" in out.getvalue()
    clf = lorafit.load(run.path)
    assert clf.label_offset == 1 and list(clf.classes_) == ["1", "2", "3", "4"]
    assert clf.predict_proba(test_texts[:3]).shape == (3, 4)
    assert json.loads((run.path / "data.json").read_text())["label_offset"] == 1
    assert yaml.safe_load((run.path / "config.yaml").read_text())["data"]["label_offset"] == 1
    assert read_label_offset(run.path) == 1

    # evaluate maps a 1-based file the same way (the run's config.yaml carries the offset): its test metrics
    result = CliRunner().invoke(app, ["evaluate", str(run.path), "--data", test_file, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy"] == pytest.approx(run.test_metrics["accuracy"])
    zero_based = _csv(tmp_path / "zero.csv", test_texts, test_ids)
    result = CliRunner().invoke(app, ["evaluate", str(run.path), "--data", zero_based])
    assert result.exit_code == 2 and "label 0 is outside 1..4" in " ".join(result.output.split())


def test_a_run_without_the_record_has_label_offset_0(tmp_path):
    from lorafit.rundir import read_label_offset

    (tmp_path / "data.json").write_text(json.dumps({"sizes": {"train": 1}}))  # a run from before issue 24
    assert read_label_offset(tmp_path) == 0
    (tmp_path / "data.json").write_text(json.dumps({"label_offset": 1}))
    assert read_label_offset(tmp_path) == 1
