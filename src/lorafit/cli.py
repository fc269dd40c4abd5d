"""The `lorafit` command line (Typer + Rich). Every `train` option is generated from a Config field, so a flag
and a YAML key can never drift apart: `--lora-r 8` is `model.lora_r: 8`."""

from __future__ import annotations

import functools
import inspect
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .config import SECTIONS, Config
from .errors import LorafitError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
    help="Fine-tune pretrained encoders for text classification with LoRA, then evaluate, report and predict.",
)
err = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Fine-tune pretrained encoders for text classification with LoRA, then evaluate, report and predict."""


def cli_errors(func: Callable) -> Callable:
    """Bad input is one clear line and exit code 2, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except LorafitError as exc:
            code = getattr(exc, "exit_code", 2)
            # escaped: a message is text, not Rich markup ("pip install lorafit[mpnet]" must print as is)
            err.print(f"[bold red]{'error' if code == 2 else 'stopped'}:[/] {escape(str(exc))}", highlight=False,
                      soft_wrap=True)
            raise typer.Exit(code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


# --- train: options generated from the Config fields ------------------------------------------------------
def _is_list(annotation) -> bool:
    return typing.get_origin(annotation) is list or any(
        typing.get_origin(a) is list for a in typing.get_args(annotation)
    )


def _is_optional(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def _section_flag(section, name: str, value):
    """A flag of a section kept out of SECTIONS (search:, distill:): 'none'/'null' is None where the field allows it;
    anything else goes to the config as given, which validates it."""
    optional = _is_optional(section.model_fields[name].annotation)
    return None if optional and str(value).strip().lower() in ("none", "null") else value


def _choices(annotation) -> list[str]:
    for a in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(a) is typing.Literal:
            return [str(x) for x in typing.get_args(a)]
    return []


def _metavar(annotation) -> str:
    if _choices(annotation):
        return "CHOICE"
    if _is_list(annotation):
        return "A,B,..."
    for kind, label in ((int, "INT"), (float, "FLOAT")):
        if annotation is kind or kind in typing.get_args(annotation):
            return label
    return "TEXT"


def _help(field, default) -> str:
    text = field.description or ""
    choices = _choices(field.annotation)
    if choices:
        text += f" [{'|'.join(choices)}]"
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    return escape(f"{text} (default: {shown})")  # plain text: Rich markup would eat "[mpnet]" and "[cls|mean]"


def parse_flag(name: str, value: Any) -> Any:
    """Turn a command-line string into what the Config field takes: lists split on commas, 'none' -> None."""
    section = next(s for s in SECTIONS.values() if name in s.model_fields)
    field = section.model_fields[name]
    if isinstance(value, str):
        if value.strip().lower() in ("none", "null") and _is_optional(field.annotation):
            return None
        if _is_list(field.annotation):
            return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _train_signature() -> inspect.Signature:
    params = [
        inspect.Parameter(
            "config_file", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[Path],
            default=typer.Argument(None, help="YAML config (see configs/); flags override its values.", show_default=False),
        ),
        inspect.Parameter(
            "resume", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
            default=typer.Option(None, "--resume", help="Continue an interrupted run directory from its last checkpoint."),
        ),
        inspect.Parameter(
            "print_config", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
            default=typer.Option(False, "--print-config", help="Print the resolved config as YAML and exit."),
        ),
    ]
    for section, model in SECTIONS.items():
        for name, field in model.model_fields.items():
            flag = "--" + name.replace("_", "-")
            if field.annotation in (bool, Optional[bool]):
                option = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=_help(field, field.default),
                                      rich_help_panel=section, show_default=False)
                annotation = Optional[bool]
            else:
                option = typer.Option(None, flag, help=_help(field, field.default), rich_help_panel=section,
                                      show_default=False, metavar=_metavar(field.annotation))
                annotation = Optional[str]
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=option))
    return inspect.Signature(params)


