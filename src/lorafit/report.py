"""The run report: plots, error analysis and a readable summary, drawn from the run directory alone.

Every number comes from the run's own files (metrics.jsonl, test_metrics.json, test_predictions.csv,
data.json, run.json, config.yaml); nothing is recomputed from the model. A plot that fails to draw becomes a
warning in the report, never an error of the run.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from .errors import describe
from .fileio import atomic_write_bytes, atomic_write_text
from .rundir import (read_data_summary, read_evaluation_predictions, read_labels, read_metrics, read_run,
                     read_test_metrics, read_test_predictions, read_tfidf_weight, write_evaluation_files)

PLOTS_DIR = "plots"


# --- reading the run --------------------------------------------------------------------------------------
class RunView:
    """What the report needs from a run directory, read once."""

    split = "Test"  # whose confusion matrix and mistakes the report shows

    def __init__(self, run_dir: str | Path, require_completed: bool = True):
        self.path, self.config, self.info = read_run(run_dir, require_completed=require_completed)
        self.labels = read_labels(self.path)
        self.metrics = read_metrics(self.path)
        self.data = read_data_summary(self.path)
        self.test = read_test_metrics(self.path)
        self.predictions = read_test_predictions(self.path, self.labels)
        self.tfidf_weight = read_tfidf_weight(self.path, self.config)  # config.yaml's; 0.0: no blend

    @property
    def train_rows(self) -> list[dict]:
        return [r for r in self.metrics if r.get("type") == "train"]

    @property
    def validation_rows(self) -> list[dict]:
        return [r for r in self.metrics if r.get("type") == "eval" and r.get("split") == "validation"]

    @property
    def name(self) -> str:
        return self.path.name


# --- error analysis ----------------------------------------------------------------------------------------
def confused_pairs(view: RunView, top_pairs: int = 5, examples: int = 3) -> list[dict[str, Any]]:
    """The most frequent (true, predicted) mistakes, each with its most confident misclassified examples."""
    wrong = [r for r in view.predictions if r["label"] != r["predicted"]]
    counts = Counter((r["label"], r["predicted"]) for r in wrong)
    out = []
    for (true, pred), n in counts.most_common(top_pairs):
        worst = sorted((r for r in wrong if r["label"] == true and r["predicted"] == pred), key=lambda r: -r["prob"])
        out.append({"true": true, "predicted": pred, "count": n, "examples": worst[:examples]})
    return out


# --- plots -------------------------------------------------------------------------------------------------
def _figure():
    """A standalone Figure (object-oriented API, no pyplot): it renders with Agg when saved, so the report
    never selects a backend, touches rcParams or keeps figures alive in a global registry (library code)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    return fig, fig.subplots()


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_loss(view: RunView, ax) -> None:
    train, val = view.train_rows, view.validation_rows
    smoothing = view.config.train.label_smoothing
    label = "train (mean over log interval" + (f", label smoothing {smoothing})" if smoothing else ")")
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label=label)
    ax.plot([r["step"] for r in val], [r["loss"] for r in val], marker="o", label="validation")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy loss", title="Loss")
    ax.legend()


def plot_accuracy(view: RunView, ax) -> None:
    val = view.validation_rows
    # training accuracy beside validation's, when the loop logged it (train rows carrying `accuracy`)
    train = [r for r in view.train_rows if r.get("accuracy") is not None]
    if train:
        ax.plot([r["step"] for r in train], [r["accuracy"] for r in train], label="training accuracy (log interval)")
    ax.plot([r["step"] for r in val], [r["accuracy"] for r in val], marker="o", label="validation accuracy")
    ax.axhline(view.test["accuracy"], color="grey", linestyle="--", label=f"test accuracy {view.test['accuracy']:.4f}")
    ax.set(xlabel="optimizer step", ylabel="accuracy",
           title="Training and validation accuracy" if train else "Validation accuracy")
    ax.legend()


