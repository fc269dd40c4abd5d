"""The run directory: the contract between stages. `train` writes it; evaluate, report, predict, export and
serve read it, and this module is the one place that spells a run file's name or reads one: every other module
calls the functions below. Layout version 2 (documented in docs/run-directory.md; version 1 is still read):

    config.yaml         the resolved config of the run (YAML, loads back with Config.from_yaml)
    run.json            layout version, status, versions, hardware, timings, throughput, parameter counts
    labels.json         class names in id order
    data.json           data source, split sizes and seed, cleaning/filtering counts, token lengths, label_offset
    splits.json         source row numbers of every train/validation/test example
    tokenizer/          the model's tokenizer (save_pretrained)
    model/              weights in safetensors:
                          lora: adapter_model.safetensors + adapter_config.json (PEFT format)
                          full: model.safetensors (+ config.json when pooling=cls: a plain Transformers model)
                          head: head.safetensors (the head only; the encoder is the unchanged backbone)
                          tfidf.json + tfidf.safetensors: the fitted TF-IDF model (its blend weight is config.yaml's
                          model.tfidf_weight, stored there only: read it with read_tfidf_weight)
    metrics.jsonl       one JSON object per logged training step and per evaluation
    test_metrics.json   final test metrics of the restored best model
    test_predictions.csv  per test example: row, true and predicted label, probability of each class
    checkpoints/        resumable checkpoints (lorafit.checkpoint), written while training
    export/             written by `lorafit export` (lorafit.export): model.onnx (input_ids + attention_mask ->
                        logits), model.int8.onnx with --int8, export.json (files, opset, agreement with torch)
    evaluations/NAME/   written by `lorafit evaluate RUN -i NAME.csv` (the default -o): metrics.json,
                        predictions.csv (as test_predictions.csv), plots/, report.md, report.html
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import Config
from .errors import LorafitError
from .fileio import atomic_write_json, atomic_write_text

# 2: the TF-IDF blend's weight is stored once, in config.yaml (model/tfidf.json format 2 and run.json's `tfidf`
# section no longer hold it). Version 1 runs read the same way: their config.yaml has the same weight.
LAYOUT_VERSION = 2
READABLE_LAYOUTS = (1, 2)

# the run files (tokenizer/ and model/ are directories; the TF-IDF model's files are tfidf.JSON_FILE/WEIGHTS_FILE)
RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
LABELS_FILE = "labels.json"
DATA_FILE = "data.json"
SPLITS_FILE = "splits.json"
METRICS_FILE = "metrics.jsonl"
TEST_METRICS_FILE = "test_metrics.json"
PREDICTIONS = "test_predictions.csv"
TOKENIZER_DIR = "tokenizer"
MODEL_DIR = "model"
EVALUATIONS_DIR = "evaluations"
EVALUATION_METRICS_FILE, EVALUATION_PREDICTIONS = "metrics.json", "predictions.csv"  # in evaluations/NAME/
SPLIT_NAMES = ("train", "validation", "test")
STATUSES = ("running", "interrupted", "failed", "completed")


def new_run_dir(cfg: Config) -> Path:
    name = cfg.output.run_name
    if not name:
        model = re.sub(r"[^A-Za-z0-9._-]+", "-", cfg.model.model.split("/")[-1].split(":")[-1]).strip("-")
        name = f"{model}-{cfg.model.method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path = Path(cfg.output.output_dir) / name
    if path.exists() and any(path.iterdir()):
        if not cfg.output.overwrite:
            raise LorafitError(f"{path}: run directory exists; choose another --run-name or pass --overwrite")
        import shutil

        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def environment() -> dict[str, Any]:
    import torch

    # lorafit's own version from the package this module belongs to (installed or run from a checkout's src/);
    # the others from package metadata: nothing is imported for the record
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "lorafit": sys.modules[__package__].__version__}
    for key, dist in (("transformers", "transformers"), ("peft", "peft"), ("accelerate", "accelerate"),
                      ("datasets", "datasets"), ("sklearn", "scikit-learn")):
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # a package missing is not worth failing a run for
            pass
    hardware = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        hardware["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"versions": versions, "hardware": hardware}


def now() -> str:
    """A timestamp as run.json records them (UTC, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunRecord:
    """run.json, rewritten atomically on every change so a reader never sees a half-written status."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data

    @classmethod
    def start(cls, run_dir: Path) -> "RunRecord":
        rec = cls(Path(run_dir) / RUN_FILE, {
            "layout_version": LAYOUT_VERSION,
            "status": "running",
            "started_at": now(),
            **environment(),
        })
        rec.save()
        return rec

    @classmethod
    def reopen(cls, run_dir: Path) -> "RunRecord":
        """A resumed run: same record, status back to running; what it writes from now on is this layout's."""
        path = Path(run_dir) / RUN_FILE
        data = json.loads(path.read_text(encoding="utf-8"))
        data.pop("error", None)
        rec = cls(path, {**data, "layout_version": LAYOUT_VERSION, "status": "running",
                         "resumed_at": now()})
        rec.save()
        return rec

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


def read_run(run_dir: str | Path, require_completed: bool = True) -> tuple[Path, Config, dict[str, Any]]:
    """Open a run directory for reading; refuse one that did not complete, saying what to do."""
    run_dir = Path(run_dir)
    info_path = run_dir / RUN_FILE
    if not info_path.is_file():
        raise LorafitError(f"{run_dir}: not a lorafit run directory (no {RUN_FILE})")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise LorafitError(f"{info_path}: damaged (not valid JSON)") from None
    version = info.get("layout_version")
    if version not in READABLE_LAYOUTS:
        raise LorafitError(f"{run_dir}: run directory layout {version} is not supported (this lorafit reads "
                           f"{', '.join(map(str, READABLE_LAYOUTS))})")
    status = info.get("status")
    if require_completed and status != "completed":
        hint = f"resume it with: lorafit train --resume {run_dir}" if status in ("running", "interrupted") else \
            f"see {RUN_FILE} for the error, fix it and train again"
        raise LorafitError(f"{run_dir}: run status is '{status}', not 'completed'; {hint}")
    cfg = read_config(run_dir)
    return run_dir, cfg, info


def _read_json(path: Path, default: Any) -> Any:
    """A JSON run file, or `default` when the run has none."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default


# --- config.yaml ------------------------------------------------------------------------------------------
def read_config(run_dir: str | Path) -> Config:
    """config.yaml: the resolved config the run was trained with."""
    return Config.from_yaml(Path(run_dir) / CONFIG_FILE)


def write_config(run_dir: str | Path, cfg: Config) -> None:
    cfg.to_yaml(Path(run_dir) / CONFIG_FILE)


# --- labels.json, data.json, splits.json -------------------------------------------------------------------
def read_labels(run_dir: str | Path) -> list[str]:
    return json.loads((Path(run_dir) / LABELS_FILE).read_text(encoding="utf-8"))


def write_labels(run_dir: str | Path, names: list[str]) -> None:
    atomic_write_json(Path(run_dir) / LABELS_FILE, list(names))


def read_data_summary(run_dir: str | Path) -> dict[str, Any]:
    """data.json: source, split sizes and seed, cleaning/filtering counts, token lengths, label_offset; {} when
    the run has none."""
    return _read_json(Path(run_dir) / DATA_FILE, {})


def write_data_summary(run_dir: str | Path, summary: dict[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / DATA_FILE, summary)


def read_label_offset(run_dir: str | Path) -> int:
    """What the run's training data numbered its classes from (data.json label_offset): 1 when its integer labels
    were 1..K, so class i is the data's id i + 1; 0 for every other run, and for runs from before the key."""
    return int(read_data_summary(run_dir).get("label_offset") or 0)


def read_splits(run_dir: str | Path) -> dict[str, list[int]]:
    """splits.json: the source row numbers of every train/validation/test example."""
    path = Path(run_dir) / SPLITS_FILE
    if not path.is_file():
        raise LorafitError(f"{path}: missing; the run directory is incomplete")
    return json.loads(path.read_text(encoding="utf-8"))


def write_splits(run_dir: str | Path, splits: dict[str, Any]) -> None:
    """`splits` maps train/validation/test to their source row numbers (lists or integer arrays)."""
    atomic_write_json(Path(run_dir) / SPLITS_FILE,
                      {k: [int(r) for r in splits[k]] for k in SPLIT_NAMES})


# --- test_metrics.json -------------------------------------------------------------------------------------
def read_test_metrics(run_dir: str | Path) -> dict[str, Any]:
    """test_metrics.json: the final test metrics (with the TF-IDF blend when it is on); {} when the run has none."""
    return _read_json(Path(run_dir) / TEST_METRICS_FILE, {})


def write_test_metrics(run_dir: str | Path, metrics: dict[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / TEST_METRICS_FILE, metrics)


# --- the TF-IDF blend: the model in model/, its weight in config.yaml only ---------------------------------
def read_tfidf_weight(run_dir: str | Path, cfg: Config | None = None) -> float:
    """The weight the run's predictions blend its TF-IDF model in with: config.yaml's model.tfidf_weight, the one
    place it is stored. 0.0 when the run saved no TF-IDF model (weight 0, or a run from before the blend, whose
    config.yaml reads back the default). `cfg`: the run's config when the caller has read it already."""
    from .tfidf import JSON_FILE

    if not (Path(run_dir) / MODEL_DIR / JSON_FILE).is_file():
        return 0.0
    return float((cfg or read_config(run_dir)).model.tfidf_weight)


def read_tfidf(run_dir: str | Path, cfg: Config | None = None):
    """The run's TF-IDF model (tfidf.TfidfModel) at its weight (read_tfidf_weight), or None when it has none."""
    from .tfidf import TfidfModel

    weight = read_tfidf_weight(run_dir, cfg)
    return TfidfModel.load(Path(run_dir) / MODEL_DIR, weight) if weight else None


# --- metrics.jsonl -----------------------------------------------------------------------------------------
def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a torn last line (a killed run) is skipped, not fatal."""
    rows = []
    path = Path(run_dir) / METRICS_FILE
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """A resumed run: drop the metrics.jsonl rows logged after its checkpoint's `step` (the run logs those steps
    again) and the test rows, and any line torn by the kill."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    # MetricsLog writes each row as json.dumps(row), which reading and writing again gives back unchanged
    keep = [row for row in read_metrics(run_dir) if row.get("step", 0) <= step and row.get("split") != "test"]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in keep))


