"""The `lorafit` command line (Typer). Every option of every command is generated from a field of a pydantic model
in config.py, so a flag and its YAML key, type, choices and default cannot drift between commands: `--lora-r 8` is
`model.lora_r: 8`, and `--device` is InferenceConfig.device in predict, classify, evaluate and serve alike.

One grammar: the run or config a command works on is positional, `-i/--input` is what it reads, `-o/--output`
what it writes. Help is click's plain formatter grouped by section: it wraps at the terminal's width and never
cuts a name, a choice list or a default (Rich's tables did, at 80 columns)."""

from __future__ import annotations

import functools
import inspect
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer
import typer.core
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape

from . import __version__
from .config import (
    DISTILL_FIELDS, SEARCH_FIELDS, SECTIONS, Config, DataConfig, DistillConfig, ExportConfig, InferenceConfig,
    OutputConfig, PredictConfig, PushConfig, SearchConfig, ServeConfig,
)
from .errors import LorafitError

err = Console(stderr=True)


class HelpFormatter(typer.Context.formatter_class):  # click's, as Typer carries it
    """click's formatter, wrapping at spaces only: a name such as embedded:all-MiniLM-L6-v2 or a choice list is
    never split at a hyphen or cut."""

    def write_dl(self, rows, col_max: int = 30, col_spacing: int = 2) -> None:
        import textwrap

        rows = list(rows)
        first_col = min(max((len(first) for first, _ in rows), default=0), col_max) + col_spacing
        wrapper = textwrap.TextWrapper(max(self.width - first_col - 2, 10), break_on_hyphens=False,
                                       break_long_words=False)
        for first, second in rows:
            self.write(" " * self.current_indent + first)
            if not second:
                self.write("\n")
                continue
            if len(first) <= first_col - col_spacing:
                self.write(" " * (first_col - len(first)))
            else:
                self.write("\n" + " " * (first_col + self.current_indent))
            lines = wrapper.wrap(" ".join(second.split())) or [""]
            self.write(lines[0] + "\n")
            for line in lines[1:]:
                self.write(" " * (first_col + self.current_indent) + line + "\n")


class HelpContext(typer.Context):
    formatter_class = HelpFormatter


class SectionedGroup(typer.core.TyperGroup):
    context_class = HelpContext