@cli_errors
def _train(config_file: Optional[Path] = None, resume: Optional[Path] = None, print_config: bool = False, **flags):
    overrides = {k: parse_flag(k, v) for k, v in flags.items() if v is not None}
    if resume is not None:
        from .train import resume as resume_run

        resume_run(resume, **overrides)
        return
    cfg = Config.from_yaml(config_file) if config_file else Config()
    if overrides:
        cfg = cfg.with_overrides(overrides)
    if print_config:
        typer.echo(cfg.to_yaml(), nl=False)
        return
    from .model import check_quantization

    check_quantization(cfg.model, cfg.train.device)  # before any data loads: --quantize needs bitsandbytes + CUDA
    from .train import train

    train(cfg)


_train.__signature__ = _train_signature()
app.command(
    "train",
    help="Fine-tune, evaluate on the test split and write a run directory. With no arguments: the embedded "
    "MiniLM with LoRA on the bundled AG News sample.",
)(_train)


# --- search: the train options fix what is not searched, plus the search section's own ---------------------
def _search_signature() -> inspect.Signature:
    from .config import SEARCH_FIELDS, SearchConfig

    params = []
    for p in _train_signature().parameters.values():
        if p.name == "resume":
            continue
        if p.name == "time_budget_minutes":  # the flag: in a search it bounds the study, not each trial
            p = p.replace(default=typer.Option(None, "--time-budget-minutes", metavar="FLOAT", show_default=False,
                                               rich_help_panel="search", help="Stop starting trials after this many "
                                               "minutes (search.timeout_minutes; a per-trial budget goes in YAML)."))
        params.append(p)
    aliases = {"search_dir": ["--out"]}
    for name in SEARCH_FIELDS:
        field = SearchConfig.model_fields[name]
        if name == "timeout_minutes":
            continue
        option = typer.Option(None, "--" + name.replace("_", "-"), *aliases.get(name, []), rich_help_panel="search",
                              help=_help(field, field.default), show_default=False, metavar=_metavar(field.annotation))
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=option))
    return inspect.Signature(params)


@cli_errors
def _search(config_file: Optional[Path] = None, print_config: bool = False, **flags):
    from .config import SEARCH_FIELDS, SearchConfig
    from .search import search, search_config

    flags["timeout_minutes"] = flags.pop("time_budget_minutes", None)
    overrides = {}
    for name, value in flags.items():
        if value is None:
            continue
        if name in SEARCH_FIELDS:
            overrides[name] = _section_flag(SearchConfig, name, value)
        else:
            overrides[name] = parse_flag(name, value)
    cfg = search_config(Config.from_yaml(config_file) if config_file else None, **overrides)
    if print_config:
        typer.echo(cfg.to_yaml(), nl=False)
        return
    search(cfg)


_search.__signature__ = _search_signature()
app.command(
    "search",
    help="Hyperparameter search with Optuna over the config's search: section (default: lr, batch size, "
    "accumulation, weight decay, LoRA r/alpha/dropout, target modules, layers) under the parameter budget. Running "
    "it again continues the study; workers with the same --study-name and --storage share it.",
)(_search)


# --- distill: a completed run teaches a student; the train options plus the distill section's -------------------
# the names for the two model options a student is chosen by
_STUDENT_ALIASES = {"model": ("--student", "The student's backbone (default: the teacher's), e.g. "
                                           "embedded:all-MiniLM-L6-v2."),
                    "num_layers": ("--student-layers", "Keep only the student backbone's first K encoder layers "
                                                       "(layer dropping, from its pretrained weights).")}
FIELD_SECTIONS_DATA = set(SECTIONS["data"].model_fields)


def _distill_signature() -> inspect.Signature:
    from .config import DISTILL_FIELDS, DistillConfig
    from .distill import STUDENT_DATA_OPTIONS

    params = [inspect.Parameter(
        "teacher_run", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
        default=typer.Argument(..., help="The teacher: a completed run directory.", show_default=False))]
    params.append(inspect.Parameter(
        "config_file", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
        default=typer.Option(None, "--config", help="YAML config of the student's model/train/output sections "
                             "(default: the teacher's); its data section is replaced by the teacher's.")))
    for p in _train_signature().parameters.values():
        if p.name in ("config_file", "resume") or (p.name in FIELD_SECTIONS_DATA and p.name not in STUDENT_DATA_OPTIONS):
            continue  # the student's data is the teacher's; resume a student with lorafit train --resume
        if p.name in _STUDENT_ALIASES:
            flag, text = _STUDENT_ALIASES[p.name]
            p = p.replace(default=typer.Option(None, flag, "--" + p.name.replace("_", "-"), help=escape(text),
                                               rich_help_panel="distill", show_default=False,
                                               metavar="INT" if p.name == "num_layers" else "TEXT"))
        params.append(p)
    for name in DISTILL_FIELDS:
        if name == "teacher_run":
            continue
        field = DistillConfig.model_fields[name]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=typer.Option(
            None, "--" + name.replace("_", "-"), rich_help_panel="distill", help=_help(field, field.default),
            show_default=False, metavar=_metavar(field.annotation))))
    return inspect.Signature(params)


