"""The command line as a newcomer reads it: every --help at 80 columns, whole; one grammar across commands."""

import re
import typing

import pytest
from typer.testing import CliRunner

from lorafit.cli import app, metavar, option_help
from lorafit.config import SECTIONS, InferenceConfig, ServeConfig

COMMANDS = ["train", "search", "distill", "classify", "predict", "evaluate", "merge", "export", "push", "serve",
            "report", "compare"]


def help_of(*args: str, columns: int = 80) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.output


def flat(text: str) -> str:
    return " ".join(text.split())


def command_params(name: str):
    import typer.main

    return typer.main.get_command(app).commands[name].params


@pytest.mark.parametrize("name", ["", *COMMANDS])
def test_help_fits_80_columns_and_cuts_nothing(name):
    text = help_of(*([name] if name else []))
    too_wide = [line for line in text.splitlines() if len(line) > 80]
    assert not too_wide, too_wide
    # "..." only where it means "more of these" (A,B,..., [ARGS]..., TEXTS...), never where something was cut
    assert "…" not in text and "..." not in re.sub(r"(A,B,|\]|\],|\})\.\.\.", "", text)
    if not name:
        for command in COMMANDS:
            assert f"  {command} " in text
        return
    whole = flat(text)
    for param in command_params(name):
        if param.hidden:
            continue
        for opt in (*param.opts, *param.secondary_opts):
            if opt.startswith("-"):
                assert opt in text, f"{name}: {opt} missing or cut"
        if param.help:
            assert flat(param.help) in whole, f"{name} {param.name}: help cut or changed: {param.help!r}"


def test_each_option_shows_one_default_and_a_placeholder_that_matches():
    text = flat(help_of("train"))
    for section in SECTIONS.values():
        for name, field in section.model_fields.items():
            shown = flat(option_help(field))
            assert shown in text
            assert shown.lower().count("default") <= 1, f"{name}: two defaults: {shown}"
    # what the option takes: a float or a word, a list of choices, a plain switch without a placeholder
    assert "--cache-max-gb auto|FLOAT" in text
    assert "--report-to [tensorboard|wandb|mlflow|none],..." in text
    assert "--precision [auto|fp32|bf16|fp16]" in text
    assert "--group-by-length / --no-group-by-length Batch" in text  # no <bool> placeholder
    assert "<bool>" not in text


def test_a_wider_terminal_shows_the_same_help_in_fewer_lines():
    narrow, wide = help_of("train", columns=80), help_of("train", columns=200)
    assert flat(narrow) == flat(wide) or len(wide.splitlines()) <= len(narrow.splitlines())


def _option(command: str, name: str):
    return next(p for p in command_params(command) if p.name == name)


def test_one_grammar_across_commands():
    # what a command reads is -i/--input, what it writes -o/--output
    for command in ("predict", "evaluate"):
        assert _option(command, "input").opts == ["-i", "--input"]
    for command in ("predict", "evaluate", "merge", "compare"):
        assert _option(command, "output").opts == ["-o", "--output"]
    # the config file is positional wherever a command takes one
    for command in ("train", "search", "distill"):
        assert _option(command, "config").param_type_name == "argument"
    # the inference options have the same name, placeholder and help everywhere they appear
    for name in InferenceConfig.model_fields:
        seen = {c: _option(c, name) for c in ("classify", "predict", "evaluate", "serve")}
        shapes = {(tuple(p.opts), p.metavar) for p in seen.values()}
        assert len(shapes) == 1, (name, shapes)
        for command, param in seen.items():
            model = ServeConfig if command == "serve" else InferenceConfig
            assert param.help == option_help(model.model_fields[name])
    field = InferenceConfig.model_fields["precision"]
    assert metavar("precision", field.annotation) == "[auto|fp32|bf16]"
    assert typing.get_args(field.annotation) == ("auto", "fp32", "bf16")


def test_version():
    from lorafit import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"lorafit {__version__}"


def test_a_config_beside_resume_is_refused_in_one_line(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  epochs: 1\n")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml"), "--resume", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "a resumed run keeps its own config" in result.output


def test_a_bad_flag_value_names_the_flag():
    result = CliRunner().invoke(app, ["classify", "runs/x", "text", "--device", "tpu"])
    assert result.exit_code == 2 and result.output.startswith("error: --device tpu: Input should be")


@pytest.mark.parametrize("width", [80, 160])
def test_the_training_progress_line_fits_the_terminal_and_a_wider_one_shows_more(width):
    from rich.console import Console

    from lorafit.console import progress_bar, progress_info

    console = Console(width=width, force_terminal=True)
    progress = progress_bar(console, main=True)
    progress.add_task("train", total=12_000, completed=11_999, epoch="10/10",
                      info=progress_info(width, 1.23456, 1.23e-4, 12345.6))
    lines = console.render_lines(progress.get_renderable(), console.options, pad=False)
    text = ["".join(segment.text for segment in line).rstrip() for line in lines]
    assert len(text) == 1 and len(text[0]) <= width and "…" not in text[0], text
    assert "loss 1.23" in text[0] and "12346/s" in text[0] or "12345.6 samples/s" in text[0]
    if width >= 110:
        assert "samples/s" in text[0] and "0:00:" in text[0].split("11999/12000")[1]


def test_the_training_header_fits_80_columns(tiny_model_dir, tmp_path):
    from rich.console import Console

    import lorafit
    from conftest import tiny_config

    console = Console(width=80, record=True)
    lorafit.train(tiny_config(tiny_model_dir("bert"), tmp_path, epochs=1, max_train_samples=64), console=console)
    printed = [line for line in console.export_text().splitlines() if not line.startswith("train epoch")]
    assert printed[0].startswith("lorafit lora on ") and "trainable" in printed[1]
    too_wide = [line for line in printed if len(line) > 80 and "/" not in line]  # a long path may wrap, nothing else
    assert not too_wide, too_wide
