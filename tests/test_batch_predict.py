"""Batch prediction of a file in chunks (lorafit.batch_predict): every input format streams to the same rows as a
whole-file prediction, chunk boundaries do not matter, an interrupted run resumes to the same bytes, blank rows
keep their row, bad rows stop or are skipped and listed."""

from __future__ import annotations

import io
import re
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from rich.console import Console

import lorafit
from lorafit.batch_predict import partial_paths, predict_file, predict_table
from lorafit.config import DataConfig, PredictConfig
from lorafit.errors import LorafitError

from conftest import write_table

FORMATS = ["csv", "tsv", "jsonl", "parquet", "txt", "pkl", "csv.gz"]


@pytest.fixture(scope="module")
def clf(tiny_run):
    return lorafit.load(tiny_run, backend="torch")


@pytest.fixture(scope="module")
def texts(tiny_run):
    """23 of the run's test texts: not a multiple of any chunk size used below."""
    return pd.read_csv(tiny_run / "test_predictions.csv", keep_default_na=False)["text"].tolist()[:23]


def quiet():
    """A console that is not a terminal, kept for reading: the summary line lands here."""
    return Console(file=io.StringIO(), force_terminal=False, width=400)


def write(df: pd.DataFrame, path, fmt: str) -> None:
    write_table(df, path, fmt, row_group_size=6)  # several Parquet row groups: iter_batches crosses them


def run(clf, src, out, **options):
    data = DataConfig(allow_pickle=options.pop("allow_pickle", False))
    console = options.pop("console", None) or quiet()
    summary = predict_file(clf, src, out, PredictConfig(**options), data, console=console)
    return summary, console


@pytest.mark.parametrize("fmt", FORMATS)
def test_streaming_equals_whole_file(clf, texts, tmp_path, fmt):
    df = pd.DataFrame({"id": [f"q{i}" for i in range(len(texts))], "text": texts})
    src = tmp_path / f"in.{fmt}"
    write(df, src, fmt)
    out = tmp_path / "preds.csv"
    summary, _ = run(clf, src, out, chunk_rows=5, probabilities=True, allow_pickle=fmt == "pkl")
    preds = pd.read_csv(out, keep_default_na=False)
    assert list(preds.columns) == ["ID", "Label"] + [f"prob_{c}" for c in clf.classes_]
    expected_ids = list(range(len(texts))) if fmt == "txt" else list(df["id"])
    assert list(preds["ID"]) == expected_ids
    assert list(preds["Label"]) == list(clf.predict(texts))
    np.testing.assert_allclose(preds[[f"prob_{c}" for c in clf.classes_]].to_numpy(), clf.predict_proba(texts),
                               atol=2e-6)
    assert summary.predicted == summary.rows == len(texts) and summary.blank_rows == 0 and summary.bad_rows == 0
    assert not any(p.exists() for p in partial_paths(out).values())
    if fmt != "txt":  # without an id column: row numbers over the whole file, not per chunk
        write(df[["text"]], src, fmt)
        run(clf, src, out, chunk_rows=5, allow_pickle=fmt == "pkl")
        assert list(pd.read_csv(out)["ID"]) == list(range(len(texts)))


def test_chunk_boundaries_do_not_matter(clf, texts, tmp_path):
    src = tmp_path / "in.csv"
    pd.DataFrame({"text": texts[:15]}).to_csv(src, index=False)
    files = {}
    for chunk_rows in (1, 7, 10_000):
        for suffix, probabilities in (("csv", False), ("parquet", True)):
            out = tmp_path / f"out-{chunk_rows}.{suffix}"
            run(clf, src, out, chunk_rows=chunk_rows, probabilities=probabilities)
            files[chunk_rows, suffix] = out
    for chunk_rows in (7, 10_000):
        assert files[chunk_rows, "csv"].read_bytes() == files[1, "csv"].read_bytes()
        a, b = pq.read_table(files[chunk_rows, "parquet"]), pq.read_table(files[1, "parquet"])
        assert a.schema == b.schema and a.column("Label").equals(b.column("Label"))
        assert a.column("ID").to_pylist() == list(range(15))
        # probabilities: the same rows; batches of other shapes may move a float's last bits, hence a tolerance
        np.testing.assert_allclose(a.select(a.column_names[2:]).to_pandas().to_numpy(),
                                   b.select(b.column_names[2:]).to_pandas().to_numpy(), atol=2e-6)
        assert pq.ParquetFile(files[chunk_rows, "parquet"]).metadata.num_row_groups == 1  # not one per chunk