@cli_errors
def _distill(teacher_run: Path, config_file: Optional[Path] = None, print_config: bool = False, **flags):
    from .config import DISTILL_FIELDS, DistillConfig
    from .distill import student_config
    from .train import train

    overrides = {k: (_section_flag(DistillConfig, k, v) if k in DISTILL_FIELDS else parse_flag(k, v))
                 for k, v in flags.items() if v is not None}
    cfg = student_config(teacher_run, Config.from_yaml(config_file) if config_file else None, **overrides)
    if print_config:
        typer.echo(cfg.to_yaml(), nl=False)
        return
    train(cfg)


_distill.__signature__ = _distill_signature()
app.command(
    "distill",
    help="Train a student run on a completed teacher run's logits (soft-label KL at a temperature + the hard "
    "labels) on the teacher's data and splits; the teacher's logits are computed once and cached in its run "
    "directory. The student may be another backbone (--student) or the first K layers of one (--student-layers).",
)(_distill)


# --- inference: classify, predict, evaluate, merge, export ------------------------------------------------
_BACKEND_HELP = ("auto: the run's ONNX export if present (int8 when it was exported), else torch | torch | onnx | "
                 "onnx-int8")
_RUN_ARG = typer.Argument(..., help="A completed run directory.", show_default=False)


_ALLOW_BASE = typer.Option(False, "--allow-different-base", help="Load even if the run's backbone changed since "
                           "training (run.json `backbone`); otherwise that is refused.")


def _load_run(run: Path, backend: str, batch_size: int, precision: str, allow_different_base: bool = False):
    from .predict import load

    return load(run, backend=backend, batch_size=batch_size, precision=precision,
                allow_different_base=allow_different_base)


def _input_columns(clf, path: Path, text_column: Optional[str]) -> list[str]:
    """--text-column, else the run's own text column(s); a .txt file is one text per line."""
    if path.name.lower().endswith(".txt"):
        return ["text"]
    if text_column:
        return [c.strip() for c in text_column.split(",") if c.strip()]
    from .config import Config

    data = Config.from_yaml(clf.run_dir / "config.yaml").data
    return data.text_columns or [data.text_column]


@app.command("classify", help="Classify texts given on the command line: label and class probabilities.")
@cli_errors
def classify(
    run: Path = _RUN_ARG,
    texts: list[str] = typer.Argument(..., help="One or more texts (quote each).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: [{text, label, probabilities{class: p}}]."),
    backend: str = typer.Option("auto", "--backend", help=_BACKEND_HELP),
    precision: str = typer.Option("fp32", "--precision", help="torch backend: fp32 | bf16 (autocast)."),
    allow_different_base: bool = _ALLOW_BASE,
) -> None:
    import json

    from rich.console import Console

    clf = _load_run(run, backend, 64, precision, allow_different_base)
    probs = clf.predict_proba(texts)
    names = [str(n) for n in clf.classes_]
    rows = [{"text": t, "label": names[int(p.argmax())], "probabilities": {n: round(float(x), 6) for n, x in zip(names, p)}}
            for t, p in zip(texts, probs)]
    if as_json:
        typer.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    out = Console(highlight=False, soft_wrap=True)
    err.print(f"[dim]{run} ({clf.backend.name})[/]", highlight=False)
    for row in rows:
        ranked = sorted(row["probabilities"].items(), key=lambda kv: -kv[1])
        out.print(f"[bold]{row['label']}[/] {ranked[0][1]:.3f}  {row['text'][:100]}")
        out.print("  " + "  ".join(f"{n} {p:.3f}" for n, p in ranked[:8]), style="dim")