class SectionedCommand(typer.core.TyperCommand):
    """Plain help, the options grouped under their section (data, model, train, ...)."""

    context_class = HelpContext

    def format_options(self, ctx, formatter) -> None:
        arguments, groups = [], {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                arguments.append(record)
            else:
                groups.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(record)
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        for title in ["Options", *[t for t in groups if t != "Options"]]:
            if title in groups:
                with formatter.section(title):
                    formatter.write_dl(groups[title])


app = typer.Typer(
    cls=SectionedGroup, add_completion=False, no_args_is_help=True, rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Fine-tune pretrained encoders for text classification with LoRA, then evaluate, report, predict and serve.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lorafit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print lorafit's version and exit.")) -> None:
    """Fine-tune pretrained encoders for text classification with LoRA, then evaluate, report, predict and serve."""


def command(name: str, short_help: str, help: str):
    """A command; `short_help` is its line in `lorafit --help` (click would cut the long help to fit)."""
    return app.command(name, short_help=short_help, help=help, cls=SectionedCommand)


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


# --- options from the schema ------------------------------------------------------------------------------
def _is_list(annotation) -> bool:
    return typing.get_origin(annotation) is list or any(typing.get_origin(a) is list for a in typing.get_args(annotation))


def _is_optional(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def _literals(annotation) -> list[str]:
    """The allowed words of a Literal, also inside Optional / Union / list."""
    if typing.get_origin(annotation) is typing.Literal:
        return [str(x) for x in typing.get_args(annotation)]
    return [word for a in typing.get_args(annotation) for word in _literals(a)]


def metavar(name: str, annotation) -> str:
    """What the option takes, as a user types it: [a|b] for choices, auto|FLOAT for a word or a number, A,B,...
    for a list, FILE / DIR for paths."""
    words = _literals(annotation)
    kinds = [label for kind, label in ((int, "INT"), (float, "FLOAT"))
             if annotation is kind or kind in typing.get_args(annotation)]
    if _is_list(annotation):
        return f"[{'|'.join(words)}],..." if words else "A,B,..."
    if words:
        return "|".join(words + kinds) if kinds else f"[{'|'.join(words)}]"
    if kinds:
        return kinds[0]
    if name.endswith("_file"):
        return "FILE"
    if name.endswith("_dir") or name.endswith("_run"):
        return "DIR"
    return "TEXT"


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def option_help(field) -> str:
    """The field's description and its default, once (a description that explains its default keeps it)."""
    text = field.description or ""
    if field.is_required() or "default" in text.lower():
        return text
    return f"{text} [default: {_shown(field.default)}]"


def schema_options(model: type[BaseModel], names=None, *, panel: Optional[str] = None,
                   flags: Optional[dict[str, tuple[str, ...]]] = None) -> list[inspect.Parameter]:
    """One keyword parameter per field of `model` (or of `names`), each a typer Option named after the field
    (`--field-name`, or the names in `flags`). Values arrive as text and are validated by the model itself."""
    params = []
    for name in names or model.model_fields:
        field = model.model_fields[name]
        names_of = (flags or {}).get(name) or ("--" + name.replace("_", "-"),)
        required = field.is_required()
        if field.annotation in (bool, Optional[bool]):
            long = names_of[0]
            option = typer.Option(None, f"{long}/--no-{long[2:]}", *names_of[1:], help=option_help(field),
                                  rich_help_panel=panel, show_default=False)
            annotation = Optional[bool]
        else:
            option = typer.Option(... if required else None, *names_of, help=option_help(field), show_default=False,
                                  rich_help_panel=panel, metavar=metavar(name, field.annotation))
            annotation = str if required else Optional[str]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=option))
    return params


def parse_value(model: type[BaseModel], name: str, value: Any) -> Any:
    """A command-line string as the field takes it: lists split on commas, 'none' -> None where allowed."""
    field = model.model_fields[name]
    if isinstance(value, str):
        if value.strip().lower() in ("none", "null") and _is_optional(field.annotation):
            return None
        if _is_list(field.annotation):
            return [v.strip() for v in value.split(",") if v.strip()]
    return value


def parse_flag(name: str, value: Any) -> Any:
    """A train flag's value, for the Config section that owns `name`."""
    return parse_value(next(s for s in SECTIONS.values() if name in s.model_fields), name, value)


def build(model: type[BaseModel], flags: dict[str, Any]) -> Any:
    """The model from those of the flags that are its fields (unset ones keep their default); one line if invalid."""
    values = {k: parse_value(model, k, v) for k, v in flags.items() if k in model.model_fields and v is not None}
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise LorafitError(flag_error(exc)) from None


def flag_error(exc: ValidationError) -> str:
    """A validation error in the flags' own names: `--backend tensorrt: Input should be 'auto', ...`."""
    parts = []
    for e in exc.errors():
        name = str(e["loc"][0]) if e["loc"] else ""
        flag = f"--{name.replace('_', '-')} {e.get('input')}" if name else "command line"
        parts.append(f"{flag}: {e['msg']}")
    return "; ".join(parts)


def with_signature(params: list[inspect.Parameter]):
    """Give a command function its generated parameters (typer reads __signature__)."""

    def attach(func: Callable) -> Callable:
        func.__signature__ = inspect.Signature(params)
        return func

    return attach


def positional(name: str, annotation, help: str, required: bool = True) -> inspect.Parameter:
    default = typer.Argument(... if required else None, help=help, show_default=False, metavar=name.upper())
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation, default=default)


def keyword(name: str, annotation, option) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=option)


def config_argument(what: str = "flags override its values") -> inspect.Parameter:
    return positional("config", Optional[Path], f"YAML config (see configs/); {what}.", required=False)


def run_argument() -> inspect.Parameter:
    return positional("run", Path, "A completed run directory.")


def input_option(help: str, required: bool = True) -> inspect.Parameter:
    return keyword("input", Path if required else Optional[Path],
                   typer.Option(... if required else None, "-i", "--input", help=help, show_default=False,
                                metavar="FILE"))


def output_option(help: str, required: bool = True, metavar: str = "FILE") -> inspect.Parameter:
    return keyword("output", Path if required else Optional[Path],
                   typer.Option(... if required else None, "-o", "--output", help=help, show_default=False,
                                metavar=metavar))


