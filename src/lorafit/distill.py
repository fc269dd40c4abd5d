"""Distillation: a completed run (the teacher) teaches a new run (the student) on the teacher's own texts.

    run = lorafit.distill("runs/mpnet-teacher", student="embedded:all-MiniLM-L6-v2", student_layers=3)

The student is a normal run of recipe.TrainingRecipe with the Distillation extension (entry point: train.distill);
what distillation adds lives here:
- the student's config: the teacher's data section (same file, splits and split seed, so validation and test
  are exactly the teacher's), the teacher's model and train sections unless others are given, and a distill:
  section (teacher run, temperature, loss weights, unlabelled file, augmented copies);
- the teacher's logits on the training texts (and any unlabelled or augmented texts), computed once in the
  student's precision (fp32 or bf16; never from an int8 export) and cached in the teacher's run directory under
  distill-cache/, keyed by the text (so a student with another tokenizer uses them as well);
- the loss: hard_weight * CE(labels) + soft_weight * T^2 * KL(teacher || student) at temperature T.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from .config import DISTILL_FIELDS, FIELD_SECTIONS, Config, as_config
from .errors import LorafitError
from .fileio import atomic_write_bytes
from .extensions import Extension

CACHE_DIR = "distill-cache"
# cross_entropy's ignore_index: an unlabelled row carries no hard label, only the teacher's logits
IGNORE_LABEL = -100
# the student's data must be the teacher's, so only truncation may change (a student tokenizer's own length)
STUDENT_DATA_OPTIONS = {"max_length"}


# --- the loss ------------------------------------------------------------------------------------------------
def distillation_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float, soft_weight: float, hard_weight: float,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """hard_weight * CE(student, labels) + soft_weight * T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    The cross-entropy is the mean over the labelled rows (IGNORE_LABEL rows count 0); the KL is the mean over
    all rows. T^2 keeps the soft gradients' scale independent of T (Hinton et al., 2015)."""
    labelled = (labels != IGNORE_LABEL).sum().clamp(min=1)
    hard = F.cross_entropy(student_logits, labels, ignore_index=IGNORE_LABEL, label_smoothing=label_smoothing,
                           reduction="sum") / labelled
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)
    return hard_weight * hard + soft_weight * soft


# --- the teacher -----------------------------------------------------------------------------------------------
def check_teacher(teacher_run: Union[str, Path], label_names: Optional[list[str]] = None,
                  precision: str = "fp32") -> tuple[Config, dict]:
    """The teacher run's config and run.json, or one line saying why it cannot teach a student training in
    `precision` (which decides whether the teacher's PyTorch model, and so its backbone, is needed)."""
    from .model import backbone_identity
    from .rundir import MODEL_DIR, read_labels, read_run

    teacher = Path(teacher_run)
    if not teacher.is_dir():
        raise LorafitError(f"{teacher}: teacher run not found; give a completed run directory")
    _, cfg, info = read_run(teacher)  # a run that did not complete is refused here, saying how to finish it
    if not (teacher / MODEL_DIR).is_dir():
        raise LorafitError(f"{teacher}: the teacher run has no final weights (model/); train it to completion first")
    if label_names is not None and read_labels(teacher) != list(label_names):
        raise LorafitError(f"{teacher}: the teacher's labels {read_labels(teacher)} differ from the student's "
                           f"{list(label_names)}; distil on the teacher's own data")
    if logits_backend(teacher, precision)[0] == "torch" and cfg.model.method != "full":
        try:  # a LoRA or head-only teacher is rebuilt on its backbone, which must still be there
            backbone_identity(cfg.model.model)
        except LorafitError as exc:
            raise LorafitError(f"{teacher}: the teacher's backbone {cfg.model.model} cannot be found ({exc})") from None
    return cfg, info