def plot_prf(view: RunView, ax) -> None:
    val = view.validation_rows
    for key, label in (("precision_macro", "precision"), ("recall_macro", "recall"), ("f1_macro", "F1")):
        ax.plot([r["step"] for r in val], [r[key] for r in val], marker="o", label=f"macro {label}")
    ax.set(xlabel="optimizer step", ylabel="score", title="Validation macro precision / recall / F1")
    ax.legend()


def plot_confusion(view: RunView, ax, normalise: bool) -> None:
    import numpy as np

    cm = np.asarray(view.test["confusion_matrix"], dtype=float)
    shown = cm / cm.sum(1, keepdims=True).clip(min=1) if normalise else cm
    ax.imshow(shown, cmap="Blues")
    n = len(view.labels)
    ax.set_xticks(range(n), view.labels, rotation=30, ha="right")
    ax.set_yticks(range(n), view.labels)
    for i in range(n):
        for j in range(n):
            text = f"{shown[i, j]:.2f}" if normalise else f"{int(cm[i, j])}"
            ax.text(j, i, text, ha="center", va="center",
                    color="white" if shown[i, j] > shown.max() * 0.6 else "black")
    ax.set(xlabel="predicted", ylabel="true",
           title=f"{view.split} confusion matrix" + (" (row-normalised)" if normalise else " (counts)"))


def plot_classes(view: RunView, ax) -> None:
    import numpy as np

    counts = view.data.get("class_counts", {})
    splits = [s for s in ("train", "validation", "test") if s in counts]
    x = np.arange(len(view.labels))
    width = 0.8 / max(len(splits), 1)
    for k, split in enumerate(splits):
        ax.bar(x + k * width, [counts[split].get(n, 0) for n in view.labels], width, label=split)
    ax.set_xticks(x + width * (len(splits) - 1) / 2, view.labels)
    ax.set(ylabel="examples", title="Class distribution per split")
    ax.legend()


def plot_lengths(view: RunView, ax) -> None:
    stats = view.data.get("token_lengths", {})
    max_length = None
    for split, s in stats.items():
        if not s:
            continue
        width = s["histogram"]["bin_width"]
        counts = s["histogram"]["counts"]
        ax.step([i * width for i in range(len(counts))], counts, where="post", label=f"{split} (p95 {s['p95']:.0f})")
        max_length = s["max_length"]
    if max_length:
        ax.axvline(max_length, color="red", linestyle="--", label=f"truncation at {max_length}")
    ax.set(xlabel="tokens per text (before truncation)", ylabel="texts", title="Token lengths")
    ax.legend()


PLOTS: dict[str, tuple[str, Callable]] = {
    "loss.png": ("Training and validation loss", plot_loss),
    "accuracy.png": ("Validation accuracy, and training accuracy when logged (dashed: final test accuracy)",
                     plot_accuracy),
    "precision_recall_f1.png": ("Validation macro precision, recall and F1", plot_prf),
    "confusion_counts.png": ("Test confusion matrix, counts", lambda v, ax: plot_confusion(v, ax, False)),
    "confusion_normalised.png": ("Test confusion matrix, each row normalised to 1", lambda v, ax: plot_confusion(v, ax, True)),
    "class_distribution.png": ("Examples per class in each split", plot_classes),
    "token_lengths.png": ("Token lengths before truncation, with the truncation point", plot_lengths),
}


def draw_plots(view, out_dir: Path, plots: dict = PLOTS) -> tuple[list[tuple[str, str]], list[str]]:
    """Draw each of `plots` independently for `view` (a RunView, or an EvaluationView, whose split's name takes
    the place of 'Test' in the captions); return ([(file, caption)], [warnings])."""
    drawn, problems = [], []
    for filename, (caption, draw) in plots.items():
        try:
            fig, ax = _figure()
            draw(view, ax)
            atomic_write_bytes(out_dir / filename, _png(fig))
            drawn.append((filename, caption.replace("Test", view.split)))
        except Exception as exc:  # noqa: BLE001 - one broken plot must not cost the others or the run
            problems.append(f"plot {filename} could not be drawn: {describe(exc)}")
    return drawn, problems