def print_config_option() -> inspect.Parameter:
    return keyword("print_config", bool, typer.Option(False, "--print-config",
                                                      help="Print the resolved config as YAML and exit."))


def hidden_alias(name: str, *flags: str) -> inspect.Parameter:
    """An older spelling still accepted (e.g. --out), kept out of the help."""
    return keyword(name, Optional[Path], typer.Option(None, *flags, hidden=True))


# the text columns and pickle switch of the data section, which predict and evaluate read their files with
READ_FIELDS = ("text_column", "text_columns", "allow_pickle")


def train_options(skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """Every Config field as a flag, in its section's group."""
    params = []
    for section, model in SECTIONS.items():
        names = [n for n in model.model_fields if n not in skip]
        params += schema_options(model, names, panel=section, flags={"output_dir": ("--output-dir",)})
    return params


# --- train ----------------------------------------------------------------------------------------------
@command("train", "Fine-tune a model and write a run directory.", "Fine-tune, evaluate on the test split and write a run directory. With no arguments: the "
         "embedded MiniLM with LoRA on the bundled AG News sample.")
@cli_errors
@with_signature([
    config_argument(),
    keyword("resume", Optional[Path], typer.Option(None, "--resume", metavar="RUN", help="Continue an interrupted "
            "run directory from its last checkpoint, with its own config.yaml (flags may change how it runs).")),
    print_config_option(),
    *train_options(),
])
def _train(config: Optional[Path] = None, resume: Optional[Path] = None, print_config: bool = False, **flags):
    overrides = {k: parse_flag(k, v) for k, v in flags.items() if v is not None}
    if resume is not None:
        if config is not None:
            raise LorafitError(f"train {config} --resume {resume}: a resumed run keeps its own config "
                               f"({resume}/config.yaml); drop {config} (flags may still change how it runs)")
        from .train import resume as resume_run

        resume_run(resume, **overrides)
        return
    cfg = Config.from_yaml(config) if config else Config()
    if overrides:
        cfg = cfg.with_overrides(overrides)
    if print_config:
        typer.echo(cfg.to_yaml(), nl=False)
        return
    from .model import check_quantization

    check_quantization(cfg.model, cfg.train.device)  # before any data loads: --quantize needs bitsandbytes + CUDA
    from .train import train

    train(cfg)


# --- search: the train options fix what is not searched, plus the search section's own ---------------------
def _search_params() -> list[inspect.Parameter]:
    params = [config_argument(), print_config_option()]
    for p in train_options():
        if p.name == "time_budget_minutes":  # in a search it bounds the study, not each trial
            p = p.replace(default=typer.Option(None, "--time-budget-minutes", metavar="FLOAT", show_default=False,
                                               rich_help_panel="search", help="Stop starting trials after this many "
                                               "minutes (search.timeout_minutes; a per-trial budget goes in YAML)."))
        params.append(p)
    names = [n for n in SEARCH_FIELDS if n != "timeout_minutes"]
    params += schema_options(SearchConfig, names, panel="search", flags={"search_dir": ("-o", "--search-dir")})
    return params + [hidden_alias("out", "--out")]


@command("search", "Search hyperparameters with Optuna.", "Hyperparameter search with Optuna over the config's search: section (default: lr, batch size, "
         "accumulation, weight decay, LoRA r/alpha/dropout, target modules, layers) under the parameter budget. "
         "Running it again continues the study; workers with the same --study-name and --storage share it.")
@cli_errors
@with_signature(_search_params())
def _search(config: Optional[Path] = None, print_config: bool = False, out: Optional[Path] = None, **flags):
    from .extras import require_extra

    flags["timeout_minutes"] = flags.pop("time_budget_minutes", None)
    if out is not None and flags.get("search_dir") is None:
        flags["search_dir"] = str(out)
    overrides = {}
    for name, value in flags.items():
        if value is None:
            continue
        overrides[name] = parse_value(SearchConfig, name, value) if name in SEARCH_FIELDS else parse_flag(name, value)
    from .search import search, search_config

    cfg = search_config(Config.from_yaml(config) if config else None, **overrides)
    if print_config:
        typer.echo(cfg.to_yaml(), nl=False)
        return
    require_extra("search", "lorafit search")
    search(cfg)


# --- distill: a completed run teaches a student; the train options plus the distill section's -------------------
# the names a student is chosen by: its backbone and how many of its layers it keeps
STUDENT_FLAGS = {"model": ("--student", "--model"), "num_layers": ("--student-layers", "--num-layers")}


def _distill_params() -> list[inspect.Parameter]:
    from .distill import STUDENT_DATA_OPTIONS

    params = [positional("teacher_run", Path, "The teacher: a completed run directory."),
              config_argument("the student's model/train/output sections (default: the teacher's); its data "
                              "section is the teacher's"), print_config_option()]
    skip = tuple(n for n in SECTIONS["data"].model_fields if n not in STUDENT_DATA_OPTIONS)
    for p in train_options(skip=skip):
        if p.name in STUDENT_FLAGS:
            field = SECTIONS["model"].model_fields[p.name]
            text = {"model": "The student's backbone (default: the teacher's), e.g. embedded:all-MiniLM-L6-v2.",
                    "num_layers": "Keep only the student backbone's first K encoder layers (layer dropping, from "
                                  "its pretrained weights)."}[p.name]
            p = p.replace(default=typer.Option(None, *STUDENT_FLAGS[p.name], help=text, rich_help_panel="distill",
                                               show_default=False, metavar=metavar(p.name, field.annotation)))
        params.append(p)
    names = [n for n in DISTILL_FIELDS if n != "teacher_run"]
    return params + schema_options(DistillConfig, names, panel="distill") + [hidden_alias("config_option", "--config")]


@command("distill", "Train a smaller student on a teacher run's logits.", "Train a student run on a completed teacher run's logits (soft-label KL at a temperature + the "
         "hard labels) on the teacher's data and splits; the teacher's logits are computed once and cached in its "
         "run directory. The student may be another backbone (--student) or the first K layers of one "
         "(--student-layers).")
@cli_errors
@with_signature(_distill_params())
def _distill(teacher_run: Path, config: Optional[Path] = None, print_config: bool = False,
             config_option: Optional[Path] = None, **flags):
    from .distill import student_config
    from .train import train

    config = config or config_option
    overrides = {k: (parse_value(DistillConfig, k, v) if k in DISTILL_FIELDS else parse_flag(k, v))
                 for k, v in flags.items() if v is not None}
    cfg = student_config(teacher_run, Config.from_yaml(config) if config else None, **overrides)
    if print_config:
        typer.echo(cfg.to_yaml(), nl=False)
        return
    train(cfg)


# --- inference: classify, predict, evaluate -----------------------------------------------------------------
def inference_options(model: type[BaseModel] = InferenceConfig) -> list[inspect.Parameter]:
    """InferenceConfig's options, from `model`'s schema (ServeConfig extends InferenceConfig with its defaults)."""
    return schema_options(model, InferenceConfig.model_fields, panel="inference")


def read_options(names=READ_FIELDS) -> list[inspect.Parameter]:
    """The data section's options for reading an input file (text columns, pickles), in a group of their own."""
    return schema_options(DataConfig, names, panel="input")


def load_classifier(run: Path, flags: dict[str, Any]):
    """The run's classifier with the inference options given (device, backend, precision, batch size)."""
    from .predict import load

    return load(run, **build(InferenceConfig, flags).model_dump())


def input_data(clf, read: DataConfig) -> DataConfig:
    """How an input file is read: --text-columns, else --text-column, else the run's own text column(s)."""
    from .batch_predict import input_data_config

    return input_data_config(clf, given_text_columns(read), allow_pickle=read.allow_pickle)


def given_text_columns(read: DataConfig) -> Optional[list[str]]:
    """The input's text columns the user named (--text-columns, else --text-column), or None: the run's own."""
    return read.text_columns or ([read.text_column] if "text_column" in read.model_fields_set else None)


@command("classify", "Classify texts given on the command line.", "Classify texts given on the command line: label and class probabilities.")
@cli_errors
@with_signature([
    run_argument(),
    positional("texts", list[str], "One or more texts (quote each)."),
    keyword("as_json", bool, typer.Option(False, "--json", help="Print JSON: [{text, label, probabilities}].")),
    *inference_options(),
])
def classify(run: Path, texts: list[str], as_json: bool = False, **flags) -> None:
    import json

    clf = load_classifier(run, flags)
    probs = clf.predict_proba(texts)
    names = [str(n) for n in clf.classes_]
    rows = [{"text": t, "label": names[int(p.argmax())], "probabilities": {n: round(float(x), 6) for n, x in zip(names, p)}}
            for t, p in zip(texts, probs)]
    if as_json:
        typer.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    out = Console(highlight=False, soft_wrap=True)
    err.print(f"[dim]{run} ({clf.backend.name} on {clf.device})[/]", highlight=False)
    for row in rows:
        ranked = sorted(row["probabilities"].items(), key=lambda kv: -kv[1])
        out.print(f"[bold]{escape(row['label'])}[/] {ranked[0][1]:.3f}  {escape(row['text'][:100])}")
        out.print("  " + "  ".join(f"{escape(n)} {p:.3f}" for n, p in ranked[:8]), style="dim")


@command("predict", "Predict a file of texts, of any size, into a CSV or Parquet file.",
         "Predict a file (csv, tsv, jsonl, parquet, optionally .gz; json; txt: one text per line; pkl with "
         "--allow-pickle) into a CSV with columns ID,Label, as leaderboards expect, or a Parquet file. It streams in "
         "chunks, so memory does not grow with the file; an interrupted prediction continues where it stopped "
         "when run again. --engine ray predicts a folder or glob of files across a Ray cluster.")
@cli_errors
@with_signature([
    run_argument(),
    input_option("File of texts to classify (--engine ray: a file, folder or glob)."),
    output_option("CSV or Parquet file to write: ID,Label (and a prob_<class> column per class with "
                  "--probabilities); --engine ray: a folder of shards."),
    *read_options(),
    *schema_options(PredictConfig, ("id_column", "labels", "probabilities"), panel="output"),
    *schema_options(PredictConfig, ("chunk_rows", "on_bad_row", "resume"), panel="streaming"),
    *inference_options(),
    *schema_options(PredictConfig, ("engine", "ray_address", "workers", "gpus_per_worker", "cpus_per_worker",
                                     "shard_format"), panel="engine",
                    flags={"ray_address": ("--address", "--ray-address")}),
])
def predict_file(run: Path, input: Path, output: Path, **flags) -> None:
    read = build(DataConfig, flags)  # the input's text columns and pickle switch
    opts = build(PredictConfig, flags)
    if opts.engine == "ray":
        from .ray_predict import predict_with_ray

        inference = build(InferenceConfig, flags)
        result = predict_with_ray(run, input, output, opts, inference, text_columns=given_text_columns(read))
        err.print(f"wrote {len(result.files)} {opts.shard_format} shards to {output} from {len(result.input_files)} "
                  f"input files in {result.seconds:.0f} s (Ray, {opts.workers} workers)", highlight=False,
                  soft_wrap=True)
        return
    from .batch_predict import predict_file as predict_in_chunks

    clf = load_classifier(run, flags)
    predict_in_chunks(clf, input, output, opts, input_data(clf, read), console=err)


@command("evaluate", "Metrics, plots and errors of a run on a labelled file.", "Metrics of a run on any labelled file: the same metrics as training's test split.")
@cli_errors
@with_signature([
    run_argument(),
    input_option("Labelled file (csv, tsv, jsonl, json, parquet; pkl with --allow-pickle).", required=False),
    output_option("Evaluation directory to write: metrics.json, predictions.csv, plots/, report.md, report.html. "
                  "[default: RUN/evaluations/<input name>]", required=False, metavar="DIR"),
    *read_options((*READ_FIELDS[:2], "label_column", READ_FIELDS[2])),
    keyword("as_json", bool, typer.Option(False, "--json", help="Print the metrics as JSON.")),
    *inference_options(),
    hidden_alias("data", "--data", "-d"),
])
def evaluate_file(run: Path, input: Optional[Path] = None, output: Optional[Path] = None, as_json: bool = False,
                  data: Optional[Path] = None, **flags) -> None:
    import json

    from rich.table import Table

    from .data import labels_from, texts_from
    from .evaluate import compute_metrics
    from .predict import read_inputs
    from .report import write_evaluation
    from .rundir import evaluation_dir, read_config

    input = input or data
    if input is None:
        raise LorafitError("evaluate: give the labelled file to evaluate on with -i FILE")
    read = build(DataConfig, flags)  # the input's text columns and pickle switch
    clf = load_classifier(run, flags)
    data = input_data(clf, read)
    df = read_inputs(input, allow_pickle=data.allow_pickle)
    texts = texts_from(df, data, str(input))
    data_cfg = read_config(clf.run_dir).data
    if "label_column" in read.model_fields_set:
        data_cfg = data_cfg.model_copy(update={"label_column": read.label_column})
    names = [str(n) for n in clf.classes_]
    labels, _ = labels_from(df, data_cfg, str(input), names, fixed=True)
    logits = clf.decision_function(texts)
    metrics = {"data": str(input), "backend": clf.backend.name, **compute_metrics(labels, logits, names)}
    out_dir = output or evaluation_dir(clf.run_dir, input)
    report = write_evaluation(clf.run_dir, out_dir, str(input), range(len(texts)), texts, labels, logits,
                              {k: v for k, v in metrics.items() if k not in ("data", "backend")}, clf.backend.name)
    if as_json:
        typer.echo(json.dumps(metrics, indent=2, ensure_ascii=False))
        err.print(f"wrote {out_dir} ({report.name}: metrics, confusion matrix, mistakes)", highlight=False)
        return
    out = Console(highlight=False)
    out.print(f"[bold]{escape(str(input))}[/]: {metrics['n']} texts, accuracy {metrics['accuracy']:.4f}, macro F1 "
              f"{metrics['f1_macro']:.4f}, loss {metrics['loss']:.4f} ({clf.backend.name} on {clf.device})")
    table = Table("class", "precision", "recall", "f1", "support")
    for name, row in metrics["per_class"].items():
        table.add_row(escape(name), f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}",
                      str(row["support"]))
    out.print(table)
    out.print(f"wrote {escape(str(out_dir))}: metrics.json, predictions.csv, plots/, report.md, {report.name}",
              soft_wrap=True)


