"""The run directory: the contract between stages. `train` writes it; evaluate, report, predict, export and
serve read it. Layout version 1 (documented in docs/run-directory.md):

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
import platform
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import Config
from .errors import LorafitError
from .fileio import atomic_write_json, atomic_write_text

LAYOUT_VERSION = 1
PREDICTIONS = "test_predictions.csv"
EVALUATIONS_DIR = "evaluations"
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

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "peft", "accelerate", "datasets", "sklearn", "lorafit"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except Exception:  # an optional package missing is not worth failing a run for
            pass
    hardware = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                "cpu_count": __import__("os").cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        hardware["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"versions": versions, "hardware": hardware}


class RunRecord:
    """run.json, rewritten atomically on every change so a reader never sees a half-written status."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data

    @classmethod
    def start(cls, run_dir: Path) -> "RunRecord":
        rec = cls(run_dir / "run.json", {
            "layout_version": LAYOUT_VERSION,
            "status": "running",
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **environment(),
        })
        rec.save()
        return rec

    @classmethod
    def reopen(cls, run_dir: Path) -> "RunRecord":
        """A resumed run: same record, status back to running."""
        data = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        data.pop("error", None)
        rec = cls(run_dir / "run.json", {**data, "status": "running",
                                        "resumed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
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
    info_path = run_dir / "run.json"
    if not info_path.is_file():
        raise LorafitError(f"{run_dir}: not a lorafit run directory (no run.json)")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise LorafitError(f"{info_path}: damaged (not valid JSON)") from None
    version = info.get("layout_version")
    if version != LAYOUT_VERSION:
        raise LorafitError(f"{run_dir}: run directory layout {version} is not supported (this lorafit reads {LAYOUT_VERSION})")
    status = info.get("status")
    if require_completed and status != "completed":
        hint = f"resume it with: lorafit train --resume {run_dir}" if status in ("running", "interrupted") else \
            "see run.json for the error, fix it and train again"
        raise LorafitError(f"{run_dir}: run status is '{status}', not 'completed'; {hint}")
    cfg = Config.from_yaml(run_dir / "config.yaml")
    return run_dir, cfg, info


def read_labels(run_dir: Path) -> list[str]:
    return json.loads((run_dir / "labels.json").read_text(encoding="utf-8"))


def read_label_offset(run_dir: Path) -> int:
    """What the run's training data numbered its classes from (data.json label_offset): 1 when its integer labels
    were 1..K, so class i is the data's id i + 1; 0 for every other run, and for runs from before the key."""
    path = Path(run_dir) / "data.json"
    if not path.is_file():
        return 0
    return int(json.loads(path.read_text(encoding="utf-8")).get("label_offset") or 0)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a torn last line (a killed run) is skipped, not fatal."""
    rows = []
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class MetricsLog:
    """Append-only metrics.jsonl: one flushed line per event."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "a", encoding="utf-8")
        self.t0 = time.time()

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


def evaluation_dir(run_dir: Path, source: Path) -> Path:
    """Where `lorafit evaluate RUN -i FILE` writes by default: RUN/evaluations/<FILE's name without suffixes>."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", source.name.split(".")[0]) or "evaluation"
    return Path(run_dir) / EVALUATIONS_DIR / name


# --- what train writes besides run.json ------------------------------------------------------------------------
METRICS = "metrics.jsonl"
TEST_METRICS = "test_metrics.json"
SPLITS = "splits.json"


def now() -> str:
    """A timestamp as run.json records them (UTC, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_run_inputs(run_dir: Path, cfg: Config, bundle, tokenizer) -> None:
    """What a new run starts from: config.yaml, labels.json, data.json, splits.json and tokenizer/."""
    cfg.to_yaml(run_dir / "config.yaml")
    atomic_write_json(run_dir / "labels.json", bundle.label_names)
    atomic_write_json(run_dir / "data.json", bundle.summary)
    atomic_write_json(run_dir / SPLITS, {k: getattr(bundle, k).source_rows.tolist()
                                         for k in ("train", "validation", "test")})
    tokenizer.save_pretrained(run_dir / "tokenizer")


def read_splits(run_dir: Path) -> dict[str, list[int]]:
    return json.loads((Path(run_dir) / SPLITS).read_text(encoding="utf-8"))


def write_test_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / TEST_METRICS, metrics)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """A resumed run drops the rows logged after its checkpoint (and the test row): it logs those steps again."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by the kill
        if row.get("step", 0) <= step and row.get("split") != "test":
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))