class Interrupting:
    """The classifier, failing on its `fail_at`-th call of predict_proba (1-based), as a crash or Ctrl-C would."""

    def __init__(self, clf, fail_at=None, error=RuntimeError):
        self.clf, self.fail_at, self.error, self.calls = clf, fail_at, error, 0

    def __getattr__(self, name):
        return getattr(self.clf, name)

    def predict_proba(self, texts, allow_blank=False):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error("injected failure")
        return self.clf.predict_proba(texts, allow_blank=allow_blank)


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_resume_gives_the_same_bytes(clf, texts, tmp_path, suffix):
    src = tmp_path / "in.jsonl"
    pd.DataFrame({"ID": range(100, 100 + len(texts)), "text": texts}).to_json(src, orient="records", lines=True)
    whole = tmp_path / f"whole.{suffix}"
    run(clf, src, whole, chunk_rows=4, probabilities=True)

    out = tmp_path / f"out.{suffix}"
    with pytest.raises(RuntimeError, match="injected"):
        run(Interrupting(clf, fail_at=4), src, out, chunk_rows=4, probabilities=True)  # chunks 0-2 complete
    paths = partial_paths(out)
    assert not out.exists() and paths["partial"].exists()
    assert json.loads(paths["state"].read_text())["chunks_done"] == 3
    # a kill in the middle of writing chunk 3 leaves part of it behind: the resumed run must drop it
    if suffix == "csv":
        with open(paths["partial"], "ab") as f:
            f.write(b"112,World,0.25,0.25")
    else:
        (paths["partial"] / "part-00000003.parquet").write_bytes(b"PAR1 half")

    again = Interrupting(clf)
    summary, console = run(again, src, out, chunk_rows=4, probabilities=True)
    assert out.read_bytes() == whole.read_bytes()
    assert again.calls == 3  # chunks 3, 4, 5 of 23 rows: the first three were not predicted again
    assert summary.resumed_from_row == 12 and summary.predicted == len(texts)
    assert "resuming after chunk 3" in console.file.getvalue()
    assert not paths["partial"].exists() and not paths["state"].exists()


def test_resume_refuses_another_input_or_options(clf, texts, tmp_path):
    src = tmp_path / "in.csv"
    pd.DataFrame({"text": texts}).to_csv(src, index=False)
    out = tmp_path / "out.csv"
    with pytest.raises(LorafitError, match="nothing to resume"):
        run(clf, src, out, resume=True)
    with pytest.raises(KeyboardInterrupt):
        run(Interrupting(clf, fail_at=2, error=KeyboardInterrupt), src, out, chunk_rows=5)
    with pytest.raises(LorafitError, match="labels='name', this call has labels='id'") as err:
        run(clf, src, out, chunk_rows=5, labels="id", resume=True)
    assert "\n" not in str(err.value) and "without --resume" in str(err.value)
    # without resume a mismatched partial is discarded, saying so, and the run starts over
    again = Interrupting(clf)
    summary, console = run(again, src, out, chunk_rows=5, labels="id")
    assert "starting over" in console.file.getvalue() and again.calls == 5 and summary.resumed_from_row == 0
    assert list(pd.read_csv(out)["Label"]) == clf.predict_proba(texts).argmax(-1).tolist()
    # a partial of an input that has changed since is not continued either
    with pytest.raises(KeyboardInterrupt):
        run(Interrupting(clf, fail_at=2, error=KeyboardInterrupt), src, out, chunk_rows=5)
    pd.DataFrame({"text": texts[:10]}).to_csv(src, index=False)
    with pytest.raises(LorafitError, match="has changed since"):
        run(clf, src, out, chunk_rows=5, resume=True)


@pytest.mark.parametrize("fmt", ["csv", "txt", "jsonl"])
def test_blank_rows_keep_their_row(clf, tmp_path, fmt):
    src = tmp_path / f"in.{fmt}"
    if fmt == "csv":
        src.write_text('text\nStocks fall as oil climbs\n""\n   \nFederer wins the final\n', encoding="utf-8")
    elif fmt == "txt":  # an empty line is a blank text; only the final newline is not a row
        src.write_text("Stocks fall as oil climbs\n\n  \t\nFederer wins the final\n", encoding="utf-8")
    else:
        src.write_text('{"text": "Stocks fall as oil climbs"}\n{"text": ""}\n{"text": null}\n'
                       '{"text": "Federer wins the final"}\n', encoding="utf-8")
    out = tmp_path / "out.csv"
    summary, console = run(clf, src, out, chunk_rows=3)
    preds = pd.read_csv(out)
    assert list(preds["ID"]) == [0, 1, 2, 3]
    blank = clf.predict([""], allow_blank=True)[0]
    expected = clf.predict(["Stocks fall as oil climbs", "Federer wins the final"])
    assert list(preds["Label"]) == [expected[0], blank, blank, expected[1]]
    assert summary.blank_rows == 2 and "; 2 blank rows" in console.file.getvalue()
    assert console.file.getvalue().count("\n") == 1  # one summary line, no bar: not a terminal


