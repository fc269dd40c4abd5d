"""The `lorafit` command line (Typer + Rich). Every `train` option is generated from a Config field, so a flag
and a YAML key can never drift apart: `--lora-r 8` is `model.lora_r: 8`."""

from __future__ import annotations

import functools
import inspect
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console

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
            err.print(f"[bold red]{'error' if code == 2 else 'stopped'}:[/] {exc}", highlight=False, soft_wrap=True)
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
    return f"{text} (default: {shown})"


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
    from .train import train

    train(cfg)


_train.__signature__ = _train_signature()
app.command(
    "train",
    help="Fine-tune, evaluate on the test split and write a run directory. With no arguments: the embedded "
    "MiniLM with LoRA on the bundled AG News sample.",
)(_train)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
