"""Batch prediction of a file at any size: read it in chunks, classify chunk by chunk, append, rename when done.

    from lorafit import load
    from lorafit.batch_predict import predict_file
    predict_file(load("runs/minilm"), "board.csv", "preds.csv", PredictConfig(chunk_rows=10_000))

Input: CSV / TSV (pyarrow's streaming CSV reader), Parquet (row batches), JSONL and .txt (line by line; .txt is one
text per line, an empty line a blank text), each optionally .gz; a .json array and .pkl/.pickle (allow_pickle)
are read whole, as they cannot stream. Output: CSV `ID,Label[,prob_<class>...]` or Parquet, by the output's
suffix. Peak memory depends on chunk_rows, not on the number of rows (docs/batch.md has the measurement).

Every input row gets one output row (issue 24): a blank text gets the model's answer to the empty text. A row that
cannot be read stops the run with one line naming file and line, or with on_bad_row='skip' is counted and listed
in `<output>.bad_rows.csv`.

Resume: beside the output, `<output>.partial` (CSV: the rows so far; Parquet: a folder of one part per chunk) and
`<output>.partial.json` (chunks done, bytes written, the input's size and mtime, the options that change the
output) record every complete chunk. Running the same prediction again continues after the last complete chunk
and yields the same bytes as an uninterrupted run. A partial made from another input or with other options is
discarded with one line (or refused with one line when resume=True was asked). An error about the input
(LorafitError, e.g. a bad row with on_bad_row='stop') removes the partial files: fixing the input changes it, so
the partial could not be continued anyway. Any other interruption (Ctrl-C, a kill, a crash) leaves them.

`predict_table` is the per-chunk step (a table of rows in, a table of predictions out), shared by every engine so
that all of them write the same rows.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa

from .config import DataConfig, PredictConfig
from .data import (MAX_TEXT_CHARS, check_pickle_allowed, check_text_columns, looks_like_jsonl, read_table,
                   suffix_and_compression)
from .errors import LorafitError
from .fileio import atomic_path, atomic_write_json

STATE_VERSION = 1
OUTPUT_SUFFIXES = (".csv", ".parquet")
# rows per Parquet row group of the output, whatever chunk_rows is: the file's bytes then do not depend on chunking
ROW_GROUP_ROWS = 65_536
# bytes per block of the CSV reader. Its I/O thread reads dozens of blocks ahead, so its memory is a multiple of
# this: with 4 MiB blocks a 240 MB file held ~100 MB more than a 24 MB one, with 1 MiB blocks 12 MB more (measured
# with a stub classifier in place of the model; docs/batch.md). A single row must fit in one block.
CSV_BLOCK_BYTES = 1 << 20


# --- labels and the per-chunk step ---------------------------------------------------------------------------
def label_ids(clf, class_index: np.ndarray) -> np.ndarray:
    """The class id written for labels='id': the class index plus the run's label numbering offset.

    A run trained on labels 1..K records that its numbering starts at 1 (the classifier's `label_offset`);
    without one the ids are 0-based. Every writer of ids goes through here."""
    return np.asarray(class_index, dtype=np.int64) + int(getattr(clf, "label_offset", 0) or 0)


def find_id_column(columns: Sequence[str], id_column: Optional[str]) -> Optional[str]:
    """`id_column` when given, else a column named id/ID/Id when present, else None (IDs are row numbers)."""
    if id_column is not None:
        return id_column
    return next((c for c in columns if c in ("id", "ID", "Id")), None)


def checked_id_column(columns: Sequence[str], id_column: Optional[str], origin: Optional[str] = None) -> Optional[str]:
    """find_id_column's answer, with a named column that is not among `columns` one line (prefixed with `origin`,
    the file, when given)."""
    found = find_id_column(columns, id_column)
    if found is not None and found not in columns:
        raise LorafitError(f"{origin + ': ' if origin else ''}no id column '{found}' (columns: {', '.join(columns)})")
    return found


def output_schema(clf, cfg: PredictConfig, id_type: pa.DataType) -> pa.Schema:
    fields = [pa.field("ID", id_type), pa.field("Label", pa.int64() if cfg.labels == "id" else pa.string())]
    if cfg.probabilities:
        fields += [pa.field(f"prob_{name}", pa.float64()) for name in clf.classes_]
    return pa.schema(fields)


def is_text_type(t: pa.DataType) -> bool:
    """A column type whose cells are strings (or all null)."""
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
            or getattr(pa.types, "is_string_view", lambda _: False)(t))


def table_texts(table: pa.Table, text_columns: Sequence[str]) -> list[str]:
    """The text of every row: the text columns joined with a space; a null cell counts as an empty string."""
    cols = []
    for name in text_columns:
        col = table.column(name)
        if not is_text_type(col.type):
            raise LorafitError(f"field '{name}' is {col.type}, not text; choose the text column with --text-column")
        cols.append(["" if v is None else v for v in col.to_pylist()])
    if len(cols) == 1:
        return cols[0]
    return [" ".join(parts) for parts in zip(*cols)]


def is_blank(text: str) -> bool:
    return not text.strip()


def predict_table(clf, table: pa.Table, cfg: Optional[PredictConfig] = None, text_columns: Sequence[str] = ("text",),
                  *, ids: Any = None, first_row: int = 0) -> pa.Table:
    """Predictions for a table of rows: columns ID, Label[, prob_<class>...] (see `output_schema`).

    ids: the ID of each row (an array or list); by default the table's id column (`cfg.id_column`, else a column
    named id/ID/Id), else the row numbers first_row, first_row + 1, ...
    A blank text (empty, whitespace or null) gets the classifier's answer to the empty text; probabilities are
    rounded to 6 decimals, as `lorafit predict` always wrote them."""
    cfg = cfg or PredictConfig()
    texts = table_texts(table, text_columns)
    n = len(texts)
    blank = np.fromiter((is_blank(t) for t in texts), dtype=bool, count=n)
    probs = np.zeros((n, len(clf.classes_)), dtype=np.float32)
    if (~blank).any():
        probs[~blank] = clf.predict_proba([t for t, b in zip(texts, blank) if not b])
    if blank.any():
        # the empty text, alone in its batch: its answer is then the same whatever chunk it falls in
        probs[blank] = clf.predict_proba([""], allow_blank=True)[0]
    if ids is None:
        name = checked_id_column(table.column_names, cfg.id_column)
        ids = table.column(name) if name is not None else pa.array(np.arange(first_row, first_row + n, dtype=np.int64))
    ids = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids)
    if pa.types.is_dictionary(ids.type):
        ids = ids.cast(ids.type.value_type)
    schema = output_schema(clf, cfg, ids.type)
    pred = probs.argmax(-1) if n else np.zeros(0, dtype=np.int64)
    if cfg.labels == "id":
        labels = pa.array(label_ids(clf, pred), type=pa.int64())
    else:
        labels = pa.array([str(c) for c in clf.classes_[pred]], type=pa.string())
    columns = [ids, labels]
    if cfg.probabilities:
        columns += [pa.array(np.round(probs[:, j].astype(np.float64), 6)) for j in range(probs.shape[1])]
    return pa.Table.from_arrays(columns, schema=schema)


# --- reading: pieces of rows in file order, then chunks of exactly chunk_rows rows ----------------------------
@dataclass
class BadRow:
    row: int  # 0-based row number in the file (what its ID would have been)
    line: Optional[int]  # 1-based line in a text file; None for Parquet and pickle
    reason: str

    def where(self, path: Path) -> str:
        return f"{path}: line {self.line}" if self.line is not None else f"{path}: row {self.row + 1}"


@dataclass
class Piece:
    table: pa.Table  # the readable rows: text columns (+ the id column), texts as strings
    rows: np.ndarray  # row number of each readable row (rows that could not be read keep theirs)
    bad: list[BadRow]
    end: int  # every row before this one has been read (readable or bad)
    position: int  # input bytes consumed, or rows for Parquet: for the progress bar


@dataclass
class Chunk:
    index: int
    start: int  # rows [start, end) of the file
    end: int
    table: pa.Table
    rows: np.ndarray
    bad: list[BadRow]
    position: int


def input_kind(path: Path) -> tuple[str, Optional[str]]:
    """(kind, compression): kind csv, tsv, jsonl, json, parquet, txt or pickle."""
    suffix, compression = suffix_and_compression(path)
    kinds = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet",
             ".txt": "txt", ".pkl": "pickle", ".pickle": "pickle"}
    if suffix not in kinds or (compression and kinds[suffix] in ("parquet", "pickle")):
        raise LorafitError(f"{path}: unsupported file type '{suffix or path.name}'; use .csv, .tsv, .jsonl, .json, "
                           ".parquet, .txt (one text per line) or .pkl with allow_pickle")
    kind = kinds[suffix]
    if kind == "json" and path.is_file() and path.stat().st_size and looks_like_jsonl(path, compression):
        kind = "jsonl"
    return kind, compression


_READ_ERRORS = (pa.ArrowInvalid, OSError, EOFError, UnicodeDecodeError)


class InputFile:
    """One input file opened for chunked reading. Checks what can be checked before any row is read (the file
    exists, its type, the text and id columns of a header or schema) and says so in one line."""

    def __init__(self, path: str | Path, text_columns: Sequence[str], id_column: Optional[str] = None,
                 allow_pickle: bool = False):
        self.path = Path(path)
        if not self.path.exists():
            raise LorafitError(f"{self.path}: file not found")
        if self.path.is_dir():
            raise LorafitError(f"{self.path}: is a directory; give one file (engine=ray reads folders)")
        self.kind, self.compression = input_kind(self.path)
        if self.kind == "pickle":
            check_pickle_allowed(self.path, allow_pickle)
        if self.path.stat().st_size == 0:
            raise LorafitError(f"{self.path}: file is empty")
        self.text_columns = ["text"] if self.kind == "txt" else list(text_columns)
        self.requested_id = id_column
        self.total_rows: Optional[int] = None  # known for Parquet (metadata) and whole-file reads
        self.total_bytes = self.path.stat().st_size
        self.id_column: Optional[str] = None  # resolved once the header (JSONL: the first object) is known
        self.ids_decided = self.kind != "jsonl"
        self.id_kind: Optional[str] = None  # JSONL: int, float or str, from the first id
        self._frame = None
        try:
            if self.kind in ("csv", "tsv"):
                names = self.csv_names = self._csv_header()  # read once: _csv_pieces needs them again
            elif self.kind == "parquet":
                import pyarrow.parquet as pq

                with pq.ParquetFile(self.path) as meta:
                    self.total_rows, names = meta.metadata.num_rows, meta.schema_arrow.names
        except _READ_ERRORS as exc:
            raise self._unreadable(exc) from None
        if self.kind in ("csv", "tsv", "parquet"):
            self._check_columns(names)
        elif self.kind in ("pickle", "json"):
            self._frame = read_table(self.path, allow_pickle=allow_pickle)
            self.total_rows = len(self._frame)
            self._check_columns(list(self._frame.columns))
        elif self.kind == "txt":
            self._check_columns(["text"])

    def needed_columns(self) -> list[str]:
        """The columns a chunk reads: the text column(s) and the id column, once each."""
        return list(dict.fromkeys(self.text_columns + ([self.id_column] if self.id_column else [])))

    def _check_columns(self, names: Sequence[str]) -> None:
        check_text_columns(names, self.text_columns, str(self.path))
        self.id_column = checked_id_column(names, self.requested_id, str(self.path))

    def _unreadable(self, exc: Exception) -> LorafitError:
        """A failure of the whole file (not of one row) as one line: what the reader said, and what to do."""
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, UnicodeDecodeError) or "UTF8" in reason:
            reason = "not valid UTF-8 text; re-save the file as UTF-8"
        elif "straddling" in reason:  # pyarrow: a row longer than the reader's block
            reason = (f"a row is over {CSV_BLOCK_BYTES >> 20} MiB; is this the right file? (a text that long is a "
                      "damaged file or a wrong column)")
        return LorafitError(f"{self.path}: could not be read as {self.kind} ({reason})")

    # --- pieces -----------------------------------------------------------------------------------------
    def pieces(self, chunk_rows: int) -> Iterator[Piece]:
        try:
            if self.kind in ("csv", "tsv"):
                yield from self._csv_pieces()
            elif self.kind == "parquet":
                yield from self._parquet_pieces(chunk_rows)
            elif self.kind in ("jsonl", "txt"):
                yield from self._line_pieces(chunk_rows)
            else:
                yield from self._frame_pieces(chunk_rows)
        except _READ_ERRORS as exc:
            raise self._unreadable(exc) from None

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        """Chunks of exactly chunk_rows rows (the last one shorter), rows counted whether readable or not, so that
        chunk k covers the same rows whatever happens to them."""
        tables: list[pa.Table] = []
        rows: list[np.ndarray] = []
        bad: list[BadRow] = []
        index, start, end, position = 0, 0, 0, 0
        for piece in self.pieces(chunk_rows):
            tables.append(piece.table)
            rows.append(piece.rows)
            bad.extend(piece.bad)
            end, position = piece.end, piece.position
            while end - start >= chunk_rows:
                chunk, tables, rows, bad = _cut(index, start, start + chunk_rows, tables, rows, bad, position)
                yield chunk
                index, start = index + 1, start + chunk_rows
        if end > start:
            yield _cut(index, start, end, tables, rows, bad, position)[0]

    def _id_values(self, table: pa.Table, rows: np.ndarray) -> pa.Array:
        if self.id_column is None:
            return pa.array(rows.astype(np.int64))
        return table.column(self.id_column).combine_chunks()  # predict_table casts a dictionary column to its values

    def _csv_header(self) -> list[str]:
        with pa.OSFile(str(self.path)) as raw:
            return self._open_csv(raw, None).schema.names

    def _open_csv(self, raw, names: Optional[list[str]], handler: Optional[Callable] = None):
        import pyarrow.csv as pacsv

        return pacsv.open_csv(
            pa.CompressedInputStream(raw, "gzip") if self.compression else raw,
            # one thread: bad rows are then reported in file order, with their row numbers
            read_options=pacsv.ReadOptions(use_threads=False, block_size=CSV_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(
                delimiter="\t" if self.kind == "tsv" else ",", newlines_in_values=True,
                # an empty line is a row (a blank text in a one-column file), not skipped: IDs never shift
                ignore_empty_lines=False, invalid_row_handler=handler or (lambda row: "skip")),
            # every column as text ("007" stays "007"); an empty cell or "" is an empty string, not null
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names} if names else None,
                strings_can_be_null=False, quoted_strings_can_be_null=False),
        )

    def _csv_pieces(self) -> Iterator[Piece]:
        names = self.csv_names
        pending: list[tuple[int, str, int, int]] = []

        def on_invalid(row) -> str:
            pending.append((row.number, row.text, row.expected_columns, row.actual_columns))
            return "skip"

        needed = self.needed_columns()
        cursor = (0, 2 + sum(n.count("\n") for n in names))  # (next row, its line): the header is line 1
        with pa.OSFile(str(self.path)) as raw:
            for batch in self._open_csv(raw, names, on_invalid):
                piece, cursor = _csv_piece(batch.select(needed), batch, pending, cursor, raw.tell(), final=False)
                yield piece
            if pending:  # bad rows after the last readable one
                empty = pa.record_batch([pa.array([], pa.string()) for _ in needed], names=needed)
                yield _csv_piece(empty, empty, pending, cursor, raw.tell(), final=True)[0]

    def _parquet_pieces(self, chunk_rows: int) -> Iterator[Piece]:
        import pyarrow.parquet as pq

        needed = self.needed_columns()
        next_row = 0
        with pq.ParquetFile(self.path) as pf:
            for batch in pf.iter_batches(batch_size=chunk_rows, columns=needed, use_threads=False):
                table = pa.Table.from_batches([batch])
                n = table.num_rows
                bad_mask = np.zeros(n, dtype=bool)
                reasons: dict[int, str] = {}
                for name in self.text_columns:
                    col = table.column(name)
                    if pa.types.is_dictionary(col.type):
                        col = col.cast(col.type.value_type)
                    if is_text_type(col.type):
                        table = table.set_column(table.schema.get_field_index(name), name, col.cast(pa.string()))
                        continue
                    valid = col.is_valid().to_numpy(zero_copy_only=False)
                    for i in np.flatnonzero(valid & ~bad_mask):
                        reasons[int(i)] = f"field '{name}' is {col.type}, not text"
                    bad_mask |= valid
                    table = table.set_column(table.schema.get_field_index(name), name, pa.nulls(n, pa.string()))
                rows = next_row + np.arange(n)
                bad = [BadRow(int(rows[i]), None, reasons[int(i)]) for i in np.flatnonzero(bad_mask)]
                keep = np.flatnonzero(~bad_mask)
                yield Piece(table.take(keep) if len(keep) < n else table, rows[keep], bad, next_row + n, next_row + n)
                next_row += n

    def _line_pieces(self, chunk_rows: int) -> Iterator[Piece]:
        """.txt (a line is a text) and JSONL (a line is a JSON object), read as bytes so that position and line
        numbers are exact and a line that is not UTF-8 is one bad row, not a failed file."""
        builder = _RowBuilder(self)
        raw = open(self.path, "rb")
        try:
            f = gzip.GzipFile(fileobj=raw) if self.compression else raw
            row = 0
            for data in f:
                row += 1
                builder.add_line(row - 1, data)
                if builder.size >= chunk_rows:
                    yield builder.piece(row, raw.tell())
            yield builder.piece(row, raw.tell())
        finally:
            raw.close()

    def _frame_pieces(self, chunk_rows: int) -> Iterator[Piece]:
        df = self._frame
        ids = None
        if self.id_column is not None:
            try:  # one Arrow type for the whole column, so that every chunk writes IDs alike
                ids = pa.Array.from_pandas(df[self.id_column])
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                ids = pa.array([None if v is None else str(v) for v in df[self.id_column].tolist()])
        for start in range(0, len(df), chunk_rows):
            stop = min(start + chunk_rows, len(df))
            builder = _RowBuilder(self)
            columns = {c: df[c].iloc[start:stop].tolist() for c in self.text_columns}
            for i in range(stop - start):
                builder.add_values(start + i, None, {c: columns[c][i] for c in self.text_columns})
            piece = builder.piece(stop, stop, ids=ids.slice(start, stop - start) if ids is not None else None)
            yield piece


def _csv_piece(batch, whole, pending: list, cursor: tuple[int, int], position: int, final: bool):
    """The readable rows of one CSV block and the invalid rows pyarrow reported for it, in file order."""
    import pyarrow.compute as pc

    next_row, line = cursor
    n_good = batch.num_rows
    pending.sort()
    # pyarrow numbers an invalid row by its record in the file, the header being 1: data row = number - 2. Those
    # adjacent to this block's rows belong to it; later ones wait for the rows between.
    taken = 0
    for number, *_ in pending:
        if not (final or number - 2 <= next_row + n_good + taken):
            break
        taken += 1
    mine, pending[:] = pending[:taken], pending[taken:]
    total = n_good + len(mine)
    is_bad = np.zeros(total, dtype=bool)
    is_bad[[number - 2 - next_row for number, *_ in mine]] = True
    # a quoted value may span lines: count them, so that a bad row is named by the line an editor shows
    extra = np.zeros(total, dtype=np.int64)
    if n_good:
        newlines = np.zeros(n_good, dtype=np.int64)
        for column in whole.columns:
            newlines += pc.count_substring(column, "\n").to_numpy(zero_copy_only=False)
        extra[~is_bad] = newlines
    extra[is_bad] = [text.count("\n") for _, text, _, _ in mine]
    starts = line + np.arange(total) + np.concatenate([[0], np.cumsum(extra)[:-1]]).astype(np.int64)
    bad = [BadRow(next_row + int(i), int(starts[i]), f"{actual} fields, expected {expected}")
           for i, (_, _, expected, actual) in zip(np.flatnonzero(is_bad), mine)]
    piece = Piece(pa.Table.from_batches([batch]), next_row + np.flatnonzero(~is_bad), bad, next_row + total, position)
    return piece, (next_row + total, line + total + int(extra.sum()))


class _RowBuilder:
    """Rows of Python values (JSONL objects, text lines, pickled cells) checked one by one into a Piece."""

    def __init__(self, source: InputFile):
        self.source = source
        self.kind = source.kind
        self.texts: dict[str, list] = {c: [] for c in source.text_columns}
        self.ids: list = []
        self.rows: list[int] = []
        self.bad: list[BadRow] = []
        self.size = 0

    def add_line(self, row: int, data: bytes) -> None:
        self.size += 1
        if data.endswith(b"\n"):
            data = data[:-1]
        if data.endswith(b"\r"):
            data = data[:-1]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.bad.append(BadRow(row, row + 1, f"not valid UTF-8 (byte {exc.start})"))
            return
        if self.kind == "txt":
            self._accept(row, {"text": text}, None)
            return
        if not text.strip():
            self.bad.append(BadRow(row, row + 1, "empty line; expected a JSON object"))
            return
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            self.bad.append(BadRow(row, row + 1, f"invalid JSON ({exc.msg}, column {exc.colno})"))
            return
        if not isinstance(obj, dict):
            self.bad.append(BadRow(row, row + 1, f"a JSON {type(obj).__name__}, not an object"))
            return
        if not self.source.ids_decided:
            # the id column: id_column, else id/ID/Id among the first object's fields, decided once for the file
            self.source.id_column = find_id_column(list(obj), self.source.requested_id)
            self.source.ids_decided = True
        missing = [c for c in self.source.text_columns if c not in obj]
        if missing:
            self.bad.append(BadRow(row, row + 1, f"no field {', '.join(repr(m) for m in missing)}"))
            return
        idv = None
        if self.source.id_column is not None:
            if self.source.id_column not in obj:
                self.bad.append(BadRow(row, row + 1, f"no id field '{self.source.id_column}'"))
                return
            idv = obj[self.source.id_column]
            problem = self._id_problem(idv)
            if problem:
                self.bad.append(BadRow(row, row + 1, problem))
                return
        self._accept(row, {c: obj[c] for c in self.source.text_columns}, idv, line=row + 1)

    def add_values(self, row: int, line: Optional[int], values: dict[str, Any]) -> None:
        self.size += 1
        self._accept(row, values, None, line)

    def _id_problem(self, value) -> Optional[str]:
        # one Arrow type for the whole file, taken from the first ID, so that chunk boundaries never change it
        kind = _id_kind(value)
        if kind is None:
            return f"id {json.dumps(value)[:40]} is not a number or a string"
        first = self.source.id_kind
        if first is None and value is not None:
            self.source.id_kind = first = kind
        if value is None or kind == first or (first == "float" and kind == "int"):
            return None
        return f"id {json.dumps(value)[:40]} is a {kind}, the first id a {first}; give every row the same kind of id"

    def _accept(self, row: int, values: dict[str, Any], idv, line: Optional[int] = None) -> None:
        for name, v in values.items():
            if v is None or (isinstance(v, float) and math.isnan(v)):
                values[name] = None
            elif not isinstance(v, str):
                self.bad.append(BadRow(row, line, f"field '{name}' is not text ({str(v)[:40]!r})"))
                return
        for name, v in values.items():
            self.texts[name].append(v)
        self.ids.append(idv)
        self.rows.append(row)

    def piece(self, end: int, position: int, ids: Optional[pa.Array] = None) -> Piece:
        rows = np.asarray(self.rows, dtype=np.int64)
        columns = {name: pa.array(values, type=pa.string()) for name, values in self.texts.items()}
        idc = self.source.id_column
        if idc is not None and idc not in columns:
            if ids is not None:  # a whole-file column: the readable rows of this slice
                columns[idc] = ids.take(pa.array(rows - (end - self.size), type=pa.int64()))
            else:
                kind = self.source.id_kind or "str"
                arrow_type = {"int": pa.int64(), "float": pa.float64()}.get(kind, pa.string())
                columns[idc] = pa.array(self.ids, type=arrow_type)
        piece = Piece(pa.table(columns) if columns else pa.table({}), rows, self.bad, end, position)
        self.texts = {c: [] for c in self.texts}
        self.ids, self.rows, self.bad, self.size = [], [], [], 0
        return piece


def _id_kind(value) -> Optional[str]:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return None


def _cut(index, start, end, tables, rows, bad, position):
    """Chunk [start, end) out of the buffered pieces; what follows `end` stays buffered."""
    # a piece without readable rows may lack a column the others have (JSONL before its first object)
    tables = [t for t in tables if t.num_rows] or tables[-1:]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    all_rows = np.concatenate(rows) if len(rows) > 1 else rows[0]
    cut = int(np.searchsorted(all_rows, end))
    chunk = Chunk(index, start, end, table.slice(0, cut), all_rows[:cut], [b for b in bad if b.row < end], position)
    rest_bad = [b for b in bad if b.row >= end]
    return chunk, [table.slice(cut)], [all_rows[cut:]], rest_bad


def _long_text_rows(chunk: Chunk, text_columns: Sequence[str]) -> Chunk:
    """A text this long is a wrong column or a damaged file (as in training): a bad row, not a stalled run."""
    import pyarrow.compute as pc

    if chunk.table.num_rows == 0:
        return chunk
    length = np.zeros(chunk.table.num_rows, dtype=np.int64)
    for name in text_columns:
        length += pc.fill_null(pc.utf8_length(chunk.table.column(name)), 0).to_numpy(zero_copy_only=False)
    long = length > MAX_TEXT_CHARS
    if not long.any():
        return chunk
    bad = chunk.bad + [BadRow(int(chunk.rows[i]), None, f"text of {int(length[i]):,} characters (over "
                              f"{MAX_TEXT_CHARS:,}); is this the right column?") for i in np.flatnonzero(long)]
    keep = np.flatnonzero(~long)
    return Chunk(chunk.index, chunk.start, chunk.end, chunk.table.take(keep), chunk.rows[keep],
                 sorted(bad, key=lambda b: b.row), chunk.position)


# --- writing: a partial output, its state, and the rename when complete ----------------------------------------
def partial_paths(output: Path) -> dict[str, Path]:
    """The files beside `output` while a prediction is under way (docs/batch.md)."""
    return {"partial": output.with_name(output.name + ".partial"),
            "state": output.with_name(output.name + ".partial.json"),
            "bad": output.with_name(output.name + ".bad_rows.csv"),
            "bad_partial": output.with_name(output.name + ".bad_rows.csv.partial")}


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


class AppendedFile:
    """A file that grows by whole chunks: opened new with its header, or reopened at a recorded byte count (what a
    half-written chunk wrote after it is cut off); each append is synced and returns the new byte count."""

    def __init__(self, path: Path):
        self.path, self.file = path, None

    def header(self) -> bytes:
        raise NotImplementedError

    def open(self, resume_bytes: Optional[int]) -> int:
        if resume_bytes is None:
            self.file = open(self.path, "wb")
            self.file.write(self.header())
        else:
            self.file = open(self.path, "r+b")
            self.file.truncate(resume_bytes)
            self.file.seek(resume_bytes)
        return self.sync()

    def write(self, text: str) -> int:
        self.file.write(text.encode("utf-8"))
        return self.sync()

    def sync(self) -> int:
        self.file.flush()
        os.fsync(self.file.fileno())
        return self.file.tell()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class CsvSink(AppendedFile):
    """CSV rows appended to `<output>.partial`; after each chunk the byte count goes into the state, so a resumed
    run cuts off a half-written chunk."""

    def __init__(self, path: Path, schema: pa.Schema):
        super().__init__(path)
        self.schema = schema

    def header(self) -> bytes:
        import pandas as pd

        buf = io.StringIO()
        pd.DataFrame(columns=self.schema.names).to_csv(buf, index=False)
        return buf.getvalue().encode("utf-8")

    def append(self, table: pa.Table) -> int:
        import pandas as pd

        # Python values, not pandas' own inference per chunk: an int ID column with a null in one chunk would
        # otherwise turn that chunk's IDs into floats (1.0)
        frame = pd.DataFrame({name: pd.Series(table.column(name).to_pylist(), dtype=object)
                              if not pa.types.is_floating(table.schema.field(name).type)
                              else table.column(name).to_numpy() for name in table.column_names})
        buf = io.StringIO()
        frame.to_csv(buf, index=False, header=False)
        return self.write(buf.getvalue())

    def finish(self, output: Path) -> None:
        self.close()
        os.replace(self.path, output)


def part_file(folder: Path, i: int) -> Path:
    """The Parquet sink's i-th part in its partial folder."""
    return folder / f"part-{i:08d}.parquet"