# --- the report --------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items() if x is not None) or "none"
    if isinstance(v, float):
        # scores in [0.01, 1) with 4 decimals; learning rates, times and throughputs with 4 significant digits
        return f"{v:.4f}" if 0.01 <= abs(v) < 1 else f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return "—" if v is None else str(v)


class Figures(list):
    """A section's content that is plots: [(file name, caption)]."""


CONFUSION_PLOTS = ("confusion_counts.png", "confusion_normalised.png")
DATA_PLOTS = ("class_distribution.png", "token_lengths.png")
FOLDED = ("Hyperparameters",)  # sections the HTML report shows folded (<details>): long, and rarely read first


def metric_rows(metrics: dict[str, Any]) -> list[list[str]]:
    return [["accuracy", _fmt(metrics.get("accuracy"))], ["loss", _fmt(metrics.get("loss"))]] + [
        [f"{kind} {avg}", _fmt(metrics.get(f"{kind}_{avg}"))] for avg in ("macro", "weighted")
        for kind in ("precision", "recall", "f1")]


def per_class_rows(metrics: dict[str, Any]) -> list[list[str]]:
    return [["class", "precision", "recall", "F1", "support"]] + [
        [name, _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), _fmt(v["support"])]
        for name, v in metrics.get("per_class", {}).items()]


def error_sections(pairs: list[dict]) -> list[tuple[str, Any]]:
    """The most confused class pairs, then each pair's most confident mistakes."""
    sections: list[tuple[str, Any]] = [("Most confused class pairs", [["true", "predicted", "count"]] +
                                        [[p["true"], p["predicted"], str(p["count"])] for p in pairs])]
    for p in pairs:
        rows = [["probability", "text", "row"]] + [[f"{e['prob']:.3f}", e["text"], e["row"]] for e in p["examples"]]
        sections.append((f"{p['true']} predicted as {p['predicted']}: the most confident mistakes", rows))
    return sections


