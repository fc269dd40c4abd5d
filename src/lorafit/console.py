"""What a training run prints: its header, the progress bar, the validation and result lines. Short lines, one fact
each, so that an 80-column terminal shows them without wrapping; a wider terminal gets the long forms."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

# below this many columns the bar is short, the elapsed time is left out and the figures are terse, so the
# whole line fits 80 columns; a wider terminal shows the long forms
WIDE_CONSOLE = 110


def make_console(main: bool):
    """The run's console: quiet on every process but the main one."""
    from rich.console import Console

    return Console(quiet=not main, stderr=False)


def header_lines(cfg, info, device, num_processes: int, precision: str, frozen: Optional[str],
                 sizes: dict[str, int], resumed_from=None) -> str:
    budget = "none" if cfg.model.param_budget is None else f"{cfg.model.param_budget:,}"
    processes = f" x {num_processes}" if num_processes > 1 else ""
    lines = [
        f"[bold]lorafit[/] {cfg.model.method} on {cfg.model.model}",
        f"  trainable {info.trainable:,} of {info.total:,} ({info.percent:.2f}%), budget {budget}",
        f"  device {device}{processes}, precision {precision}" + (f" (frozen weights {frozen})" if frozen == "int8" else ""),
        f"  rows: train {sizes['train']}, validation {sizes['validation']}, test {sizes['test']}",
    ]
    if resumed_from is not None:
        lines.append(f"  resuming from {resumed_from.name}")
    return "\n".join(lines)


def validation_line(step: int, epoch: float, m: dict[str, Any], improved: bool) -> str:
    return (f"step {step} epoch {epoch:.2f}  validation: accuracy {m['accuracy']:.4f} F1 {m['f1_macro']:.4f} "
            f"loss {m['loss']:.4f}{' best' if improved else ''}")


def result_lines(info: dict[str, Any], test: dict[str, Any], metric: str, kept_last: bool, run_dir,
                 report: Optional[Path]) -> str:
    """The run's closing lines; `report`: the report.html this run wrote, or None."""
    lines = []
    if info["stop_reason"] != "completed":
        best = info.get(f"best_validation_{metric}")
        lines.append(f"stopped early ({info['stop_reason']}) at step {info['steps']}; best validation {metric} "
                     f"{best:.4f} at step {info['best_step']}, restored" if best is not None
                     else f"stopped early ({info['stop_reason']}) at step {info['steps']}")
    if kept_last:
        lines.append("no validation split: kept the last epoch's weights")
    lines.append(f"[bold green]test accuracy {test['accuracy']:.4f}[/]  macro F1 {test['f1_macro']:.4f}  "
                 f"loss {test['loss']:.4f}" if test else "no test evaluation")
    lines.append(f"{info['train_samples_per_s']:.1f} samples/s, wall {info['wall_time_s']:.0f}s, run: {run_dir}"
                 + (f"\nreport: {report}" if report is not None else ""))
    return "\n".join(lines)


def progress_info(width: int, loss: float, lr: float, samples_per_s: float) -> str:
    if width < WIDE_CONSOLE:
        return f"loss {loss:.3f} lr {lr:.1e} {samples_per_s:.0f}/s"
    return f"loss {loss:.4f}  lr {lr:.2e}  {samples_per_s:.1f} samples/s"


def progress_bar(console, main: bool):
    """The training bar: epoch, bar, steps, time left and the loss / lr / samples-per-second figures, on one line
    of the terminal's width (80 columns included)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Column

    class OneLine(TextColumn):  # the last resort of a terminal narrower still: cut the figures, never wrap the bar
        def render(self, task):
            text = super().render(task)
            text.no_wrap, text.overflow = True, "ellipsis"
            return text

    wide = console.width >= WIDE_CONSOLE
    fixed = lambda: Column(no_wrap=True)  # noqa: E731
    columns = [TextColumn("[bold]train[/] epoch {task.fields[epoch]}", table_column=fixed()),
               BarColumn(bar_width=20 if wide else 10), MofNCompleteColumn(table_column=fixed()),
               *([TimeElapsedColumn(table_column=fixed())] if wide else []), TimeRemainingColumn(table_column=fixed()),
               OneLine("{task.fields[info]}", table_column=Column(ratio=1))]
    return Progress(*columns, console=console, disable=not main, transient=False)