class MetricsLog:
    """Append-only metrics.jsonl: one flushed line per event."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "a", encoding="utf-8")
        self.t0 = time.time()

    @classmethod
    def open(cls, run_dir: str | Path) -> "MetricsLog":
        """The run's metrics.jsonl, appended to."""
        return cls(Path(run_dir) / METRICS_FILE)

    def write(self, **row: Any) -> None:
        row.setdefault("time", round(time.time() - self.t0, 3))
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# --- predictions: per example, row, text, true and predicted label, probability of each class ----------------
def write_predictions(path: Path, rows, texts, labels, probs, names: list[str]) -> None:
    """test_predictions.csv (and an evaluation's predictions.csv): `labels` are class ids, `probs` (n, classes)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["row", "text", "label", "predicted"] + [f"prob_{n}" for n in names])
    for row, text, label, p in zip(rows, texts, labels, probs):
        writer.writerow([int(row), text, names[int(label)], names[int(p.argmax())]] + [f"{x:.6f}" for x in p])
    atomic_write_text(path, buf.getvalue())


def write_test_predictions(run_dir: str | Path, rows, texts, labels, probs, names: list[str]) -> None:
    """The run's test_predictions.csv (write_predictions' columns)."""
    write_predictions(Path(run_dir) / PREDICTIONS, rows, texts, labels, probs, names)


def read_test_predictions(run_dir: str | Path, names: list[str]) -> list[dict[str, Any]]:
    """The rows of the run's test_predictions.csv (read_predictions'); [] when it has none."""
    return read_predictions(Path(run_dir) / PREDICTIONS, names)


def read_test_texts(run_dir: str | Path) -> tuple[list[str], list[str]]:
    """The texts and true label names of test_predictions.csv, in file order (([], []) when the run has none)."""
    path = Path(run_dir) / PREDICTIONS
    if not path.is_file():
        return [], []
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["label"] for r in rows]


def read_predictions(path: Path, names: list[str]) -> list[dict[str, Any]]:
    """The rows of a predictions file ([] when there is none): text, label, predicted, its probability, all."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            probs = {n: float(r[f"prob_{n}"]) for n in names}
            rows.append({"row": r["row"], "text": r["text"], "label": r["label"], "predicted": r["predicted"],
                         "prob": probs[r["predicted"]], "probs": probs})
    return rows


