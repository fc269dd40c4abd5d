"""The entry points of training: `train`, `resume` and `distill` build a config, pick the recipe's extensions from
it and run the recipe (recipe.py), which holds the loop.

Accelerate handles the device and multi-process runs (`accelerate launch -m lorafit.cli train ...`); the loop
itself is plain PyTorch so a reader sees every step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .config import Config, as_config
from .errors import LorafitError
from .extensions import Extension
from .recipe import Run, TrainingRecipe

# Options that may change when resuming: they do not alter the data, the model or the optimizer.
RESUMABLE_OVERRIDES = {"epochs", "max_steps", "time_budget_minutes", "eval_every", "log_every", "checkpoint_every",
                       "keep_checkpoints", "early_stopping_patience", "num_threads", "device", "eval_batch_size",
                       "report_to", "wandb_project", "wandb_entity"}


def extensions_for(cfg: Config) -> list[Extension]:
    """The features a config switches on, in the order their hooks run: distillation replaces the loss, R-Drop
    wraps it; the TF-IDF blend changes evaluations after training."""
    extensions: list[Extension] = []
    if cfg.distill is not None:
        from .distill import Distillation

        extensions.append(Distillation())
    if cfg.train.rdrop_alpha:
        from .rdrop import RDrop

        extensions.append(RDrop(cfg.train.rdrop_alpha))
    if cfg.model.tfidf_weight:
        from .blend import TfidfBlend

        extensions.append(TfidfBlend(cfg.model.tfidf_weight))
    return extensions


def recipe_for(cfg: Config, **kwargs) -> TrainingRecipe:
    """The recipe for `cfg` with its extensions; kwargs as TrainingRecipe takes them (console, callbacks, reuse,
    evaluate_test)."""
    return TrainingRecipe(cfg, extensions=extensions_for(cfg), **kwargs)


def train(config: Union[Config, dict, str, Path, None] = None, *, console=None, callbacks: Sequence[Any] = (),
          reuse: Optional[dict] = None, **overrides) -> Run:
    """Fine-tune, evaluate and save a classifier; return the Run. `config` is a Config, a dict or a YAML path.
    `callbacks` and `reuse`: see recipe.TrainingRecipe."""
    cfg = as_config(config).with_overrides(overrides) if overrides else as_config(config)
    return recipe_for(cfg, console=console, callbacks=callbacks, reuse=reuse).run()


def resume(run_dir: Union[str, Path], *, console=None, callbacks: Sequence[Any] = (), **overrides) -> Run:
    """Continue an interrupted or failed run from its latest checkpoint."""
    from .checkpoint import list_checkpoints
    from .rundir import read_run

    run_dir, cfg, info = read_run(run_dir, require_completed=False)
    if info.get("status") == "completed":
        raise LorafitError(f"{run_dir}: run already completed; nothing to resume")
    fixed = sorted(set(overrides) - RESUMABLE_OVERRIDES)
    if fixed:
        raise LorafitError(f"--resume: {', '.join(fixed)} cannot change in a resumed run (only "
                           f"{', '.join(sorted(RESUMABLE_OVERRIDES))}); start a new run instead")
    if overrides:
        cfg = cfg.with_overrides(overrides)
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise LorafitError(f"{run_dir}: no checkpoint to resume from; start the run again with lorafit train")
    return recipe_for(cfg, console=console, callbacks=callbacks).run(run_dir=run_dir, resume_from=checkpoints[-1])


def distill(teacher_run: Union[str, Path], config: Union[Config, dict, str, Path, None] = None, *, console=None,
            **overrides) -> Run:
    """Train a student on a completed teacher run's logits (distill.py); return the student's Run. Overrides are
    leaf names as in train, plus student= (the model) and student_layers= (K)."""
    from .distill import student_config

    return train(student_config(teacher_run, config, **overrides), console=console)