# --- merge, export, push ----------------------------------------------------------------------------------
@command("merge", "Merge the adapter into a plain Transformers model.", "Write the run's model with the adapter merged into the base, as a plain Transformers model "
         "that loads without lorafit.")
@cli_errors
@with_signature([
    run_argument(),
    output_option("Directory to write.", required=False, metavar="DIR"),
    *schema_options(OutputConfig, ("overwrite",)),
    *schema_options(InferenceConfig, ("allow_different_base",)),
    hidden_alias("out", "--out"),
])
def merge_run(run: Path, output: Optional[Path] = None, out: Optional[Path] = None, **flags) -> None:
    from .export import merge

    output = output or out
    if output is None:
        raise LorafitError("merge: give the directory to write with -o DIR")
    result = merge(run, output, overwrite=bool(flags.get("overwrite")),
                   allow_different_base=bool(flags.get("allow_different_base")))
    if result["pooling"] == "cls":
        typer.echo(f"wrote {output}: a plain Transformers model; load it with "
                   f"AutoModelForSequenceClassification.from_pretrained('{output}') (tokenizer included)")
    else:
        typer.echo(f"wrote {output}: this run uses mean pooling, which Transformers has no classification class "
                   f"for, so {output} holds the merged encoder (AutoModel.from_pretrained('{output}')) + the head "
                   f"in head.safetensors; {output}/README.md shows the 5 lines that apply it")
    if result["tfidf_weight_not_merged"] is not None:
        typer.echo(f"note: it is the encoder alone; the run's predictions also blend its TF-IDF model (weight "
                   f"{result['tfidf_weight_not_merged']:g}), which lorafit.load('{run}') applies")