def write_evaluation_files(out_dir: str | Path, summary: dict[str, Any], rows, texts, labels, probs,
                     names: list[str]) -> None:
    """An evaluation directory's metrics.json (`summary`) and predictions.csv (test_predictions.csv's columns)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / EVALUATION_METRICS_FILE, summary)
    write_predictions(out_dir / EVALUATION_PREDICTIONS, rows, texts, labels, probs, names)


def read_evaluation_predictions(out_dir: str | Path, names: list[str]) -> list[dict[str, Any]]:
    return read_predictions(Path(out_dir) / EVALUATION_PREDICTIONS, names)


def evaluation_dir(run_dir: Path, source: Path) -> Path:
    """Where `lorafit evaluate RUN -i FILE` writes by default: RUN/evaluations/<FILE's name without suffixes>."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", source.name.split(".")[0]) or "evaluation"
    return Path(run_dir) / EVALUATIONS_DIR / name


# --- what train writes besides run.json ------------------------------------------------------------------------
def write_run_inputs(run_dir: Path, cfg: Config, bundle, tokenizer) -> None:
    """What a new run starts from: config.yaml, labels.json, data.json, splits.json and tokenizer/."""
    write_config(run_dir, cfg)
    write_labels(run_dir, bundle.label_names)
    write_data_summary(run_dir, bundle.summary)
    write_splits(run_dir, {k: getattr(bundle, k).source_rows for k in SPLIT_NAMES})
    tokenizer.save_pretrained(Path(run_dir) / TOKENIZER_DIR)