class ParquetSink:
    """One Parquet part per chunk in the folder `<output>.partial` (a Parquet file cannot be reopened to append);
    when complete, the parts are copied into one file of ROW_GROUP_ROWS-row groups, a temporary file renamed."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema, self.parts = path, schema, 0

    def open(self, resume_parts: Optional[int]) -> int:
        if resume_parts is None:
            _remove(self.path)
            self.path.mkdir(parents=True)
            self.parts = 0
        else:
            self.parts = resume_parts
            for stray in self.path.iterdir():  # parts of a chunk after the last recorded one, and temporary files
                if not (stray.name.startswith("part-") and stray.suffix == ".parquet"
                        and int(stray.stem[5:]) < resume_parts):
                    stray.unlink()
        return self.parts

    def append(self, table: pa.Table) -> int:
        import pyarrow.parquet as pq

        with atomic_path(part_file(self.path, self.parts)) as tmp:
            pq.write_table(table.cast(self.schema), tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        self.parts += 1
        return self.parts

    def close(self) -> None:
        pass

    def finish(self, output: Path) -> None:
        import pyarrow.parquet as pq

        with atomic_path(output) as tmp:
            with pq.ParquetWriter(tmp, self.schema) as writer:
                buffered: list[pa.Table] = []
                rows = 0
                for i in range(self.parts):
                    part = pq.read_table(part_file(self.path, i), schema=self.schema)
                    buffered.append(part)
                    rows += part.num_rows
                    while rows >= ROW_GROUP_ROWS:
                        whole = pa.concat_tables(buffered)
                        writer.write_table(whole.slice(0, ROW_GROUP_ROWS), row_group_size=ROW_GROUP_ROWS)
                        buffered, rows = [whole.slice(ROW_GROUP_ROWS)], rows - ROW_GROUP_ROWS
                if rows:
                    writer.write_table(pa.concat_tables(buffered), row_group_size=ROW_GROUP_ROWS)
        shutil.rmtree(self.path)


class BadRowLog(AppendedFile):
    """`<output>.bad_rows.csv` (row, line, reason), appended to its partial like the output."""

    def header(self) -> bytes:
        return b"row,line,reason\n"

    def append(self, bad: list[BadRow]) -> int:
        import csv

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        for b in bad:
            writer.writerow([b.row, "" if b.line is None else b.line, b.reason])
        return self.write(buf.getvalue())


# --- the prediction of a file -------------------------------------------------------------------------------
@dataclass
class PredictSummary:
    output: Path
    rows: int = 0  # input rows, readable or not
    predicted: int = 0  # output rows
    blank_rows: int = 0
    bad_rows: int = 0
    label_counts: dict[str, int] = field(default_factory=dict)
    resumed_from_row: int = 0  # rows a previous, interrupted run had already written
    seconds: float = 0.0  # this call's prediction time
    backend: str = ""

    @property
    def rows_per_s(self) -> float:
        return (self.predicted - self.resumed_from_row) / max(self.seconds, 1e-9)

    def line(self) -> str:
        # class ids in numeric order (2 before 10), names alphabetically
        order = sorted(self.label_counts, key=lambda k: (0, int(k), "") if k.lstrip("-").isdigit() else (1, 0, k))
        labels = ", ".join(f"{k} {self.label_counts[k]}" for k in order)
        text = (f"wrote {self.predicted} predictions to {self.output} ({self.backend}, {self.rows_per_s:.0f} rows/s"
                + (f"; resumed at row {self.resumed_from_row}" if self.resumed_from_row else "")
                + f"); labels: {labels or 'none'}; {self.blank_rows} blank rows")
        if self.bad_rows:
            text += f"; {self.bad_rows} bad rows skipped, listed in {partial_paths(self.output)['bad']}"
        return text


def _identity(src: InputFile, output: Path, clf, cfg: PredictConfig, text_columns: list[str]) -> dict[str, Any]:
    """What a partial output must share with this call to be continued: the input file as it is now and every
    option that changes the output's bytes."""
    stat = src.path.stat()
    return {
        "input": {"path": str(src.path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
        "options": {
            "output": output.suffix.lower(), "labels": cfg.labels, "probabilities": cfg.probabilities,
            "chunk_rows": cfg.chunk_rows, "on_bad_row": cfg.on_bad_row, "id_column": cfg.id_column,
            "text_columns": text_columns, "classes": [str(c) for c in clf.classes_],
            "label_offset": int(getattr(clf, "label_offset", 0) or 0),
            "run": str(Path(clf.run_dir).resolve()) if getattr(clf, "run_dir", None) else None,
            "backend": getattr(getattr(clf, "backend", None), "name", None),
            "batch_size": getattr(clf, "batch_size", None),  # batch shapes move the last digits of probabilities
        },
    }


def _difference(saved: dict[str, Any], now: dict[str, Any]) -> Optional[str]:
    if saved.get("version") != STATE_VERSION:
        return "it was written by another lorafit version"
    if saved.get("input") != now["input"]:
        return f"its input was another file or has changed since (size or modification time of {now['input']['path']})"
    for key, value in now["options"].items():
        if saved.get("options", {}).get(key) != value:
            return f"it was made with {key}={saved.get('options', {}).get(key)!r}, this call has {key}={value!r}"
    return None


def _load_state(paths: dict[str, Path]) -> Optional[dict[str, Any]]:
    if not paths["state"].is_file():
        return None
    try:
        return json.loads(paths["state"].read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"version": None}


def _consistent(state: dict[str, Any], paths: dict[str, Path], parquet: bool) -> bool:
    """The partial files hold at least what the state says was completed."""
    partial = paths["partial"]
    if parquet:
        parts_ok = partial.is_dir() and all(part_file(partial, i).is_file()
                                            for i in range(state["chunks_done"]))
    else:
        parts_ok = partial.is_file() and partial.stat().st_size >= state["bytes"]
    bad_ok = state["bad_bytes"] is None or (paths["bad_partial"].is_file()
                                            and paths["bad_partial"].stat().st_size >= state["bad_bytes"])
    return parts_ok and bad_ok


def input_data_config(clf, text_column=None, allow_pickle: bool = False) -> DataConfig:
    """The DataConfig that an input file is read with (predict, evaluate): `text_column` (a list, or a string
    with commas: several columns joined with a space), else the run's own text column(s); allow_pickle as given,
    never taken from the run (that the training file was a trusted pickle says nothing of this input)."""
    if isinstance(text_column, str):
        text_column = [c.strip() for c in text_column.split(",") if c.strip()]
    columns = list(text_column) if text_column else _text_columns(clf, None)
    if len(columns) > 1:
        return DataConfig(text_columns=columns, allow_pickle=allow_pickle)
    return DataConfig(text_column=columns[0], allow_pickle=allow_pickle)


def run_text_columns(run_dir: str | Path) -> list[str]:
    """The text column(s) the run trained on: what an input is read by when none is named (both engines)."""
    from .rundir import read_config

    return read_config(run_dir).data.all_text_columns


def _text_columns(clf, data: Optional[DataConfig]) -> list[str]:
    if data is not None:
        return data.all_text_columns
    if getattr(clf, "run_dir", None) is not None:
        return run_text_columns(clf.run_dir)
    return ["text"]


def predict_file(clf, input: str | Path, output: str | Path, cfg: Optional[PredictConfig] = None,
                 data: Optional[DataConfig] = None, *, console=None, progress: Optional[bool] = None
                 ) -> PredictSummary:
    """Predict every row of `input` into `output` (.csv: ID,Label[,prob_<class>...]; .parquet), chunk by chunk.

    cfg: the options of `lorafit predict` (PredictConfig: id_column, labels, probabilities, chunk_rows,
    on_bad_row, resume); engine must be 'local' here. data: text_column / text_columns and allow_pickle
    (`input_data_config` makes it from --text-column and --allow-pickle); by default the run's text column(s) and
    no pickle. A .txt input is one text per line whatever the text column.
    console: a rich Console for the progress bar and the summary line (default: stderr). progress: draw the bar
    (default: when the console is a terminal). Returns the summary, also printed as one line."""
    from rich.console import Console

    cfg = cfg or PredictConfig()
    if cfg.engine != "local":
        raise LorafitError(f"engine={cfg.engine}: batch_predict.predict_file is the local engine; use engine=local")
    input, output = Path(input), Path(output)
    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise LorafitError(f"{output}: write predictions to a .csv or .parquet file")
    if output.exists() and output.resolve() == input.resolve():
        raise LorafitError(f"{output}: is the input file; choose another output")
    text_columns = _text_columns(clf, data)
    src = InputFile(input, text_columns, cfg.id_column, allow_pickle=bool(data and data.allow_pickle))
    text_columns = src.text_columns
    parquet = output.suffix.lower() == ".parquet"
    paths = partial_paths(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    now = {"version": STATE_VERSION, **_identity(src, output, clf, cfg, text_columns)}

    saved = _load_state(paths)
    resume_state = None
    if saved is not None:
        why = _difference(saved, now) or (None if _consistent(saved, paths, parquet) else
                                          "its partial files are missing or shorter than its state says")
        if why is None:
            resume_state = saved
        elif cfg.resume:
            raise LorafitError(f"{paths['state']}: cannot resume: {why}; run without --resume to start over")
        else:
            console.print(f"{output}: starting over: a partial prediction was left, but {why}", markup=False,
                          highlight=False)
    elif cfg.resume:
        raise LorafitError(f"{output}: nothing to resume (no {paths['state'].name}); run without --resume")
    def discard_partials() -> None:
        for key in ("partial", "state", "bad_partial"):
            _remove(paths[key])

    if resume_state is None:
        discard_partials()
    try:
        summary = _run(clf, src, output, cfg, text_columns, paths, parquet, now, resume_state, console, progress)
    except LorafitError:
        # the input must change for the run to get further, and the partial would not match it then: remove it
        discard_partials()
        raise
    console.print(summary.line(), markup=False, highlight=False, soft_wrap=True)
    return summary


def _run(clf, src: InputFile, output: Path, cfg: PredictConfig, text_columns: list[str], paths: dict[str, Path],
         parquet: bool, identity: dict[str, Any], state: Optional[dict[str, Any]], console, progress) -> PredictSummary:
    summary = PredictSummary(output, backend=getattr(getattr(clf, "backend", None), "name", ""))
    done = 0
    if state is not None:
        done = state["chunks_done"]
        summary.rows, summary.predicted = state["rows"], state["predicted"]
        summary.blank_rows, summary.bad_rows = state["blank_rows"], state["bad_rows"]
        summary.label_counts = dict(state["label_counts"])
        summary.resumed_from_row = state["predicted"]
        console.print(f"{output}: resuming after chunk {done} (row {state['rows']}) of an interrupted prediction",
                      markup=False, highlight=False)
    sink = None
    bad_log = BadRowLog(paths["bad_partial"])
    bad_bytes = state["bad_bytes"] if state is not None else None
    if bad_bytes is not None:
        bad_log.open(bad_bytes)
    written = None
    bar = _Progress(console, progress, src)
    t0 = time.perf_counter()
    try:
        with bar:
            for chunk in src.chunks(cfg.chunk_rows):
                if chunk.index < done:  # completed by the interrupted run: read again (cheap), not predicted
                    bar.advance(chunk, chunk.end, 0)
                    continue
                chunk = _long_text_rows(chunk, text_columns)
                if chunk.bad and cfg.on_bad_row == "stop":
                    first = chunk.bad[0]
                    raise LorafitError(f"{first.where(src.path)}: {first.reason}; fix the row, or pass "
                                       "--on-bad-row skip to skip such rows and list them in "
                                       f"{paths['bad'].name}")
                ids = src._id_values(chunk.table, chunk.rows)
                table = predict_table(clf, chunk.table, cfg, text_columns, ids=ids)
                if sink is None:
                    sink = (ParquetSink if parquet else CsvSink)(paths["partial"], table.schema)
                    sink.open(_resume_point(state, parquet))
                written = sink.append(table)
                if chunk.bad:
                    if bad_bytes is None:
                        bad_bytes = bad_log.open(None)
                    bad_bytes = bad_log.append(chunk.bad)
                summary.rows = chunk.end
                summary.predicted += table.num_rows
                summary.bad_rows += len(chunk.bad)
                summary.blank_rows += sum(is_blank(t) for t in table_texts(chunk.table, text_columns))
                for label, count in zip(*np.unique(np.asarray(table.column("Label").to_pylist(), dtype=object)
                                                   .astype(str), return_counts=True)):
                    summary.label_counts[str(label)] = summary.label_counts.get(str(label), 0) + int(count)
                atomic_write_json(paths["state"], {
                    **identity, "chunks_done": chunk.index + 1, "rows": summary.rows, "predicted": summary.predicted,
                    "bytes": written if not parquet else None, "bad_bytes": bad_bytes,
                    "blank_rows": summary.blank_rows, "bad_rows": summary.bad_rows,
                    "label_counts": summary.label_counts})
                bar.advance(chunk, summary.rows, summary.predicted - summary.resumed_from_row)
        if summary.rows == 0:
            raise LorafitError(f"{src.path}: no rows to predict")
        if sink is None:  # every chunk was done by the interrupted run: reopen what it wrote
            sink = (ParquetSink if parquet else CsvSink)(paths["partial"], _schema_of(paths["partial"], parquet))
            sink.open(_resume_point(state, parquet))
    finally:
        if sink is not None:
            sink.close()
        bad_log.close()
    summary.seconds = time.perf_counter() - t0
    sink.finish(output)
    if bad_bytes is not None:
        os.replace(paths["bad_partial"], paths["bad"])
    elif paths["bad"].exists():  # from an earlier prediction into this output: it no longer describes it
        paths["bad"].unlink()
    paths["state"].unlink()
    return summary


def _resume_point(state: Optional[dict[str, Any]], parquet: bool) -> Optional[int]:
    """Where a sink continues: None for a new partial, else the parts (Parquet) or bytes (CSV) completed."""
    if state is None:
        return None
    return state["chunks_done"] if parquet else state["bytes"]


def _schema_of(partial: Path, parquet: bool) -> Optional[pa.Schema]:
    if parquet:
        import pyarrow.parquet as pq

        return pq.read_schema(part_file(partial, 0))
    return None


class _Progress:
    """A rich progress bar (rows, rows/s, ETA) on a terminal; nothing otherwise. The total is the row count
    when the file says it (Parquet, whole-file reads), else the file's bytes, read so far estimating the rest."""

    def __init__(self, console, enabled: Optional[bool], src: InputFile):
        self.enabled = console.is_terminal if enabled is None else enabled
        self.console, self.src = console, src
        self.by_rows = src.total_rows is not None
        self.progress = None
        self.t0 = time.perf_counter()

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]predict[/]"), BarColumn(),
                                     TextColumn("{task.fields[rows]:,} rows  {task.fields[rate]:,.0f} rows/s"),
                                     TimeRemainingColumn(), console=self.console)
            self.progress.__enter__()
            total = self.src.total_rows if self.by_rows else self.src.total_bytes
            self.task = self.progress.add_task("predict", total=total, rows=0, rate=0.0)
        return self

    def advance(self, chunk: Chunk, rows: int, predicted_now: int) -> None:
        """rows: rows of the file behind us; predicted_now: those this call predicted (not a resumed run's)."""
        if self.progress is not None:
            rate = predicted_now / max(time.perf_counter() - self.t0, 1e-9)
            self.progress.update(self.task, completed=rows if self.by_rows else chunk.position, rows=rows, rate=rate)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False