@command("export", "Export the classifier for ONNX Runtime.", "Export the run's classifier to RUN/export/ for ONNX Runtime; predict and classify then use "
         "it on a CPU (--backend auto).")
@cli_errors
@with_signature([run_argument(), *schema_options(ExportConfig),
                 *schema_options(InferenceConfig, ("allow_different_base",))])
def export_run(run: Path, **flags) -> None:
    from .extras import require_extra

    opts = build(ExportConfig, flags)
    require_extra("inference", "lorafit export")
    from .export import export_onnx

    report = export_onnx(run, int8=opts.int8, opset=opts.opset, allow_different_base=bool(flags.get("allow_different_base")))
    typer.echo(f"wrote {', '.join(str(run / 'export' / f) for f in report['files'].values())}")
    check = report.get("check")
    if check:
        base = check.get("torch", {}).get("accuracy")
        typer.echo(f"checked on {check['n']} test texts of the run" + (f": torch accuracy {base:.4f}" if base is not None else ""))
        for name in report["files"]:
            row = check[name]
            acc = f", accuracy {row['accuracy']:.4f} ({row['accuracy_change_points']:+.2f} points)" if "accuracy" in row else ""
            typer.echo(f"  {name}: labels agree with torch on {100 * row['agreement']:.2f}%{acc}, "
                       f"max |logit diff| {row['max_abs_logit_diff']:.2g}")
    used = "onnx-int8" if opts.int8 else "onnx"
    typer.echo(f"predict/classify/evaluate now use {used} on a CPU by default (--backend torch|onnx|onnx-int8 to choose)")