def logits_backend(teacher: Path, precision: str) -> tuple[str, Optional[Path]]:
    """Where the teacher's logits come from: its fp32 ONNX export when it has one and the student trains in fp32
    (PyTorch's fp32 logits to rounding, faster on a CPU), else its PyTorch model in the student's precision. Never
    its int8 export: int8 cost the MPNet teachers 0.87 points of test accuracy (docs/distill.md)."""
    from .predict import EXPORT_DIR, ONNX_FILES

    onnx = Path(teacher) / EXPORT_DIR / ONNX_FILES["onnx"]
    return ("onnx", onnx) if precision != "bf16" and onnx.is_file() else ("torch", None)


def _weights_sha256(teacher: Path, onnx_path: Optional[Path]) -> str:
    """What decides the teacher's logits besides its backbone: its trained weights (or its ONNX export)."""
    from .model import file_sha256  # lorafit's own file hashing, cached per file
    from .rundir import MODEL_DIR

    if onnx_path is not None:
        return file_sha256(onnx_path)
    digest = hashlib.sha256()  # model/: safetensors and their JSON configs (not the model card README.md)
    for path in sorted(p for p in (teacher / MODEL_DIR).iterdir() if p.is_file() and p.suffix in (".safetensors", ".json")):
        digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def cache_key(teacher: Path, texts: list[str], backend: str, onnx_path: Optional[Path]) -> str:
    """sha256 of everything the cached logits depend on: the teacher's backbone and weights, the backend, its
    max_length and cleaning, and the texts themselves (not token ids: a student's tokenizer does not matter)."""
    from .rundir import read_run

    _, cfg, info = read_run(teacher)
    digest = hashlib.sha256(json.dumps({
        "backbone": (info.get("backbone") or {}).get("sha256"), "weights": _weights_sha256(teacher, onnx_path),
        "backend": backend, "max_length": cfg.data.max_length, "num_layers": cfg.model.num_layers,
    }, sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def _read_cache(path: Path, key: str, rows: int) -> Optional[dict[str, Any]]:
    """The cached logits when the file holds exactly this key and row count; anything else is recomputed."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:  # plain arrays only: nothing is unpickled
            if str(saved["key"]) != key or saved["logits"].shape[0] != rows:
                return None
            return {"logits": saved["logits"].astype(np.float32), "backend": str(saved["backend"]),
                    "texts_per_s": float(saved["texts_per_s"])}
    except (OSError, ValueError, KeyError, EOFError):  # a damaged or foreign file: compute again
        return None


def teacher_logits(teacher_run: Union[str, Path], texts: list[str], batch_size: int = 64,
                   console=None, device: str = "cpu", precision: str = "fp32") -> tuple[np.ndarray, dict[str, Any]]:
    """The teacher's logits on `texts` (already cleaned as the teacher's data is), from the cache in the teacher's
    run directory or computed once (on `device` in `precision`, fp32 or bf16; see logits_backend) and cached.
    Returns the logits and what to record: cache file, whether it was reused, backend and texts/s."""
    from .predict import load, torch_backend_name

    teacher = Path(teacher_run)
    kind, onnx_path = logits_backend(teacher, precision)
    if kind != "torch":
        device = "cpu"  # ONNX Runtime runs on the CPU
    backend = torch_backend_name(precision) if kind == "torch" else kind  # predict's names; each its own key
    key = cache_key(teacher, texts, backend, onnx_path)
    path = teacher / CACHE_DIR / f"{key}.npz"
    found = _read_cache(path, key, len(texts))
    reused = found is not None
    if found is None:
        clf = load(teacher, device=device, backend=kind, batch_size=batch_size, precision=precision)
        if console is not None:
            console.print(f"teacher {teacher}: computing its logits on {len(texts)} texts ({clf.backend.name}), once")
        start = time.perf_counter()
        logits = clf.encoder_logits(texts)  # loaded with this batch size
        seconds = time.perf_counter() - start
        found = {"logits": logits.astype(np.float32), "backend": clf.backend.name,
                 "texts_per_s": round(len(texts) / max(seconds, 1e-9), 2)}
        buf = io.BytesIO()
        np.savez(buf, key=np.array(key), logits=found["logits"], backend=np.array(found["backend"]),
                 texts_per_s=np.array(found["texts_per_s"]))
        atomic_write_bytes(path, buf.getvalue())
    elif console is not None:
        console.print(f"teacher {teacher}: logits of {len(texts)} texts from its cache {path.name}")
    return found["logits"], {"cache_file": str(path), "cache_reused": reused, "teacher_backend": found["backend"],
                             "teacher_texts_per_s": found["texts_per_s"]}


def read_unlabelled(path: Union[str, Path], text_column: str, clean: bool) -> list[str]:
    """The unlabelled file's texts (cleaned as the training texts are); a missing text column is one line."""
    from .data import clean_text
    from .predict import input_texts, read_inputs

    path = Path(path)
    df = read_inputs(path, text_column=text_column)
    if text_column not in df.columns:
        raise LorafitError(f"{path}: no text column '{text_column}' (columns: {', '.join(map(str, df.columns))}); "
                           "name it with --unlabelled-text-column")
    texts = input_texts(df, [text_column], str(path))
    texts = [clean_text(t) for t in texts] if clean else texts
    return [t for t in texts if t]


# --- augmented texts ---------------------------------------------------------------------------------------------
def augment_texts(texts: list[str], copies: int, seed: int) -> list[str]:
    """`copies` altered versions of every text (copy-major order), the same for the same texts and seed (the
    data's split seed: students of one teacher share them, and the teacher's cached logits on them, whatever their
    own training seed). Each copy is one of three word-level edits, picked at random: drop every word with
    probability 0.2; keep one contiguous span of 50-90% of the words; or the first part of the text joined to the
    last part of another training text (cut at 30-70%), a mixed text whose soft label only the teacher can give.
    Rule-based so that it needs no other model and works with any tokenizer (the teacher's and the student's may
    differ)."""
    rng = np.random.default_rng([seed, 20191005])  # its own stream, apart from any other use of the seed
    words = [t.split() for t in texts]
    out = []
    for _ in range(copies):
        for i, w in enumerate(words):
            op = rng.integers(3)
            if op == 0 or len(w) < 4:
                drop = rng.random(len(w)) < 0.2
                if not drop.any() and len(w) > 1:  # a copy equal to its text would teach nothing new
                    drop[rng.integers(len(w))] = True
                new = [x for x, dropped in zip(w, drop) if not dropped] or w[:1]
            elif op == 1:
                length = max(1, round(len(w) * rng.uniform(0.5, 0.9)))
                start = rng.integers(len(w) - length + 1)
                new = w[start:start + length]
            else:
                other = words[(i + 1 + rng.integers(max(1, len(words) - 1))) % len(words)]  # not itself
                new = w[:max(1, round(len(w) * rng.uniform(0.3, 0.7)))] + \
                    other[round(len(other) * rng.uniform(0.3, 0.7)):]
            out.append(" ".join(new))
    return out


class DistillationLoss:
    """The student's loss function (recipe.LossFn): distillation_loss against the teacher's logits of the batch's
    rows (`index`: the rows' positions in the encoded train split, unlabelled rows appended)."""

    def __init__(self, teacher_logits: torch.Tensor, cfg: Config):
        self.teacher_logits = teacher_logits
        self.cfg = cfg

    def __call__(self, forward, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.cfg.distill
        logits = forward(batch)
        if self.teacher_logits.device != logits.device:  # moved once, on the first step
            self.teacher_logits = self.teacher_logits.to(logits.device)
        loss = distillation_loss(logits.float(), batch["labels"], self.teacher_logits[batch["index"]], d.temperature,
                                 d.soft_weight, d.hard_weight, self.cfg.train.label_smoothing)
        return loss, logits


class Distillation(Extension):
    """`lorafit distill` as a recipe extension: the teacher's logits for every training row (plus unlabelled and
    augmented rows, which join the training split with label IGNORE_LABEL) and the distillation loss."""

    def __init__(self):
        self.teacher_logits: Optional[torch.Tensor] = None
        self.info: dict[str, Any] = {}  # run.json's distillation section

    def prepare_data(self, recipe, data):
        """Check the teacher, append the unlabelled and augmented rows and load or compute the teacher's logits
        for every training row. Runs before the run directory exists, so bad input writes nothing."""
        from dataclasses import replace

        from .data import Encoded, encode

        cfg, d, bundle = recipe.cfg, recipe.cfg.distill, data.bundle
        runtime = recipe.runtime
        precision = "bf16" if runtime.precision == "bf16" else "fp32"  # the teacher's, for its logits
        teacher_cfg, teacher_info = check_teacher(d.teacher_run, bundle.label_names, precision)
        unlabelled = read_unlabelled(d.unlabelled_file, d.unlabelled_text_column, cfg.data.clean_text) \
            if d.unlabelled_file else []
        augmented = augment_texts(bundle.train.texts, d.augment_copies, cfg.data_seed)
        soft_only = unlabelled + augmented  # rows with the teacher's logits and no hard label
        if soft_only:
            # one truncating pass: untruncated lengths serve the length statistics and filters, which have run
            extra = encode(data.tokenizer, soft_only, cfg.data.max_length, full_lengths=False)
            train = data.encoded["train"]
            # new objects: a search's `reuse` keeps the plain data
            data = replace(data, bundle=replace(bundle, summary={**bundle.summary, "unlabelled_rows": len(unlabelled),
                                                                 "augmented_rows": len(augmented)}),
                           encoded={**data.encoded, "train": Encoded(
                               train.input_ids + extra.input_ids,
                               np.concatenate([train.labels, np.full(len(extra), IGNORE_LABEL, dtype=train.labels.dtype)]),
                               None)})
        # every process needs the logits; the main process computes and caches them first, the others read the cache.
        # The teacher runs on the student's device, in bf16 when the student trains in bf16 (on a CPU with bf16
        # units its torch logits come much faster: docs/distill.md); other precisions predict in fp32.
        with runtime.process.main_process_first():
            logits, cache = teacher_logits(d.teacher_run, bundle.train.texts + soft_only, cfg.train.eval_batch_size,
                                           recipe.console if runtime.main else None, device=str(runtime.device),
                                           precision=precision)
        self.teacher_logits = torch.from_numpy(logits)
        self.info = {**teacher_summary(Path(d.teacher_run), teacher_cfg, teacher_info),
                     "unlabelled_rows": len(unlabelled), "augmented_rows": len(augmented), **cache}
        return data

    def loss_fn(self, recipe, loss_fn):
        return DistillationLoss(self.teacher_logits, recipe.cfg)  # in place of the plain cross-entropy

    def on_start(self, recipe) -> None:
        recipe.record.update(distillation={**recipe.record.data.get("distillation", {}), **self.info})

    def on_finish(self, recipe, test_metrics: dict[str, Any]) -> None:
        """run.json's distillation section gets the student's side: its layers and its predict speed."""
        from rich.markup import escape

        from .errors import describe

        texts, speed = recipe.data.bundle.test.texts, {}
        try:
            speed = student_speed(recipe.run_dir, texts, recipe.cfg.train.eval_batch_size) if texts else {}
        except Exception as exc:  # noqa: BLE001 - a measurement for the record must never fail a finished run
            recipe.console.print(f"[yellow]warning: the student's predict speed could not be measured "
                                 f"({escape(describe(exc))})[/]")
        recipe.record.update(distillation={**recipe.record.data.get("distillation", {}),  # on_start's info
                                           "student_layers": layer_count(recipe.cfg), **speed,
                                           "speed_measured": "in-run: teacher while computing its logits, student "
                                                             "on the test split"})


def teacher_summary(teacher: Path, cfg: Config, info: dict) -> dict[str, Any]:
    from .rundir import read_test_metrics

    test = read_test_metrics(teacher)
    model = info.get("model", {})
    return {
        "teacher_run": str(teacher.resolve()), "teacher_name": teacher.name, "teacher_backbone": cfg.model.model,
        "teacher_layers": layer_count(cfg), "teacher_method": cfg.model.method,
        "teacher_test_metrics": {k: test.get(k) for k in ("accuracy", "f1_macro", "loss") if k in test},
        "teacher_trainable_params": model.get("trainable_params"), "teacher_total_params": model.get("total_params"),
    }


def check_layers(cfg: Config) -> None:
    """Refuse model.num_layers beyond the backbone's layer count (reads its config only, no weights)."""
    from transformers import AutoConfig

    from .model import load_pretrained, keep_first_layers

    hf_config = load_pretrained(AutoConfig.from_pretrained, cfg.model.model, trust_remote_code=cfg.model.trust_remote_code)
    keep_first_layers(hf_config, cfg.model.num_layers, cfg.model.model)


def layer_count(cfg: Config) -> Optional[int]:
    """Encoder layers of a run's model: model.num_layers, else the backbone config's own count."""
    if cfg.model.num_layers is not None:
        return cfg.model.num_layers
    from transformers import AutoConfig

    from .model import load_pretrained, encoder_layer_count

    try:
        return encoder_layer_count(load_pretrained(AutoConfig.from_pretrained, cfg.model.model,
                                                    trust_remote_code=cfg.model.trust_remote_code))
    except LorafitError:  # only for the record: a backbone config that cannot be read leaves it unknown
        return None


def student_speed(run_dir: Path, texts: list[str], batch_size: int = 64) -> dict[str, Any]:
    """The finished student's predict texts/s on its test texts with the torch backend (measured in-run)."""
    from .data import encode, pad_token_id
    from .predict import load

    clf = load(run_dir, backend="torch", batch_size=batch_size)
    enc = encode(clf.tokenizer, texts, clf.max_length, full_lengths=False)
    start = time.perf_counter()
    clf.backend.logits(enc, batch_size, pad_token_id(clf.tokenizer))
    seconds = time.perf_counter() - start
    return {"student_backend": clf.backend.name, "student_texts_per_s": round(len(texts) / max(seconds, 1e-9), 2)}


# --- the student's config and the entry point ---------------------------------------------------------------------
def student_config(teacher_run: Union[str, Path], config: Union[Config, dict, str, Path, None] = None,
                   **overrides) -> Config:
    """The student's config: `config` (default: the teacher's own) with the teacher's data section and split seed,
    the distill section, and flat overrides (`student` = model, `student_layers` = num_layers, any leaf name)."""
    from datetime import datetime

    from .config import OutputConfig

    teacher = Path(teacher_run)
    teacher_cfg, _ = check_teacher(teacher)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "student" in overrides:
        overrides["model"] = overrides.pop("student")
    if "student_layers" in overrides:
        overrides["num_layers"] = overrides.pop("student_layers")
    distill_values = {k: overrides.pop(k) for k in list(overrides) if k in DISTILL_FIELDS}
    distill_values.pop("teacher_run", None)
    changed_data = sorted(k for k in overrides if FIELD_SECTIONS.get(k) == "data" and k not in STUDENT_DATA_OPTIONS)
    if changed_data:
        raise LorafitError(f"distill: {', '.join(changed_data)} cannot change: the student trains on the teacher's "
                           f"data and splits so that their scores compare; only {', '.join(STUDENT_DATA_OPTIONS)} may")
    base = as_config(config) if config is not None else teacher_cfg
    values = base.model_dump(mode="json")
    values.pop("search", None)
    values["data"] = {**teacher_cfg.data.model_dump(mode="json"), "split_seed": teacher_cfg.data_seed}
    if config is None:  # a new run beside the teacher, never the teacher's own directory name
        values["output"] = OutputConfig(output_dir=teacher_cfg.output.output_dir).model_dump(mode="json")
    values["distill"] = {**(values.get("distill") or {}), "teacher_run": str(teacher), **distill_values}
    cfg = Config.from_dict(values, source="distill").with_overrides(overrides)
    if cfg.model.num_layers is not None:  # K beyond the student's layers: one line now, before any work
        check_layers(cfg)
    if cfg.output.run_name is None:
        model = cfg.model.model.split("/")[-1].split(":")[-1]
        layers = f"-{cfg.model.num_layers}L" if cfg.model.num_layers else ""
        name = f"{teacher.name}-student-{model}{layers}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        cfg = cfg.with_overrides({"run_name": name})
    return cfg