def _sections(view: RunView, pairs: list[dict], plots: list[tuple[str, str]], problems: list[str]) -> list[tuple[str, Any]]:
    """The report as (heading, content) pairs; content is a table (list of rows) or text."""
    cfg, info, data, test = view.config, view.info, view.data, view.test
    m = info.get("model", {})
    hw = info.get("hardware", {})
    cleaned = data.get("texts_cleaned")
    summary = [
        ["test accuracy", _fmt(test.get("accuracy"))], ["test macro F1", _fmt(test.get("f1_macro"))],
        ["test loss", _fmt(test.get("loss"))],
        ["trainable / total parameters", f"{_fmt(m.get('trainable_params'))} / {_fmt(m.get('total_params'))} "
                                         f"({_fmt(m.get('trainable_percent'))}%)"],
        ["wall time (s)", _fmt(info.get("wall_time_s"))], ["training samples/s", _fmt(info.get("train_samples_per_s"))],
    ]
    data_rows = [
        ["source", _fmt(data.get("source", {}))], ["split", f"{data.get('split')} (seed {data.get('seed')})"],
        ["rows read", _fmt(data.get("rows_read", {}))],
        ["train / validation / test", " / ".join(str(data.get("sizes", {}).get(k, "—")) for k in ("train", "validation", "test"))],
        ["texts cleaned", _fmt(cleaned) if data.get("clean_text") else "cleaning off"],
        ["dropped (empty after cleaning)", _fmt(data.get("dropped_empty_after_cleaning", {}))],
        ["dropped by token length", _fmt(data.get("dropped_by_length", {}))],
        ["truncated at max_length", _fmt({k: v.get("truncated") for k, v in data.get("token_lengths", {}).items() if v})],
    ]
    model_rows = [
        ["backbone", cfg.model.model], ["method", cfg.model.method], ["pooling", cfg.model.pooling],
        ["trainable parameters", _fmt(m.get("trainable_params"))], ["total parameters", _fmt(m.get("total_params"))],
        ["trainable percent", _fmt(m.get("trainable_percent"))],
        ["parameter budget", _fmt(cfg.model.param_budget)],
    ]
    if cfg.model.method == "lora":
        model_rows += [["LoRA r / alpha / dropout", f"{cfg.model.lora_r} / {cfg.model.lora_alpha} / {cfg.model.lora_dropout}"],
                       ["LoRA target modules", _fmt(cfg.model.target_modules)],
                       ["LoRA layers", "all" if cfg.model.lora_layers is None else _fmt(cfg.model.lora_layers)],
                       ["adapted linear layers", _fmt(m.get("lora_target_count"))]]
    tfidf = info.get("tfidf")
    if tfidf:
        model_rows += [["TF-IDF blend", f"weight {_fmt(view.tfidf_weight)}, C {_fmt(tfidf.get('C'))}, "
                                        f"{_fmt(tfidf.get('features'))} word 1-2-gram features"]]
    hyper = [[k, _fmt(v)] for k, v in cfg.train.model_dump().items()] + [["max_length", _fmt(cfg.data.max_length)]]
    run_rows = [
        ["status", info.get("status")], ["device / precision", f"{info.get('device')} / {info.get('precision')}"],
        ["hardware", f"{hw.get('processor')}, {hw.get('cpu_count')} CPUs, {hw.get('torch_threads')} torch threads"
                     + (f", GPUs: {', '.join(hw['gpus'])}" if hw.get("gpus") else "")],
        ["versions", ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items())],
        ["steps / epochs", f"{info.get('steps')} / {info.get('epochs_completed')}"],
        ["stopped because", info.get("stop_reason")], ["best step", _fmt(info.get("best_step"))],
        ["wall time (s)", _fmt(info.get("wall_time_s"))], ["training time (s)", _fmt(info.get("train_time_s"))],
        ["training samples/s", _fmt(info.get("train_samples_per_s"))],
        ["padding efficiency", _fmt(info.get("padding_efficiency"))],
        ["frozen-prefix cache", "off" if info.get("prefix_cache_from_layer") is None else
         f"layers below {info.get('prefix_cache_from_layer')} computed once ({_fmt(info.get('prefix_cache_s'))} s)"],
    ]
    # What a reader looks for first: the headline numbers, then how training went and where the model errs; the
    # settings that produced them come last, the long hyperparameter table folded away (FOLDED)
    sections: list[tuple[str, Any]] = [("Summary", summary)]
    distilled = distillation_rows(view)
    if distilled:
        sections.append(("Distillation: teacher vs student", distilled))
    if tfidf:
        sections.append(("TF-IDF blend: the encoder alone and blended", tfidf_rows(tfidf, view.tfidf_weight)))
    if problems:
        sections.append(("Warnings", "\n".join(problems)))
    sections += [("Learning curves", Figures((n, c) for n, c in plots if n not in CONFUSION_PLOTS + DATA_PLOTS)),
                 ("Test confusion matrix", Figures((n, c) for n, c in plots if n in CONFUSION_PLOTS)),
                 *error_sections(pairs)]
    sections += [("Data", data_rows), ("Class distribution and token lengths", Figures((n, c) for n, c in plots
                                                                                       if n in DATA_PLOTS)),
                 ("Model and method", model_rows), ("Hyperparameters", hyper),
                 ("Hardware, time and throughput", run_rows), ("Test metrics", metric_rows(test)),
                 ("Per-class test metrics", per_class_rows(test))]
    return [(heading, content) for heading, content in sections if not isinstance(content, Figures) or content]