@command("push", "Upload a run to the Hugging Face Hub.", "Upload a run's model, tokenizer, labels, config and model card to the Hugging Face Hub in one "
         "commit (nothing partial lands).")
@cli_errors
@with_signature([run_argument(), *schema_options(PushConfig)])
def push_run(run: Path, **flags) -> None:
    from .push import push

    opts = build(PushConfig, flags)
    link = push(run, opts.repo_id, private=opts.private, token=opts.token)
    typer.echo(f"pushed {run} to https://huggingface.co/{opts.repo_id}: {link}")


# --- serve (HTTP) -----------------------------------------------------------------------------------------
@command("serve", "Serve a run over HTTP with dynamic batching.", "Serve the run over HTTP with dynamic batching: POST /v1/classify, POST /predict, GET /v1/model, "
         "/healthz, /readyz, /metrics, a page at / and OpenAPI at /docs (docs/serving.md).")
@cli_errors
@with_signature([run_argument(), *inference_options(ServeConfig),
                 *schema_options(ServeConfig, [n for n in ServeConfig.model_fields if n not in InferenceConfig.model_fields],
                                 panel="serve")])
def serve_run(run: Path, **flags) -> None:
    import copy
    import os
    import signal

    from .extras import require_extra

    if flags.get("api_key") is None:
        flags["api_key"] = os.environ.get("LORAFIT_API_KEY") or None
    opts = build(ServeConfig, flags)
    require_extra("serve", "lorafit serve")
    import uvicorn

    from .serve import check_host, create_app

    application = create_app(run, opts)  # reads the run and resolves the backend: bad input fails before listening
    warning = check_host(opts.host, opts.api_key)
    if warning:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    why = " (auto: the fastest the run has here)" if opts.backend == "auto" else ""
    err.print(f"serving {run} with the {application.state.backend_name} backend on {application.state.device}{why} at http://{opts.host}:{opts.port} (page at "
              f"/, API at /docs)", highlight=False, soft_wrap=True)
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["lorafit.serve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal, whose default action would end the
    # process with -15; a drained shutdown is a success, so that re-raise does nothing and serve exits 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(application, host=opts.host, port=opts.port, log_config=log_config, timeout_graceful_shutdown=30)


# --- report (run report and comparisons) ----------------------------------------------------------------
@command("report", "(Re)write a run's report and model card.", "(Re)write report.md, report.html, plots/ and the model card model/README.md of a run from its "
         "run directory alone.")
@cli_errors
@with_signature([run_argument()])
def _report(run: Path) -> None:
    from .report import write_report

    typer.echo(f"wrote {write_report(run)}, {run / 'report.md'} and the model card {run / 'model' / 'README.md'}")


@command("compare", "Compare several runs in one table and plot.", "One table and overlaid validation curves for several runs (ablations).")
@cli_errors
@with_signature([
    positional("runs", list[Path], "Run directories (two or more)."),
    keyword("output", Path, typer.Option(Path("runs/compare"), "-o", "--output", metavar="DIR",
                                         help="Directory for compare.md/.html/.csv and plots. [default: runs/compare]",
                                         show_default=False)),
    hidden_alias("out", "--out"),
])
def _compare(runs: list[Path], output: Path = Path("runs/compare"), out: Optional[Path] = None) -> None:
    from .report import compare

    output = out or output
    if len(runs) < 2:
        raise LorafitError("compare needs at least two run directories")
    typer.echo(f"wrote {compare(runs, output)}, {output / 'compare.md'} and {output / 'compare.csv'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