@app.command("predict", help="Predict a file (csv, tsv, jsonl, json, parquet, txt: one text per line; pkl with "
             "--allow-pickle) into a CSV with columns ID,Label (as leaderboards expect).")
@cli_errors
def predict_file(
    run: Path = _RUN_ARG,
    input: Path = typer.Option(..., "--input", "-i", help="File of texts to classify.", show_default=False),
    output: Path = typer.Option(..., "--output", "-o", help="CSV to write (ID,Label[,prob_<class>...]).", show_default=False),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="Text column(s), comma-separated (default: the run's)."),
    id_column: Optional[str] = typer.Option(None, "--id-column", help="ID column (default: a column named id/ID, else the row index)."),
    label_format: str = typer.Option("name", "--labels", help="Write labels as class names (name) or class ids (id)."),
    probabilities: bool = typer.Option(False, "--probabilities", help="Add a prob_<class> column per class."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read .pkl/.pickle inputs (unpickling runs code: trusted files only)."),
    backend: str = typer.Option("auto", "--backend", help=_BACKEND_HELP),
    precision: str = typer.Option("fp32", "--precision", help="torch backend: fp32 | bf16 (autocast)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Texts per forward pass (sorted by length; on a GPU larger pays)."),
    allow_different_base: bool = _ALLOW_BASE,
) -> None:
    import io
    import time

    import pandas as pd

    from .fileio import atomic_write_text
    from .predict import input_texts, read_inputs, row_ids

    if label_format not in ("name", "id"):
        raise LorafitError(f"--labels {label_format}: use name or id")
    clf = _load_run(run, backend, batch_size, precision, allow_different_base)
    df = read_inputs(input, allow_pickle=allow_pickle)
    texts = input_texts(df, _input_columns(clf, input, text_column), str(input))
    ids = row_ids(df, id_column, str(input))
    t0 = time.perf_counter()
    probs = clf.predict_proba(texts)
    seconds = time.perf_counter() - t0
    pred = probs.argmax(-1)
    out = pd.DataFrame({"ID": ids, "Label": clf.classes_[pred] if label_format == "name" else pred})
    if probabilities:
        for j, name in enumerate(clf.classes_):
            out[f"prob_{name}"] = probs[:, j].round(6)
    buf = io.StringIO()
    out.to_csv(buf, index=False)
    atomic_write_text(output, buf.getvalue())
    counts = ", ".join(f"{n} {c}" for n, c in out["Label"].value_counts().sort_index().items())
    err.print(f"wrote {len(out)} predictions to {output} ({clf.backend.name}, {len(texts) / max(seconds, 1e-9):.0f} "
              f"texts/s); labels: {counts}", highlight=False, soft_wrap=True)