def test_bad_rows_stop_or_skip(clf, tmp_path):
    src = tmp_path / "in.csv"
    # line 3-4 is one row whose quoted text spans two lines; line 5 has a field too many
    src.write_text('id,text\na,Stocks fall\nb,"Federer wins\nthe final"\nc,too,many\nd,Leaders meet in Geneva\n'
                   'e\n', encoding="utf-8")
    out = tmp_path / "out.csv"
    with pytest.raises(LorafitError) as err:
        run(clf, src, out, chunk_rows=2)
    assert str(err.value).startswith(f"{src}: line 5: 3 fields, expected 2; fix the row, or pass --on-bad-row skip")
    assert not out.exists() and not any(p.exists() for p in partial_paths(out).values())

    summary, console = run(clf, src, out, chunk_rows=2, on_bad_row="skip")
    preds = pd.read_csv(out)
    assert list(preds["ID"]) == ["a", "b", "d"]
    expected = clf.predict(["Stocks fall", "Federer wins\nthe final", "Leaders meet in Geneva"])
    assert list(preds["Label"]) == list(expected)
    bad = pd.read_csv(partial_paths(out)["bad"])
    assert bad.to_dict("records") == [{"row": 2, "line": 5, "reason": "3 fields, expected 2"},
                                      {"row": 4, "line": 7, "reason": "1 fields, expected 2"}]
    assert summary.bad_rows == 2 and "2 bad rows skipped, listed in" in console.file.getvalue()


def test_bad_jsonl_rows_keep_row_numbers(clf, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "Stocks fall"}\n{"text": oops}\n{"text": 5}\n{"title": "x"}\n\n'
                   '{"text": "Leaders meet"}\n', encoding="utf-8")
    out = tmp_path / "out.parquet"
    with pytest.raises(LorafitError, match=r"in.jsonl: line 2: invalid JSON"):
        run(clf, src, out)
    summary, _ = run(clf, src, out, on_bad_row="skip", chunk_rows=4)
    assert pq.read_table(out).column("ID").to_pylist() == [0, 5]  # row numbers over the whole file, gaps kept
    bad = pd.read_csv(partial_paths(out)["bad"])
    assert list(bad["line"]) == [2, 3, 4, 5]
    assert "not text" in bad["reason"][1] and "no field 'text'" in bad["reason"][2] and "empty line" in bad["reason"][3]
    # a later prediction of a clean file into the same output removes the stale list
    src.write_text('{"text": "Stocks fall"}\n', encoding="utf-8")
    run(clf, src, out)
    assert not partial_paths(out)["bad"].exists()


