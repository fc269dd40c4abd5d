"""What several bench/ scripts share, written once.

- The machine: cpu_name and cpu_summary name the CPU at the head of every benchmark table; peak_rss_mib is this
  process's peak memory.
- A contender in its own process (so that its memory, threads and imports are its own): the child prints its result
  with report_result, one `RESULT {json}` line; the parent starts it and reads that line with run_child.
- A recipe to step by hand: stepping_recipe (bench/train_step.py's timings and host reads, bench/gpu.py's profile).
- Measuring and reporting: best_time (the best of a few timed calls), seed_stats (mean, std, min, max over seeds),
  run_header (date, CPU and command for a results file) and command_line.

A script run as `python bench/x.py` has bench/ first on sys.path, so `from common import ...` works without touching
sys.path; the tests load bench scripts with bench/ on sys.path too (load_bench in tests/conftest.py). A function that
is one script's own measurement stays in that script (bench/cpu_kernels.py's peak_gflops, bench/inference.py's
peer_predict); another script imports it by the script's name.

Nothing here imports torch or lorafit at module level: importing common costs nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

RESULT = "RESULT "  # how a child's result line starts


# --- the machine ---------------------------------------------------------------------------------------------
def cpu_name() -> str:
    """The CPU's model name (e.g. 'AMD EPYC 7B13'), for benchmark headers."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def cpu_summary() -> str:
    """One line naming the CPU and what lorafit can use on it; benchmark headers print it."""
    import torch

    from lorafit.frozen import int8_available
    from lorafit.runtime import cpu_supports_bf16

    return (f"{cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, {torch.get_num_threads()} threads, CPU "
            f"capability {torch.backends.cpu.get_cpu_capability()}, bf16 units: {cpu_supports_bf16()}, "
            f"fbgemm int8: {int8_available()}")


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- a contender in its own process --------------------------------------------------------------------------
def report_result(result: dict) -> None:
    """In the child process: print `result` as the one line run_child reads."""
    print(RESULT + json.dumps(result), flush=True)


def run_child(cmd: list[str]) -> tuple[Optional[dict], str]:
    """Run `cmd` (a bench script in its worker mode) to its end in a fresh process. Returns (the dict it reported
    with report_result, "") or, when it failed or reported nothing, (None, the last 3,000 characters of its stderr,
    or of its stdout where stderr is empty)."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)), None)
    if proc.returncode != 0 or line is None:
        return None, (proc.stderr or proc.stdout)[-3000:]
    return json.loads(line[len(RESULT):]), ""


# --- a recipe to step by hand ---------------------------------------------------------------------------------
@contextlib.contextmanager
def stepping_recipe(overrides: dict) -> Iterator[tuple[Any, Iterator[dict]]]:
    """The default recipe with `overrides` (config leaf names), set up (data, model, forward pass) and in training
    mode, with gradients on: yields it and its training batches, cycled (more steps than an epoch has go round
    again; every caller sees the same batches in the same order). Its run directory goes to a temporary folder and
    no tracker is called, unless `overrides` says otherwise. Undoes the forward pass's changes on exit."""
    import tempfile

    import torch
    from rich.console import Console

    from lorafit.config import Config
    from lorafit.train import recipe_for

    with tempfile.TemporaryDirectory() as out:
        cfg = Config().with_overrides({"output_dir": out, "report_to": ["none"], **overrides})
        recipe = recipe_for(cfg, console=Console(quiet=True), evaluate_test=False)
        recipe.setup()
        try:
            recipe.model.train()
            with torch.enable_grad():
                yield recipe, itertools.cycle(list(recipe.loader))
        finally:
            recipe.cleanup.close()


# --- measuring and reporting ---------------------------------------------------------------------------------
def best_time(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Best wall time of `repeat` calls, and the last call's result: the first call also warms up (lazy init,
    allocator), for every contender alike, and the best is the one least disturbed by other processes on the
    shared cores."""
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def seed_stats(runs: list[dict], key: str) -> dict:
    """Mean, sample std (None from one seed), min and max of `key` over the seeds' runs."""
    values = [r[key] for r in runs]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def command_line() -> str:
    """This process's command as it was typed, the interpreter by its name alone."""
    return " ".join([Path(sys.executable).name, *sys.argv])


def run_header(**fields) -> dict:
    """The head of a results file: the date (UTC, to the minute), the CPU (cpu_summary), `fields`, the command."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu_summary(), **fields, "command": command_line()}