@app.command("evaluate", help="Metrics of a run on any labelled file (the same metrics as training's test split).")
@cli_errors
def evaluate_file(
    run: Path = _RUN_ARG,
    data: Path = typer.Option(..., "--data", "-d", help="Labelled file (csv, tsv, jsonl, json, parquet; pkl with --allow-pickle).", show_default=False),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="Text column(s), comma-separated (default: the run's)."),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="Label column: class names or ids (default: the run's)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read .pkl/.pickle files (unpickling runs code: trusted files only)."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the metrics as JSON to this file."),
    backend: str = typer.Option("auto", "--backend", help=_BACKEND_HELP),
    precision: str = typer.Option("fp32", "--precision", help="torch backend: fp32 | bf16 (autocast)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Texts per forward pass (sorted by length; on a GPU larger pays)."),
    allow_different_base: bool = _ALLOW_BASE,
) -> None:
    import json

    from rich.console import Console
    from rich.table import Table

    from .config import Config
    from .data import labels_from
    from .evaluate import compute_metrics
    from .fileio import atomic_write_json
    from .predict import input_texts, read_inputs

    clf = _load_run(run, backend, batch_size, precision, allow_different_base)
    df = read_inputs(data, allow_pickle=allow_pickle)
    texts = input_texts(df, _input_columns(clf, data, text_column), str(data))
    data_cfg = Config.from_yaml(clf.run_dir / "config.yaml").data
    if label_column:
        data_cfg = data_cfg.model_copy(update={"label_column": label_column})
    names = [str(n) for n in clf.classes_]
    labels, _ = labels_from(df, data_cfg, str(data), names, fixed=True)
    metrics = {"data": str(data), "backend": clf.backend.name, **compute_metrics(labels, clf.decision_function(texts), names)}
    if output:
        atomic_write_json(output, metrics)
    if as_json:
        typer.echo(json.dumps(metrics, indent=2, ensure_ascii=False))
        return
    out = Console(highlight=False)
    out.print(f"[bold]{data}[/]: {metrics['n']} texts, accuracy {metrics['accuracy']:.4f}, macro F1 "
              f"{metrics['f1_macro']:.4f}, loss {metrics['loss']:.4f} ({clf.backend.name})")
    table = Table("class", "precision", "recall", "f1", "support")
    for name, row in metrics["per_class"].items():
        table.add_row(name, f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", str(row["support"]))
    out.print(table)


@app.command("merge", help="Write the run's model with the adapter merged into the base, as a plain Transformers "
             "model that loads without lorafit.")
@cli_errors
def merge_run(
    run: Path = _RUN_ARG,
    out: Path = typer.Option(..., "--out", help="Directory to write.", show_default=False),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out directory."),
    allow_different_base: bool = _ALLOW_BASE,
) -> None:
    from .export import merge

    result = merge(run, out, overwrite=overwrite, allow_different_base=allow_different_base)
    if result["pooling"] == "cls":
        typer.echo(f"wrote {out}: a plain Transformers model; load it with "
                   f"AutoModelForSequenceClassification.from_pretrained('{out}') (tokenizer included)")
    else:
        typer.echo(f"wrote {out}: this run uses mean pooling, which Transformers has no classification class for, so "
                   f"{out} holds the merged encoder (AutoModel.from_pretrained('{out}')) + the head in "
                   f"head.safetensors; {out}/README.md shows the 5 lines that apply it")
    if result["tfidf_weight_not_merged"] is not None:
        typer.echo(f"note: it is the encoder alone; the run's predictions also blend its TF-IDF model (weight "
                   f"{result['tfidf_weight_not_merged']:g}), which lorafit.load('{run}') applies")


@app.command("export", help="Export the run's classifier to RUN/export/ for ONNX Runtime; predict and classify "
             "then use it (--backend auto).")
@cli_errors
def export_run(
    run: Path = _RUN_ARG,
    format: str = typer.Option("onnx", "--format", help="Export format (onnx)."),
    int8: bool = typer.Option(False, "--int8", help="Also write a dynamically int8-quantised model (faster on CPU)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset version."),
    allow_different_base: bool = _ALLOW_BASE,
) -> None:
    from .export import export_onnx

    if format != "onnx":
        raise LorafitError(f"--format {format}: only onnx is supported")
    report = export_onnx(run, int8=int8, opset=opset, allow_different_base=allow_different_base)
    files = ", ".join(f"{run / 'export' / f}" for f in report["files"].values())
    typer.echo(f"wrote {files}")
    check = report.get("check")
    if check:
        base = check.get("torch", {}).get("accuracy")
        typer.echo(f"checked on {check['n']} test texts of the run" + (f": torch accuracy {base:.4f}" if base is not None else ""))
        for name in report["files"]:
            row = check[name]
            acc = f", accuracy {row['accuracy']:.4f} ({row['accuracy_change_points']:+.2f} points)" if "accuracy" in row else ""
            typer.echo(f"  {name}: labels agree with torch on {100 * row['agreement']:.2f}%{acc}, "
                       f"max |logit diff| {row['max_abs_logit_diff']:.2g}")
    used = "onnx-int8" if int8 else "onnx"
    typer.echo(f"predict/classify/evaluate now use {used} by default (--backend torch|onnx|onnx-int8 to choose)")


@app.command("push", help="Upload a run's model, tokenizer, labels, config and model card to the Hugging Face Hub "
             "in one commit (nothing partial lands).")
@cli_errors
def push_run(
    run: Path = _RUN_ARG,
    repo_id: str = typer.Option(..., "--repo-id", help="Hub model repo, e.g. user/ag-news-minilm-lora.", show_default=False),
    private: bool = typer.Option(False, "--private", help="Create the repo as private."),
    token: Optional[str] = typer.Option(None, "--token", help="Hub token with write access (default: HF_TOKEN or the "
                                        "token saved by `hf auth login`)."),
) -> None:
    from .push import push

    typer.echo(f"pushed {run} to https://huggingface.co/{repo_id}: {push(run, repo_id, private=private, token=token)}")


# --- serve (HTTP) -----------------------------------------------------------------------------------------
def _serve_help(name: str) -> str:
    from .serve import ServeOptions

    return ServeOptions.model_fields[name].description


@app.command("serve", help="Serve the run over HTTP with dynamic batching: POST /v1/classify, POST /predict, "
             "GET /v1/model, /healthz, /readyz, /metrics, a page at / and OpenAPI at /docs (docs/serving.md).")
@cli_errors
def serve_run(
    run: Path = _RUN_ARG,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default; 0.0.0.0 for all)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on."),
    backend: str = typer.Option("auto", "--backend", help=_serve_help("backend")),
    max_batch_size: int = typer.Option(64, "--max-batch-size", min=1, help=_serve_help("max_batch_size")),
    forward_batch_size: int = typer.Option(8, "--forward-batch-size", min=1, help=_serve_help("forward_batch_size")),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0, help=_serve_help("max_wait_ms")),
    max_queue: int = typer.Option(1024, "--max-queue", min=1, help=_serve_help("max_queue")),
    max_texts: int = typer.Option(256, "--max-texts", min=1, help=_serve_help("max_texts")),
    max_chars: int = typer.Option(20_000, "--max-chars", min=1, help=_serve_help("max_chars")),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LORAFIT_API_KEY", show_default=False,
                                          help=_serve_help("api_key") + " Also read from LORAFIT_API_KEY."),
) -> None:
    import copy
    import signal

    import uvicorn

    from .serve import ServeOptions, check_host, create_app

    opts = ServeOptions(backend=backend, max_batch_size=max_batch_size, forward_batch_size=forward_batch_size,
                        max_wait_ms=max_wait_ms, max_queue=max_queue,
                        max_texts=max_texts, max_chars=max_chars, api_key=api_key or None)
    application = create_app(run, opts)  # reads the run and resolves the backend: bad input fails before listening
    warning = check_host(host, opts.api_key)
    if warning:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    from .predict import resolve_backend

    kind, _ = resolve_backend(run, backend)
    why = " (auto: the fastest the run has)" if backend == "auto" else ""
    err.print(f"serving {run} with the {kind} backend{why} at http://{host}:{port} (page at /, API at /docs)",
              highlight=False, soft_wrap=True)
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["lorafit.serve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal, whose default action would end the
    # process with -15; a drained shutdown is a success, so that re-raise does nothing and serve exits 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(application, host=host, port=port, log_config=log_config, timeout_graceful_shutdown=30)


# --- report (run report and comparisons) ----------------------------------------------------------------
@app.command("report", help="(Re)write report.md, report.html, plots/ and the model card model/README.md of a run "
             "from its run directory alone.")
@cli_errors
def _report(run: Path = typer.Argument(..., help="Run directory.")) -> None:
    from .report import write_report

    typer.echo(f"wrote {write_report(run)}, {run / 'report.md'} and the model card {run / 'model' / 'README.md'}")


@app.command("compare", help="One table and overlaid validation curves for several runs (ablations).")
@cli_errors
def _compare(
    runs: list[Path] = typer.Argument(..., help="Run directories."),
    out: Path = typer.Option(Path("runs/compare"), "--out", help="Directory for compare.md/.html/.csv and plots."),
) -> None:
    from .report import compare

    if len(runs) < 2:
        raise LorafitError("compare needs at least two run directories")
    typer.echo(f"wrote {compare(runs, out)}, {out / 'compare.md'} and {out / 'compare.csv'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