def tfidf_rows(tfidf: dict[str, Any], weight: float) -> list[list[str]]:
    """run.json `tfidf`: what the blend (at `weight`, the run config's) changed, on validation (the encoder's best
    step) and test."""
    return [["accuracy", "encoder alone", "TF-IDF alone", f"blend (weight {_fmt(weight)})"],
            ["validation", _fmt(tfidf.get("validation_accuracy_encoder")), _fmt(tfidf.get("validation_accuracy_tfidf")),
             _fmt(tfidf.get("validation_accuracy_blend"))],
            ["test", _fmt(tfidf.get("test_accuracy_encoder")), _fmt(tfidf.get("test_accuracy_tfidf")),
             _fmt(tfidf.get("test_accuracy_blend"))]]


def distillation_rows(view: RunView) -> list[list[str]]:
    """A distilled run (run.json `distillation`): teacher and student side by side; [] for other runs."""
    d = view.info.get("distillation")
    if not d:
        return []
    teacher, m = d.get("teacher_test_metrics", {}), view.info.get("model", {})

    def speed(side: str) -> str:
        value = d.get(f"{side}_texts_per_s")
        return f"{_fmt(value)} ({d.get(f'{side}_backend')}, measured in-run)" if value is not None else "—"

    return [
        ["", "teacher", "student (this run)"],
        ["run", d.get("teacher_name"), view.name],
        ["backbone", d.get("teacher_backbone"), view.config.model.model],
        ["encoder layers", _fmt(d.get("teacher_layers")), _fmt(d.get("student_layers"))],
        ["method", d.get("teacher_method"), view.config.model.method],
        ["test accuracy", _fmt(teacher.get("accuracy")), _fmt(view.test.get("accuracy"))],
        ["test macro F1", _fmt(teacher.get("f1_macro")), _fmt(view.test.get("f1_macro"))],
        ["trainable / total parameters", f"{_fmt(d.get('teacher_trainable_params'))} / "
                                         f"{_fmt(d.get('teacher_total_params'))}",
         f"{_fmt(m.get('trainable_params'))} / {_fmt(m.get('total_params'))}"],
        ["predict texts/s", speed("teacher"), speed("student")],
        ["temperature / soft weight / hard weight", "",
         "{d.temperature:g} / {d.soft_weight:g} / {d.hard_weight:g}".format(d=view.config.distill)
         if view.config.distill else "—"],
        ["unlabelled rows", "", _fmt(d.get("unlabelled_rows"))],
        ["augmented rows", "", _fmt(d.get("augmented_rows"))],
    ]


