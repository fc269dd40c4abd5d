"""Data: read labelled text from the bundled sample, the Hub or local files; clean, split, tokenize, batch.

Hand-written here (rather than datasets.map + Trainer's sampler) because lorafit tokenizes once into plain
lists, reports what cleaning and filtering dropped, and batches by length to cut padding.
"""

from __future__ import annotations

import gzip
import html
import io
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from .config import BUNDLED_DATASET, DataConfig
from .errors import LorafitError

AG_NEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]
# A "text" this long is a wrong column or a damaged file, and tokenizing it would stall the run.
MAX_TEXT_CHARS = 1_000_000
TABLE_SUFFIXES = {".csv", ".tsv", ".jsonl", ".json", ".parquet", ".pkl", ".pickle"}
PICKLE_SUFFIXES = {".pkl", ".pickle"}


# --- reading files ------------------------------------------------------------------------------------
def suffix_and_compression(path: Path) -> tuple[str, Optional[str]]:
    """A file's type suffix (lower case; the one before .gz for a gzipped file) and its compression (gzip or None)."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = "gzip" if suffixes and suffixes[-1] == ".gz" else None
    return suffixes[-2] if compression and len(suffixes) > 1 else (suffixes[-1] if suffixes else ""), compression


def check_pickle_allowed(path: Path, allow_pickle: bool) -> None:
    """Loading never runs a pickle (arbitrary code) unless the user said so."""
    if not allow_pickle:
        raise LorafitError(f"{path}: pickle files can run arbitrary code when loaded; pass --allow-pickle only if "
                           "you trust this file")


def read_table(path: str | Path, allow_pickle: bool = False) -> pd.DataFrame:
    """Read a CSV, TSV, JSONL, JSON, Parquet (or, with allow_pickle, pickle) file into a DataFrame."""
    path = Path(path)
    if not path.exists():
        raise LorafitError(f"{path}: file not found")
    if path.is_dir():
        raise LorafitError(f"{path}: is a directory; give a .csv, .tsv, .jsonl, .json or .parquet file")
    suffix, compression = suffix_and_compression(path)
    if suffix not in TABLE_SUFFIXES:
        raise LorafitError(
            f"{path}: unsupported file type '{suffix or path.name}'; use .csv, .tsv, .jsonl, .json or .parquet"
        )
    if path.stat().st_size == 0:
        raise LorafitError(f"{path}: file is empty")
    try:
        if suffix in (".csv", ".tsv"):
            df = pd.read_csv(
                path, sep="\t" if suffix == ".tsv" else ",", compression=compression,
                encoding="utf-8", keep_default_na=False, na_values=[""], dtype=str,
            )
        elif suffix == ".jsonl" or (suffix == ".json" and looks_like_jsonl(path, compression)):
            df = pd.read_json(path, lines=True, compression=compression, dtype=False)
        elif suffix == ".json":
            df = pd.read_json(path, compression=compression, dtype=False)
        elif suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            check_pickle_allowed(path, allow_pickle)
            df = _read_pickle(path)
    except LorafitError:
        raise
    except UnicodeDecodeError as exc:
        raise LorafitError(
            f"{path}: not valid UTF-8 text (byte {exc.start}); re-save the file as UTF-8"
        ) from None
    except Exception as exc:  # pandas/pyarrow raise many types; the user needs the file and the reason
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LorafitError(f"{path}: could not be read as {suffix[1:]} ({reason})") from None
    if not isinstance(df, pd.DataFrame):
        raise LorafitError(f"{path}: expected a table of rows, got {type(df).__name__}")
    if len(df) == 0:
        raise LorafitError(f"{path}: has a header but no rows")
    df.columns = [str(c) for c in df.columns]
    return df


def looks_like_jsonl(path: Path, compression: Optional[str]) -> bool:
    opener = gzip.open if compression else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        first = f.readline().strip()
        second = f.readline().strip()
    return first.startswith("{") and (second.startswith("{") or second == "")


def _read_pickle(path: Path) -> pd.DataFrame:
    obj = pd.read_pickle(path)
    if isinstance(obj, pd.DataFrame):
        return obj
    if hasattr(obj, "to_pandas"):  # a datasets.Dataset
        return obj.to_pandas()
    if isinstance(obj, dict):
        return pd.DataFrame(obj)
    if isinstance(obj, (list, tuple)):
        return pd.DataFrame({"text": list(obj)})
    raise LorafitError(f"{path}: pickle holds a {type(obj).__name__}, not a DataFrame or Dataset")


# --- cleaning -----------------------------------------------------------------------------------------
_NUMERIC_ENTITY = re.compile(r"\s?#(\d{2,5});")
_TAG = re.compile(r"<[^>]{0,200}>")
_SPACES = re.compile(r"\s+")


def _entity(match: re.Match) -> str:
    code = int(match.group(1))
    lead = match.group(0)[0] if match.group(0)[0].isspace() else ""
    if 128 <= code < 160:  # the corpus stores Windows-1252 bytes as entities (#151; is an em dash)
        char = bytes([code]).decode("cp1252", errors="replace")
    else:
        char = chr(code)
    # "Saddam Hussein #39;s" -> "Saddam Hussein's": the corpus put a space before apostrophes
    return char if char in "'’" else lead + char


def clean_text(text: str) -> str:
    """Repair AG News artefacts: '#39;' entities without '&', ' quot;', escaped HTML tags, backslash line joins."""
    text = text.replace("\\", " ")
    text = re.sub(r"(?<![&\w])quot;", '"', text)
    text = _NUMERIC_ENTITY.sub(_entity, text)
    text = html.unescape(text)
    text = _TAG.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


# --- loading and splitting ----------------------------------------------------------------------------
@dataclass
class Split:
    texts: list[str]
    labels: np.ndarray  # int64 class ids
    source_rows: np.ndarray  # row numbers in the source, to trace any example back to its file


@dataclass
class DataBundle:
    train: Split
    validation: Split
    test: Split
    label_names: list[str]
    summary: dict[str, Any] = field(default_factory=dict)


def load_data(cfg: DataConfig, seed: int) -> DataBundle:
    """Load, clean and split the configured data. Token-length filtering happens later in `encode_splits`."""
    frames, label_names, source = _load_frames(cfg)
    offset = label_offset(frames["train"][0], cfg, frames["train"][1], label_names)
    cfg = cfg.model_copy(update={"label_offset": offset})  # every split's ids count from the train split's base
    summary: dict[str, Any] = {"source": source, "split": cfg.split, "seed": seed, "clean_text": cfg.clean_text,
                               "label_offset": offset}
    parts: dict[str, tuple[list[str], np.ndarray, np.ndarray]] = {}
    for name, (df, origin) in frames.items():
        texts = texts_from(df, cfg, origin)
        labels, label_names = labels_from(df, cfg, origin, label_names, fixed=name != "train")
        parts[name] = (texts, labels, np.arange(len(df)))
    summary["rows_read"] = {k: len(v[0]) for k, v in parts.items()}

    if cfg.clean_text:
        changed = 0
        for name, (texts, labels, rows) in parts.items():
            cleaned = [clean_text(t) for t in texts]
            changed += sum(a != b for a, b in zip(texts, cleaned))
            parts[name] = (cleaned, labels, rows)
        summary["texts_cleaned"] = changed
        for name, (texts, labels, rows) in parts.items():
            keep = np.array([bool(t) for t in texts])
            if not keep.all():
                summary.setdefault("dropped_empty_after_cleaning", {})[name] = int((~keep).sum())
                parts[name] = ([t for t, k in zip(texts, keep) if k], labels[keep], rows[keep])

    train = parts["train"]
    if len(set(train[1].tolist())) < 2:
        raise LorafitError(
            f"{frames['train'][1]}: all training rows have the same label; a classifier needs at least two classes"
        )
    if cfg.split == "resplit":
        pooled_texts, pooled_labels, pooled_rows, pooled_from = [], [], [], []
        for name, (texts, labels, rows) in parts.items():
            pooled_texts += texts
            pooled_labels.append(labels)
            pooled_rows.append(rows)
            pooled_from += [name] * len(texts)
        labels = np.concatenate(pooled_labels)
        rows = np.concatenate(pooled_rows)
        idx = np.arange(len(labels))
        rest, test_idx = _stratified(idx, labels, cfg.test_size, seed, "test_size")
        train_idx, val_idx = _stratified(rest, labels[rest], _rescale(cfg.validation_size, len(idx), len(rest)), seed, "validation_size")
        make = lambda ids: Split([pooled_texts[i] for i in ids], labels[ids], rows[ids])  # noqa: E731
        splits = {"train": make(train_idx), "validation": make(val_idx), "test": make(test_idx)}
    else:
        if "test" not in parts:
            raise LorafitError(
                "no test split: give --test-file, use a dataset with a 'test' split, or use --split resplit"
            )
        splits = {"test": Split(*parts["test"])}
        if "validation" in parts:
            splits["train"] = Split(*train)
            splits["validation"] = Split(*parts["validation"])
        else:
            idx = np.arange(len(train[1]))
            train_idx, val_idx = _stratified(idx, train[1], cfg.validation_size, seed, "validation_size")
            pick = lambda ids: Split([train[0][i] for i in ids], train[1][ids], train[2][ids])  # noqa: E731
            splits["train"], splits["validation"] = pick(train_idx), pick(val_idx)

    unseen = sorted(set(splits["test"].labels.tolist()) - set(splits["train"].labels.tolist()))
    if unseen:
        names = ", ".join(label_names[i] for i in unseen)
        raise LorafitError(
            f"test labels never seen in training: {names}; add training rows for them or drop them from the test file"
        )
    if cfg.max_train_samples and cfg.max_train_samples < len(splits["train"].texts):
        splits["train"] = _subsample(splits["train"], cfg.max_train_samples, seed)
    if cfg.max_eval_samples:
        for name in ("validation", "test"):
            if cfg.max_eval_samples < len(splits[name].texts):
                splits[name] = _subsample(splits[name], cfg.max_eval_samples, seed)

    summary["sizes"] = {k: len(v.texts) for k, v in splits.items()}
    summary["class_counts"] = {
        k: {label_names[c]: int((v.labels == c).sum()) for c in range(len(label_names))} for k, v in splits.items()
    }
    return DataBundle(splits["train"], splits["validation"], splits["test"], label_names, summary)


def _rescale(size: float, total: int, rest: int) -> float:
    """A validation fraction means a fraction of all rows in resplit mode (80/10/10), not of what is left."""
    return size * total / rest if size < 1 else size


def _stratified(idx: np.ndarray, labels: np.ndarray, size: float, seed: int, what: str):
    from sklearn.model_selection import train_test_split

    if size == 0:  # --validation-size 0: nothing held out (the loop then keeps the last epoch)
        return np.sort(idx), idx[:0]
    n = int(size) if size >= 1 else max(1, int(round(size * len(idx))))
    if n >= len(idx):
        raise LorafitError(f"data.{what}={size} leaves no rows for training ({len(idx)} rows in all); make it smaller")
    try:
        a, b = train_test_split(idx, test_size=n, random_state=seed, stratify=labels)
    except ValueError:
        # a class with a single row cannot be stratified; fall back to a seeded random split
        a, b = train_test_split(idx, test_size=n, random_state=seed)
    return np.sort(a), np.sort(b)


def _subsample(split: Split, n: int, seed: int) -> Split:
    _, keep = _stratified(np.arange(len(split.labels)), split.labels, n, seed, "max samples")
    return Split([split.texts[i] for i in keep], split.labels[keep], split.source_rows[keep])


def _load_frames(cfg: DataConfig):
    """Return ({split: (DataFrame, origin)}, label names or None, source description)."""
    if cfg.train_file:
        frames = {"train": (read_table(cfg.train_file, cfg.allow_pickle), cfg.train_file)}
        for name, path in (("validation", cfg.validation_file), ("test", cfg.test_file)):
            if path:
                frames[name] = (read_table(path, cfg.allow_pickle), path)
        return frames, cfg.label_names, {"type": "files", "train": cfg.train_file,
                                          "validation": cfg.validation_file, "test": cfg.test_file}
    if cfg.validation_file or cfg.test_file:
        raise LorafitError("--validation-file/--test-file need --train-file as well")
    if cfg.dataset == BUNDLED_DATASET:
        frames = {}
        for name in ("train", "test"):
            ref = resources.files("lorafit") / "resources" / f"ag_news_sample_{name}.csv.gz"
            with ref.open("rb") as f:
                df = pd.read_csv(io.BytesIO(gzip.decompress(f.read())), dtype=str, keep_default_na=False)
            frames[name] = (df, f"{BUNDLED_DATASET}/{name}")
        return frames, cfg.label_names or AG_NEWS_LABELS, {"type": "bundled", "name": BUNDLED_DATASET}
    return _load_hub(cfg)


def _load_hub(cfg: DataConfig):
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise LorafitError("loading Hub datasets needs the 'datasets' package: pip install datasets") from None
    try:
        dsd = datasets.load_dataset(cfg.dataset, cfg.dataset_config)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        reason = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else str(exc).strip().splitlines()[0][:200]
        raise LorafitError(
            f"dataset '{cfg.dataset}' could not be loaded from the Hugging Face Hub ({reason}); "
            f"connect to the internet, or use --train-file FILE, or --dataset {BUNDLED_DATASET} (bundled, offline)"
        ) from None
    label_names = cfg.label_names
    frames = {}
    for name, hub_names in (("train", ["train"]), ("validation", ["validation", "valid", "dev"]), ("test", ["test"])):
        for hub_name in hub_names:
            if hub_name in dsd:
                ds = dsd[hub_name]
                feature = ds.features.get(cfg.label_column)
                if label_names is None and getattr(feature, "names", None):
                    label_names = list(feature.names)
                frames[name] = (ds.to_pandas(), f"{cfg.dataset}[{hub_name}]")
                break
    if "train" not in frames:
        raise LorafitError(f"dataset '{cfg.dataset}' has no 'train' split (it has: {', '.join(dsd)})")
    if label_names is None and "label_text" in frames["train"][0].columns:  # SetFit-style datasets
        pairs = frames["train"][0][[cfg.label_column, "label_text"]].drop_duplicates()
        mapping = dict(zip(pairs[cfg.label_column].astype(int), pairs["label_text"].astype(str)))
        if sorted(mapping) == list(range(len(mapping))):
            label_names = [mapping[i] for i in range(len(mapping))]
    return frames, label_names, {"type": "hub", "name": cfg.dataset, "config": cfg.dataset_config}


def _row(origin: str, i: int) -> str:
    # CSV/TSV row numbers count the header as line 1 so they match what an editor shows
    return f"{origin}: line {i + 2}" if origin.endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz")) else f"{origin}: row {i + 1}"


def check_text_columns(found: Sequence[str], wanted: Sequence[str], origin: str) -> None:
    """The one message for a text column the input lacks (training data, prediction files, the Ray engine)."""
    missing = [c for c in wanted if c not in found]
    if missing:
        raise LorafitError(f"{origin}: no column {', '.join(repr(m) for m in missing)} (columns: "
                           f"{', '.join(map(str, found))}); set --text-column or --text-columns")


def texts_from(df: pd.DataFrame, cfg: DataConfig, origin: str) -> list[str]:
    columns = cfg.all_text_columns
    check_text_columns(list(df.columns), columns, origin)
    for c in columns:
        bad = df[c].map(lambda v: not isinstance(v, str) and not (isinstance(v, float) and math.isnan(v)) and v is not None)
        if bad.any() and len(columns) == 1:
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise LorafitError(f"{_row(origin, i)}: field '{c}' is not text ({df[c].iloc[i]!r})")
    joined = df[columns].fillna("").astype(str).agg(" ".join, axis=1) if len(columns) > 1 else df[columns[0]]
    texts = []
    for i, t in enumerate(joined.tolist()):
        if t is None or (isinstance(t, float) and math.isnan(t)) or not str(t).strip():
            raise LorafitError(f"{_row(origin, i)}: field '{'+'.join(columns)}' is empty; remove the row or fill it in")
        if len(str(t)) > MAX_TEXT_CHARS:
            raise LorafitError(
                f"{_row(origin, i)}: field '{'+'.join(columns)}' holds {len(str(t)):,} characters (over "
                f"{MAX_TEXT_CHARS:,}); is this the right column? split such documents before training"
            )
        texts.append(str(t))
    return texts


def labels_from(df, cfg: DataConfig, origin: str, label_names: Optional[list[str]], fixed: bool):
    if cfg.label_column not in df.columns:
        raise LorafitError(
            f"{origin}: no label column '{cfg.label_column}' (columns: {', '.join(df.columns)}); set --label-column"
        )
    raw = df[cfg.label_column].tolist()
    values = []
    for i, v in enumerate(raw):
        if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip()):
            raise LorafitError(f"{_row(origin, i)}: label is missing; every row needs a label")
        values.append(v.strip() if isinstance(v, str) else v)
    as_int = _as_ints(values)
    if as_int is None:
        numeric = [_as_float(v) for v in values]
        if all(x is not None for x in numeric):  # numbers, but not all whole: a regression target or a typo
            i = next((i for i, x in enumerate(numeric) if not float(x).is_integer()), None)
            if i is not None:
                raise LorafitError(f"{_row(origin, i)}: label {values[i]!r} is not a whole number; labels are class "
                                   "ids 0..n-1 or class names")
    if as_int is not None:
        offset = cfg.label_offset or 0
        n = len(label_names) if label_names else None
        if n is None:
            if fixed:
                raise LorafitError(f"{origin}: label names unknown; load the train split first")  # internal order
            n = int(max(as_int)) + 1 - offset
            label_names = [str(i + offset) for i in range(n)]  # the file's own numbering
        for i, v in enumerate(as_int):
            if v < offset or v >= n + offset:
                numbering = " (this data numbers classes from 1: data.label_offset 1)" if offset else ""
                raise LorafitError(
                    f"{_row(origin, i)}: label {v} is outside {offset}..{n - 1 + offset} ({', '.join(label_names)})"
                    f"{numbering}; fix the label or set --label-names"
                )
        return np.asarray(as_int, dtype=np.int64) - offset, label_names
    names = [str(v) for v in values]
    if label_names is None:
        if fixed:
            raise LorafitError(f"{origin}: label names unknown; load the train split first")
        label_names = sorted(set(names))
    index = {n: i for i, n in enumerate(label_names)}
    ids = []
    for i, n in enumerate(names):
        if n not in index:
            raise LorafitError(
                f"{_row(origin, i)}: unknown label '{n}' (known: {', '.join(label_names)}); fix it or set --label-names"
            )
        ids.append(index[n])
    return np.asarray(ids, dtype=np.int64), label_names


def label_offset(df, cfg: DataConfig, origin: str, label_names: Optional[list[str]]) -> int:
    """What the training labels' integer ids count from: cfg.label_offset when set, else 1 when they are exactly
    1..K with no 0 (issue 24: the original AG News CSVs' 'Class Index' is 1-4; counted from 0 they made a 5-class
    model whose class 0 had no rows), else 0. Ids with no 0 that are not 1..K (1, 2, 3, 5) are refused: whether
    they count from 0 or 1, some class would have no training rows, and that cannot be guessed."""
    if cfg.label_offset is not None or cfg.label_column not in df.columns:
        return cfg.label_offset or 0
    ids = _as_ints([v.strip() if isinstance(v, str) else v for v in df[cfg.label_column].tolist()])
    if not ids or min(ids) != 1:  # class names, a 0 among the ids, or negative ids (labels_from refuses them)
        return 0
    present, top = set(ids), max(ids)
    if present == set(range(1, top + 1)) and (label_names is None or len(label_names) == top):
        return 1
    if label_names is not None and top < len(label_names):  # named classes 0..n-1 whose 0 has no rows: as before
        return 0
    gaps = sorted(set(range(1, top + 1)) - present)
    shown = ", ".join(map(str, sorted(present)[:8])) + (", ..." if len(present) > 8 else "")
    why = (f"missing {', '.join(map(str, gaps[:5]))}" if gaps
           else f"{top} ids for {len(label_names or [])} --label-names")
    raise LorafitError(
        f"{origin}: integer labels {shown} have no 0 and are not 1..{top} ({why}), so whether they count from 0 or 1 "
        "cannot be told; renumber them 0..K-1 or 1..K, or set --label-offset 0 (ids as they are) or 1 (ids - 1)")


def _as_float(v) -> Optional[float]:
    if isinstance(v, (bool, np.bool_)):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _as_ints(values: list) -> Optional[list[int]]:
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)):
            return None
        if isinstance(v, (int, np.integer)):
            out.append(int(v))
        elif isinstance(v, (float, np.floating)) and float(v).is_integer():
            out.append(int(v))
        elif isinstance(v, str) and re.fullmatch(r"-?\d+(\.0*)?", v):  # "3" or "3.0" (a CSV of floats)
            out.append(int(float(v)))
        else:
            return None
    return out


# --- tokenization and batching ------------------------------------------------------------------------
@dataclass
class Encoded:
    input_ids: list[list[int]]
    labels: np.ndarray
    # tokens before truncation, for the length histogram and filtering; None where they were not counted (inference,
    # a distilled student's training split once its soft-only rows are appended)
    full_lengths: Optional[np.ndarray]

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(tokenizer, texts: Sequence[str], max_length: int, labels: Optional[np.ndarray] = None,
           full_lengths: bool = True) -> Encoded:
    """Tokenize, truncated to max_length, without padding. full_lengths: also count each text's untruncated
    length (training's length statistics and filters), which takes a second pass over the texts longer than
    max_length; inference passes False and tokenizes each text once (about twice as fast on long texts)."""
    from transformers.utils import logging as hf_logging

    labels = np.full(len(texts), -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    if len(texts) == 0:  # an empty split (--validation-size 0); tokenizers fail on an empty batch
        return Encoded([], labels, np.zeros(0, dtype=np.int64) if full_lengths else None)
    if not full_lengths:
        return Encoded(tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"], labels, None)

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "sequence longer than model max" is expected: we truncate below
    try:
        full = tokenizer(list(texts), truncation=False, add_special_tokens=True)["input_ids"]
    finally:
        hf_logging.set_verbosity(verbosity)
    lengths = np.array([len(ids) for ids in full], dtype=np.int64)
    long_idx = np.flatnonzero(lengths > max_length)
    if len(long_idx):
        cut = tokenizer([texts[i] for i in long_idx], truncation=True, max_length=max_length)["input_ids"]
        for i, ids in zip(long_idx, cut):
            full[i] = ids
    return Encoded(full, labels, lengths)


def filter_by_length(enc: Encoded, split: Split, min_tokens: Optional[int], max_tokens: Optional[int]):
    keep = np.ones(len(enc), dtype=bool)
    if min_tokens:
        keep &= enc.full_lengths >= min_tokens
    if max_tokens:
        keep &= enc.full_lengths <= max_tokens
    dropped = int((~keep).sum())
    if dropped:
        enc = Encoded([ids for ids, k in zip(enc.input_ids, keep) if k], enc.labels[keep], enc.full_lengths[keep])
        split = Split([t for t, k in zip(split.texts, keep) if k], split.labels[keep], split.source_rows[keep])
    return enc, split, dropped


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Shuffled batches of similar-length texts: random chunks of `mega` batches are sorted by length and cut.

    Random batches of AG News pad to ~1.75x their real tokens; this brings it near 1.05x while keeping the
    order random across chunks and epochs (deterministic given seed and epoch).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool = True, mega: int = 50):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group = group_by_length
        self.mega = mega
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        if not self.group:
            return [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        chunk = self.batch_size * self.mega
        batches = []
        for start in range(0, len(order), chunk):
            part = order[start : start + chunk]
            part = part[np.argsort(-self.lengths[part], kind="stable")]
            batches += [part[i : i + self.batch_size].tolist() for i in range(0, len(part), self.batch_size)]
        perm = rng.permutation(len(batches))
        return [batches[i] for i in perm]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches for inference: longest first, so padding is minimal and memory peaks early."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]


class EncodedDataset(torch.utils.data.Dataset):
    def __init__(self, enc: Encoded):
        self.enc = enc

    def __len__(self) -> int:
        return len(self.enc)

    def __getitem__(self, i: int):
        return self.enc.input_ids[i], int(self.enc.labels[i]), i


def pad_token_id(tokenizer) -> int:
    """The id to pad a batch with: the tokenizer's pad token, or 0 for a tokenizer without one."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


class Collator:
    """Pads a batch to its longest text (dynamic padding); keeps each example's index (for cached states)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None):
        self.pad = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, items):
        longest = max(len(ids) for ids, _, _ in items)
        if self.multiple:
            longest = -(-longest // self.multiple) * self.multiple
        input_ids = torch.full((len(items), longest), self.pad, dtype=torch.long)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, (ids, _, _) in enumerate(items):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        labels = torch.tensor([label for _, label, _ in items], dtype=torch.long)
        index = torch.tensor([i for _, _, i in items], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "index": index}
