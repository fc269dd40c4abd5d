"""Loading from each file format, label forms, joined columns, cleaning and splits."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import CountedTokenizer, write_table

from lorafit.config import DataConfig
from lorafit.data import AG_NEWS_LABELS, LengthGroupedBatches, clean_text, load_data, read_table
from lorafit.errors import LorafitError

ROWS = [(f"{topic} story number {i} about {topic}", label)
        for i in range(30) for topic, label in (("markets", "Business"), ("football", "Sports"), ("elections", "World"))]


def _frame(rows=ROWS):
    return pd.DataFrame({"text": [t for t, _ in rows], "label": [l for _, l in rows]})


def _write(df: pd.DataFrame, path: Path) -> Path:
    write_table(df, path, path.suffix[1:])  # the format is the file's suffix
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_each_format_loads_the_same_rows(tmp_path, suffix):
    path = _write(_frame(), tmp_path / f"train{suffix}")
    df = read_table(path)
    assert list(df["text"]) == [t for t, _ in ROWS]
    bundle = load_data(DataConfig(train_file=str(path), test_file=str(path), validation_size=9), seed=0)
    assert bundle.label_names == ["Business", "Sports", "World"]  # names sorted when not given
    assert len(bundle.train.texts) + len(bundle.validation.texts) == len(ROWS)
    assert len(bundle.validation.texts) == 9


def test_pickle_needs_explicit_permission(tmp_path):
    path = _write(_frame(), tmp_path / "train.pkl")
    with pytest.raises(LorafitError, match="allow-pickle"):
        read_table(path)
    assert len(read_table(path, allow_pickle=True)) == len(ROWS)


def test_integer_labels_and_given_names(tmp_path):
    df = _frame()
    df["label"] = df["label"].map({"World": 0, "Sports": 1, "Business": 2})
    path = _write(df, tmp_path / "train.csv")
    cfg = DataConfig(train_file=str(path), test_file=str(path), label_names=["World", "Sports", "Business"])
    bundle = load_data(cfg, seed=0)
    assert bundle.label_names == ["World", "Sports", "Business"]
    first = bundle.test.texts.index(ROWS[0][0])
    assert bundle.test.labels[first] == 2


def test_title_and_description_joined(tmp_path):
    df = pd.DataFrame({"title": [f"Title {i}" for i in range(20)], "description": [f"body {i}" for i in range(20)],
                       "label": [i % 2 for i in range(20)]})
    path = _write(df, tmp_path / "news.jsonl")
    bundle = load_data(DataConfig(train_file=str(path), test_file=str(path), text_columns=["title", "description"]), 0)
    assert "Title 3 body 3" in bundle.test.texts


def test_bundled_sample_given_split_is_stratified_and_seeded():
    cfg = DataConfig()
    a, b = load_data(cfg, seed=1), load_data(cfg, seed=1)
    assert a.label_names == AG_NEWS_LABELS
    assert a.summary["rows_read"] == {"train": 4549, "test": 1001}
    assert len(a.test.texts) == 1001 and len(a.validation.texts) == 455
    assert np.array_equal(a.validation.source_rows, b.validation.source_rows)
    counts = np.bincount(a.validation.labels, minlength=4) / len(a.validation.labels)
    overall = np.bincount(np.concatenate([a.train.labels, a.validation.labels]), minlength=4) / 4549
    assert np.abs(counts - overall).max() < 0.01
    c = load_data(cfg, seed=2)
    assert not np.array_equal(a.validation.source_rows, c.validation.source_rows)


def test_resplit_is_80_10_10():
    bundle = load_data(DataConfig(split="resplit"), seed=0)
    n = 4549 + 1001
    sizes = [len(bundle.train.texts), len(bundle.validation.texts), len(bundle.test.texts)]
    assert sum(sizes) == n
    assert sizes[1] == pytest.approx(0.1 * n, abs=2) and sizes[2] == pytest.approx(0.1 * n, abs=2)


def test_cleaning_repairs_ag_news_artefacts():
    raw = 'Saddam Hussein #39;s regime, called  quot;Chemical Ali quot; &lt;b&gt;...&lt;/b&gt; costs \\$4 #151; more'
    cleaned = clean_text(raw)
    assert "#39;" not in cleaned and "quot;" not in cleaned and "&lt;" not in cleaned and "\\" not in cleaned
    assert "Hussein's regime" in cleaned and "$4" in cleaned and "—" in cleaned
    bundle = load_data(DataConfig(), seed=0)
    assert bundle.summary["texts_cleaned"] > 1000
    assert not any("#39;" in t for t in bundle.train.texts)


def test_length_grouped_batches_cover_every_row_once_and_reduce_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 120, size=1000)
    grouped = LengthGroupedBatches(lengths, 16, seed=0)
    flat = sorted(i for batch in grouped for i in batch)
    assert flat == list(range(1000))

    def padding(batches):
        return sum(len(b) * max(lengths[b]) for b in batches) / lengths.sum()

    plain = LengthGroupedBatches(lengths, 16, seed=0, group_by_length=False)
    assert padding(list(grouped)) < 1.1 < padding(list(plain))
    grouped.set_epoch(1)
    assert list(grouped) != list(LengthGroupedBatches(lengths, 16, seed=0))


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_inference_tokenizes_once_and_gets_the_training_ids(tiny_model_dir, family):
    """encode(full_lengths=False), what prediction and the distillation teacher use: one truncating pass, the same
    token ids as training's two-pass encoding (which also counts the untruncated lengths)."""
    from lorafit.data import encode
    from lorafit.model import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir(family)))
    texts = ["short one", "stocks rose " * 40, "", "a goal in the last minute of the match " * 5, "x"]
    counted = CountedTokenizer(tokenizer)
    training = encode(counted, texts, 16)
    assert counted.calls == [5, 2] and training.full_lengths.max() > 16  # the long texts again, truncated
    counted.calls.clear()
    inference = encode(counted, texts, 16, full_lengths=False)
    assert counted.calls == [5] and inference.full_lengths is None
    assert inference.input_ids == training.input_ids and max(len(ids) for ids in inference.input_ids) == 16
    assert inference.labels.tolist() == [-1] * 5