def test_parquet_output_dtypes_and_label_ids(clf, texts, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "out.parquet"
    run(clf, src, out, probabilities=True, chunk_rows=6)
    df = pd.read_parquet(out)
    assert list(df.columns) == ["ID", "Label"] + [f"prob_{c}" for c in clf.classes_]
    assert df["ID"].dtype == np.int64 and pd.api.types.is_string_dtype(df["Label"])
    assert all(df[f"prob_{c}"].dtype == np.float64 for c in clf.classes_)
    assert list(df["Label"]) == list(clf.predict(texts))

    run(clf, src, out, labels="id")
    ids = clf.predict_proba(texts).argmax(-1)
    assert pd.read_parquet(out)["Label"].dtype == np.int64 and list(pd.read_parquet(out)["Label"]) == ids.tolist()
    shifted = Interrupting(clf)
    shifted.label_offset = 1  # a run trained on labels 1..K
    run(shifted, src, out, labels="id")
    assert list(pd.read_parquet(out)["Label"]) == (ids + 1).tolist()


def test_csv_reads_as_a_leaderboard_would(clf, texts, tmp_path):
    src = tmp_path / "board.csv"
    pd.DataFrame({"Id": [7, 3, 11], "text": texts[:3]}).to_csv(src, index=False)
    out = tmp_path / "submission.csv"
    run(clf, src, out)
    assert out.read_text().splitlines()[0] == "ID,Label"
    board = pd.read_csv(out)
    assert list(board.columns) == ["ID", "Label"] and list(board["ID"]) == [7, 3, 11]
    assert list(board["Label"]) == list(clf.predict(texts[:3]))


def test_progress_bar_on_a_terminal(clf, texts, tmp_path):
    src = tmp_path / "in.parquet"
    pd.DataFrame({"text": texts}).to_parquet(src)
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    run(clf, src, tmp_path / "out.csv", console=console, chunk_rows=5)
    shown = console.file.getvalue()
    assert "rows/s" in shown and f"{len(texts)} rows" in shown and f"wrote {len(texts)} predictions" in shown


def test_predict_table_is_the_per_chunk_step(clf, texts):
    import pyarrow as pa

    table = pa.table({"text": texts[:5] + [""], "extra": list(range(6))})
    out = predict_table(clf, table, PredictConfig(probabilities=True), ["text"], first_row=10)
    assert out.column("ID").to_pylist() == list(range(10, 16))
    assert out.column("Label").to_pylist()[:5] == list(clf.predict(texts[:5]))
    assert out.column("Label").to_pylist()[5] == clf.predict([""], allow_blank=True)[0]
    with pytest.raises(LorafitError, match="single string"):
        clf.predict_proba("one text", allow_blank=True)


def test_whole_file_problems_are_one_line(clf, tmp_path):
    out = tmp_path / "out.csv"
    cases = {"latin1.csv": (b"text\ncaf\xe9 au lait\n", "not valid UTF-8"),
             "header-only.csv": (b"text\n", "no rows to predict"),
             "other.csv": (b"sentence\nhello\n", "no column 'text' (columns: sentence); set --text-column or --text-columns"),
             "in.xlsx": (b"x", "unsupported file type '.xlsx'")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(LorafitError, match=re.escape(message)) as err:
            run(clf, tmp_path / name, out)
        assert "\n" not in str(err.value) and str(err.value).startswith(str(tmp_path / name))
        assert not any(p.exists() for p in [out, *partial_paths(out).values()])
    with pytest.raises(LorafitError, match="pickle files can run arbitrary code"):
        pd.DataFrame({"text": ["a"]}).to_pickle(tmp_path / "in.pkl")
        run(clf, tmp_path / "in.pkl", out)
    with pytest.raises(LorafitError, match=r"\.csv or \.parquet"):
        run(clf, tmp_path / "other.csv", tmp_path / "out.xlsx")


def test_input_data_config_defaults_to_the_runs_columns(run_copy):
    from types import SimpleNamespace

    from lorafit.batch_predict import input_data_config
    from lorafit.config import Config

    cfg = Config.from_yaml(run_copy / "config.yaml")
    cfg.data.text_column = "body"  # as if the run had been trained on a file whose text column is 'body'
    cfg.to_yaml(run_copy / "config.yaml")
    clf = SimpleNamespace(run_dir=run_copy)
    assert input_data_config(clf).text_column == "body" and not input_data_config(clf).allow_pickle
    both = input_data_config(clf, "title, description", allow_pickle=True)
    assert both.text_columns == ["title", "description"] and both.allow_pickle


def test_parquet_cells_that_are_not_text(clf, tmp_path):
    src = tmp_path / "in.parquet"
    pd.DataFrame({"text": [1, None, 3]}).astype("Int64").to_parquet(src)
    out = tmp_path / "out.csv"
    with pytest.raises(LorafitError, match=r"in.parquet: row 1: field 'text' is int64, not text; fix the row"):
        run(clf, src, out)
    summary, _ = run(clf, src, out, on_bad_row="skip")
    assert list(pd.read_csv(out)["ID"]) == [1] and summary.blank_rows == 1 and summary.bad_rows == 2
    assert list(pd.read_csv(partial_paths(out)["bad"])["row"]) == [0, 2]


def test_resume_after_the_process_is_killed(tiny_run, clf, texts, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    src = tmp_path / "in.csv"
    pd.DataFrame({"text": texts}).to_csv(src, index=False)
    whole, out = tmp_path / "whole.csv", tmp_path / "out.csv"
    run(clf, src, whole, chunk_rows=2, probabilities=True)
    # a child predicting slowly (0.2 s a chunk), killed with SIGKILL once it has completed 3 chunks
    script = f"""
import io, time, lorafit
from rich.console import Console
from lorafit.batch_predict import predict_file
from lorafit.config import PredictConfig
clf = lorafit.load({str(tiny_run)!r}, backend="torch")
slow = clf.predict_proba
clf.predict_proba = lambda texts, allow_blank=False: (time.sleep(0.2), slow(texts, allow_blank=allow_blank))[1]
predict_file(clf, {str(src)!r}, {str(out)!r}, PredictConfig(chunk_rows=2, probabilities=True),
             console=Console(file=io.StringIO()))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", script], env=env)
    state = partial_paths(out)["state"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if state.is_file() and json.loads(state.read_text())["chunks_done"] >= 3:
            break
        time.sleep(0.05)
    assert child.poll() is None, "the child ended before it could be killed"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not out.exists()
    summary, _ = run(clf, src, out, chunk_rows=2, probabilities=True)
    assert summary.resumed_from_row >= 6 and out.read_bytes() == whole.read_bytes()