def _markdown(title: str, sections) -> str:
    lines = [f"# {title}", ""]
    for heading, content in sections:
        lines += [f"## {heading}", ""]
        if isinstance(content, Figures):
            lines += [f"![{caption}]({PLOTS_DIR}/{name})\n\n*{caption}*\n" for name, caption in content]
        elif isinstance(content, str):
            lines += [f"- {line}" for line in content.splitlines()] + [""]
        else:
            header = content[0] if len(content[0]) != 2 or heading in ("Most confused class pairs",) else ["", ""]
            body = content[1:] if header is content[0] else content
            cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            lines += ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(map(cell, row)) + " |" for row in body] + [""]
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2rem auto;padding:0 1rem;
color:#1f2328;line-height:1.45}h1{border-bottom:2px solid #d0d7de;padding-bottom:.3rem}
h2{margin-top:2rem;border-bottom:1px solid #d0d7de;padding-bottom:.2rem}table{border-collapse:collapse;margin:.5rem 0}
td,th{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left;vertical-align:top}th{background:#f6f8fa}
.headline{display:flex;gap:1rem;flex-wrap:wrap}.card{background:#f6f8fa;border:1px solid #d0d7de;border-radius:8px;
padding:.7rem 1rem;min-width:9rem}.card b{display:block;font-size:1.5rem}.figs{display:flex;flex-wrap:wrap;gap:1rem}
figure{margin:0;flex:1 1 480px}figure img{max-width:100%;border:1px solid #d0d7de}figcaption{font-size:.9rem;color:#57606a}
.warn{background:#fff8c5;border:1px solid #d4a72c;padding:.5rem 1rem}td.text{max-width:700px}
"""


def _html(title: str, sections, plots_dir: Path) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{e(title)}</h1>"]
    for heading, content in sections:
        if heading == "Summary":
            out.append("<div class='headline'>" + "".join(
                f"<div class='card'>{e(k)}<b>{e(v)}</b></div>" for k, v in content) + "</div>")
            continue
        out.append(f"<h2>{e(heading)}</h2>")
        if heading in FOLDED:  # a plain <details>: folded without any script
            out.append(f"<details><summary>show all {len(content)}</summary>")
        if isinstance(content, Figures):
            out.append("<div class='figs'>" + "".join(figure_html(plots_dir / name, caption)
                                                      for name, caption in content) + "</div>")
        elif isinstance(content, str):
            out.append("<div class='warn'>" + "<br>".join(e(line) for line in content.splitlines()) + "</div>")
        else:
            has_header = len(content[0]) != 2 or heading == "Most confused class pairs"
            rows = content[1:] if has_header else content
            table = ["<table>"]
            if has_header:
                table.append("<tr>" + "".join(f"<th>{e(str(c))}</th>" for c in content[0]) + "</tr>")
            for row in rows:
                cells = "".join(f"<td{' class=text' if len(str(c)) > 80 else ''}>{e(str(c))}</td>" for c in row)
                table.append(f"<tr>{cells}</tr>")
            out.append("".join(table) + "</table>")
        if heading in FOLDED:
            out.append("</details>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(run_dir: str | Path, require_completed: bool = True) -> Path:
    """Write the model card (model/README.md), plots/, report.md and a self-contained report.html into the run
    directory; return report.html. The card comes first, so a plot that fails never costs it."""
    from .card import write_model_card

    view = RunView(run_dir, require_completed=require_completed)
    card_problems = []
    try:
        write_model_card(view.path, require_completed=require_completed)
    except Exception as exc:  # noqa: BLE001 - like a plot, a card that cannot be written is a warning
        card_problems.append(f"model card model/README.md could not be written: {describe(exc)}")
    plots_dir = view.path / PLOTS_DIR
    plots_dir.mkdir(exist_ok=True)
    plots, problems = draw_plots(view, plots_dir)
    problems = card_problems + problems
    for problem in problems:
        warnings.warn(problem, stacklevel=2)
    pairs = confused_pairs(view)
    title = f"lorafit run {view.name}: {view.config.model.method} on {view.config.model.model}"
    sections = _sections(view, pairs, plots, problems)
    atomic_write_text(view.path / "report.md", _markdown(title, sections))
    atomic_write_text(view.path / "report.html", _html(title, sections, plots_dir))
    return view.path / "report.html"


# --- an evaluation on another labelled file ------------------------------------------------------------------
class EvaluationView:
    """What the plots and error tables read (as RunView gives them), for `lorafit evaluate` on a labelled file."""

    def __init__(self, out_dir: Path, source: str, labels: list[str], metrics: dict[str, Any]):
        self.path, self.labels, self.test, self.split = out_dir, labels, metrics, Path(source).name
        self.predictions = read_evaluation_predictions(out_dir, labels)


EVALUATION_PLOTS = {name: PLOTS[name] for name in CONFUSION_PLOTS}


def write_evaluation(run_dir: str | Path, out_dir: str | Path, source: str, rows, texts: list[str], labels,
                     logits, metrics: dict[str, Any], backend: str) -> Path:
    """An evaluation directory for a labelled file, with the run report's metrics, confusion matrices, confused
    pairs, most confident mistakes and per-class table: metrics.json, predictions.csv, plots/, report.md,
    report.html. Returns report.html."""
    from .evaluate import softmax

    run_dir, out = Path(run_dir), Path(out_dir)
    names = read_labels(run_dir)
    (out / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    write_evaluation_files(out, {"run": str(run_dir), "data": source, "backend": backend, **metrics},
                           rows, texts, labels, softmax(logits), names)
    view = EvaluationView(out, source, names, metrics)
    plots, problems = draw_plots(view, out / PLOTS_DIR, EVALUATION_PLOTS)
    pairs = confused_pairs(view)
    summary = [["accuracy", _fmt(metrics.get("accuracy"))], ["macro F1", _fmt(metrics.get("f1_macro"))],
               ["loss", _fmt(metrics.get("loss"))], ["texts", _fmt(metrics.get("n"))]]
    sections: list[tuple[str, Any]] = [("Summary", summary)]
    if problems:
        sections.append(("Warnings", "\n".join(problems)))
    sections += [("Confusion matrix", Figures(plots)), *error_sections(pairs)]
    sections += [("Metrics", metric_rows(metrics)), ("Per-class metrics", per_class_rows(metrics)),
                 ("Run and backend", [["run", str(run_dir)], ["data", source], ["backend", backend]])]
    sections = [(h, c) for h, c in sections if not isinstance(c, Figures) or c]
    title = f"lorafit evaluation of {run_dir.name} on {view.split}"
    atomic_write_text(out / "report.md", _markdown(title, sections))
    atomic_write_text(out / "report.html", _html(title, sections, out / PLOTS_DIR))
    return out / "report.html"


# --- comparing runs ----------------------------------------------------------------------------------------
COMPARED = ("model", "method", "pooling", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "lora_layers",
            "learning_rate", "epochs", "batch_size", "precision", "seed")


def compare(run_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """One table (markdown, HTML, CSV) and overlaid validation curves for several runs; return the HTML path."""
    views = [RunView(d) for d in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = [{**v.config.data.model_dump(), **v.config.model.model_dump(), **v.config.train.model_dump()} for v in views]
    differing = [k for k in COMPARED if len({json.dumps(f.get(k)) for f in flat}) > 1] or ["model", "method"]
    header = ["run", *differing, "test accuracy", "test macro F1", "trainable params", "samples/s", "wall s"]
    rows = [[v.name, *[_fmt(f.get(k)) for k in differing], _fmt(v.test.get("accuracy")), _fmt(v.test.get("f1_macro")),
             _fmt(v.info.get("model", {}).get("trainable_params")), _fmt(v.info.get("train_samples_per_s")),
             _fmt(v.info.get("wall_time_s"))] for v, f in zip(views, flat)]
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    atomic_write_text(out / "compare.csv", buf.getvalue())

    plots, problems = [], []
    for name, key, ylabel in (("compare_accuracy.png", "accuracy", "validation accuracy"),
                              ("compare_loss.png", "loss", "validation loss")):
        try:
            fig, ax = _figure()
            for v in views:
                val = v.validation_rows
                ax.plot([r["step"] for r in val], [r[key] for r in val], marker="o", label=v.name)
            ax.set(xlabel="optimizer step", ylabel=ylabel, title=ylabel.capitalize())
            ax.legend(fontsize="small")
            atomic_write_bytes(out / name, _png(fig))
            plots.append((name, ylabel.capitalize() + " of each run"))
        except Exception as exc:  # noqa: BLE001
            problems.append(f"plot {name} could not be drawn: {describe(exc)}")
    sections = [("Runs", [header, *rows]), ("Plots", Figures(plots))]
    sections += [("Warnings", "\n".join(problems))] if problems else []
    title = f"lorafit comparison of {len(views)} runs"
    md = _markdown(title, sections).replace(f"]({PLOTS_DIR}/", "](")
    atomic_write_text(out / "compare.md", md)
    atomic_write_text(out / "compare.html", _html(title, sections, out))
    return out / "compare.html"


def figure_html(png: Path, caption: str) -> str:
    """A captioned figure with the PNG inlined: the page stays one self-contained file."""
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    e = html.escape
    return f"<figure><img alt='{e(caption)}' src='data:image/png;base64,{data}'><figcaption>{e(caption)}</figcaption></figure>"
