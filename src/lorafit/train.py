"""The training recipe: one readable loop from config to run directory.

Accelerate handles the device, mixed precision and multi-process runs (`accelerate launch -m lorafit.cli
train ...`); the loop itself is plain PyTorch so a reader sees every step.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import Config
from .data import (
    Collator, DataBundle, Encoded, EncodedDataset, LengthGroupedBatches, encode, filter_by_length, load_data,
)
from .errors import Interrupted, LorafitError
from .evaluate import better, compute_metrics, predict_logits, scalar_metrics, softmax
from .fileio import atomic_write_json, atomic_write_text
from .frozen import calibrate_int8, frozen_linears, int8_available
from .model import load_trainable_state_dict, load_tokenizer, prepare_model, save_weights, trainable_state_dict
from .rundir import MetricsLog, RunRecord, new_run_dir

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class Run:
    """What `lorafit.train` returns: where the run lives and what it measured."""

    path: Path
    config: Config
    test_metrics: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)

    def load(self):
        from .predict import load

        return load(self.path)


# --- devices and precision -----------------------------------------------------------------------------
def cpu_supports_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run several times faster than fp32. Without them bf16 is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(device: str) -> str:
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LorafitError("train.device: cuda requested but no CUDA GPU is visible; use --device auto or cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LorafitError("train.device: mps requested but Apple MPS is not available; use --device auto or cpu")
    return device


def resolve_precision(precision: str, device: str) -> str:
    if precision != "auto":
        if precision == "fp16" and device == "cpu":
            raise LorafitError("train.precision: fp16 needs a GPU; use bf16 or fp32 on the CPU")
        return precision
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device == "cpu":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return "fp32"  # MPS autocast covers few ops; fp32 is the safe default there


def make_accelerator(cfg: Config):
    from accelerate import Accelerator

    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    if device == "cpu":
        torch.set_num_threads(cfg.train.num_threads or os.cpu_count() or 1)
    # Accelerate keeps one global state per process; a second run in the same process (a notebook, a sweep)
    # with another precision would be refused, so each run starts from a fresh state (process group kept)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        cpu=device == "cpu", mixed_precision=PRECISIONS[precision],
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
    )
    return accelerator, precision


def frozen_mode(cfg: Config, precision: str, device: str) -> Optional[str]:
    """How the frozen Linear weights compute in training steps (see frozen.py): in the autocast dtype, in int8
    for fp32 training on an x86 CPU (train.int8_frozen_weights), or as they are."""
    if precision in ("bf16", "fp16"):
        return precision
    if precision == "fp32" and device == "cpu" and cfg.train.int8_frozen_weights and int8_available():
        return "int8"
    return None


def training_attention(device: torch.device):
    """On the CPU, train with SDPA's math kernel: the fused flash kernel's backward is several times slower
    for short texts (a profiled step: 28% of it, against 9% for math). GPUs keep their fused kernels."""
    if device.type != "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


# --- data preparation ----------------------------------------------------------------------------------
def length_stats(lengths: np.ndarray, max_length: int) -> dict[str, Any]:
    if len(lengths) == 0:
        return {}
    width = 8
    top = int(lengths.max())
    counts = np.bincount(lengths // width, minlength=top // width + 1)
    return {
        "mean": float(lengths.mean()), "p50": float(np.percentile(lengths, 50)), "p95": float(np.percentile(lengths, 95)),
        "max": top, "truncated": int((lengths > max_length).sum()), "max_length": max_length,
        "histogram": {"bin_width": width, "counts": counts.tolist()},
    }


def encode_splits(bundle: DataBundle, tokenizer, cfg: Config) -> dict[str, Encoded]:
    encoded = {}
    dropped = {}
    for name in ("train", "validation", "test"):
        split = getattr(bundle, name)
        enc = encode(tokenizer, split.texts, cfg.data.max_length, split.labels)
        bundle.summary.setdefault("token_lengths", {})[name] = length_stats(enc.full_lengths, cfg.data.max_length)
        if name != "test":  # the test set is what it is: filtering it would flatter the score
            enc, split, n = filter_by_length(enc, split, cfg.data.min_tokens, cfg.data.max_tokens)
            setattr(bundle, name, split)
            if n:
                dropped[name] = n
        encoded[name] = enc
    if cfg.data.min_tokens or cfg.data.max_tokens:
        bundle.summary["dropped_by_length"] = dropped
    if len(encoded["train"]) == 0:
        raise LorafitError("no training rows left after length filtering; loosen --min-tokens/--max-tokens")
    bundle.summary["sizes"] = {k: len(v) for k, v in encoded.items()}
    return encoded


# --- the recipe ----------------------------------------------------------------------------------------
# Options that may change when resuming: they do not alter the data, the model or the optimizer.
RESUMABLE_OVERRIDES = {"epochs", "max_steps", "time_budget_minutes", "eval_every", "log_every", "checkpoint_every",
                       "keep_checkpoints", "early_stopping_patience", "num_threads", "device", "eval_batch_size"}


def train(config: Union[Config, dict, str, Path, None] = None, *, console=None, **overrides) -> Run:
    """Fine-tune, evaluate and save a classifier; return the Run. `config` is a Config, a dict or a YAML path."""
    cfg = _as_config(config).with_overrides(overrides) if overrides else _as_config(config)
    return _run(cfg, console=console)


def resume(run_dir: Union[str, Path], *, console=None, **overrides) -> Run:
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
    return _run(cfg, console=console, run_dir=run_dir, resume_from=checkpoints[-1])


def _run(cfg: Config, console=None, run_dir: Optional[Path] = None, resume_from: Optional[Path] = None) -> Run:
    accelerator, precision = make_accelerator(cfg)
    main = accelerator.is_main_process
    console = console or _console(main)
    t_start = time.time()

    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    bundle = load_data(cfg.data, cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model.model, cfg.model.trust_remote_code)
    encoded = encode_splits(bundle, tokenizer, cfg)
    set_seed(cfg.train.seed)  # the head's initialisation does not depend on how much data loading drew
    model, minfo = prepare_model(cfg.model, len(bundle.label_names), bundle.label_names)
    frozen = frozen_mode(cfg, precision, accelerator.device.type)

    if resume_from is None and main:
        run_dir = new_run_dir(cfg)
    record = (RunRecord.start(run_dir) if resume_from is None else RunRecord.reopen(run_dir)) if main else None
    try:
        if main and resume_from is None:
            cfg.to_yaml(run_dir / "config.yaml")
            atomic_write_json(run_dir / "labels.json", bundle.label_names)
            atomic_write_json(run_dir / "data.json", bundle.summary)
            atomic_write_json(run_dir / "splits.json", {
                k: getattr(bundle, k).source_rows.tolist() for k in ("train", "validation", "test")})
            tokenizer.save_pretrained(run_dir / "tokenizer")
            record.update(precision=precision, frozen_weights=frozen or "fp32", device=str(accelerator.device),
                          model=minfo.as_dict(), data_sizes=bundle.summary["sizes"])
        if main and resume_from is not None:
            _check_same_splits(run_dir, bundle)
        if main:
            console.print(
                f"[bold]lorafit[/] {cfg.model.method} on {cfg.model.model}: trainable {minfo.trainable:,} / total "
                f"{minfo.total:,} ({minfo.percent:.2f}%), budget "
                f"{'none' if cfg.model.param_budget is None else f'{cfg.model.param_budget:,}'}; "
                f"device {accelerator.device}, precision {precision}"
                + (f" (frozen weights {frozen})" if frozen == "int8" else "") + "; "
                f"train/validation/test {len(encoded['train'])}/{len(encoded['validation'])}/{len(encoded['test'])}"
                + (f"; resuming from {resume_from.name}" if resume_from is not None else "")
            )
        with frozen_linears(model, frozen):
            result = _fit(cfg, model, tokenizer, encoded, bundle.label_names, accelerator, console, run_dir, record,
                          resume_from)
        info = {"wall_time_s": round(time.time() - t_start, 2), **result["info"]}
        if main:
            save_weights(accelerator.unwrap_model(model), cfg.model, run_dir / "model")
            atomic_write_json(run_dir / "test_metrics.json", result["test_metrics"])
            _write_test_predictions(run_dir / "test_predictions.csv", bundle, result["test_logits"])
            record.update(status="completed", finished_at=_now(), **info)
            _report_if_available(run_dir, console)
            t = result["test_metrics"]
            if info["stop_reason"] != "completed":
                best = info.get(f"best_validation_{cfg.train.metric_for_best}")
                console.print(f"stopped early ({info['stop_reason']}) at step {info['steps']}; best validation "
                              f"{cfg.train.metric_for_best} {best:.4f} at step {info['best_step']}, restored")
            console.print(
                f"[bold green]test accuracy {t['accuracy']:.4f}[/]  macro F1 {t['f1_macro']:.4f}  "
                f"loss {t['loss']:.4f}  ({info['train_samples_per_s']:.1f} samples/s, wall {info['wall_time_s']:.0f}s)  "
                f"-> {run_dir}"
            )
        return Run(run_dir, cfg, result["test_metrics"], info)
    except (KeyboardInterrupt, Interrupted):
        if main:
            record.update(status="interrupted", finished_at=_now())
        raise
    except BaseException as exc:
        if main:
            record.update(status="failed", finished_at=_now(), error=f"{type(exc).__name__}: {exc}"[:2000])
        raise


def _check_same_splits(run_dir: Path, bundle: DataBundle) -> None:
    recorded = json.loads((run_dir / "splits.json").read_text(encoding="utf-8"))
    for name in ("train", "validation", "test"):
        if recorded[name] != getattr(bundle, name).source_rows.tolist():
            raise LorafitError(f"{run_dir}: the {name} split differs from the recorded one (splits.json); "
                               "the data changed since the run started, so it cannot be resumed")


class _StopSignals:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step and stops cleanly."""

    def __init__(self):
        self.received: Optional[str] = None
        self._old: dict = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal

        if self.received:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _fit(cfg: Config, model, tokenizer, encoded, label_names, accelerator, console, run_dir, record,
         resume_from: Optional[Path] = None) -> dict[str, Any]:
    from .checkpoint import load_checkpoint, save_checkpoint

    t = cfg.train
    main = accelerator.is_main_process
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_enc = encoded["train"]
    sampler = LengthGroupedBatches([len(x) for x in train_enc.input_ids], t.batch_size, t.seed, t.group_by_length)
    # the loader gets its own generator so creating an iterator never draws from the global RNG (exact resume)
    loader = torch.utils.data.DataLoader(EncodedDataset(train_enc), batch_sampler=sampler,
                                         collate_fn=Collator(pad_id, t.pad_to_multiple_of),
                                         generator=torch.Generator().manual_seed(t.seed))

    steps_per_epoch = math.ceil(len(sampler) / t.grad_accum_steps)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    warmup = t.warmup_steps if t.warmup_steps is not None else int(round(t.warmup_ratio * total_steps))
    # the fused kernel updates all parameters in one pass instead of a dozen ops per parameter tensor
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=t.learning_rate, weight_decay=t.weight_decay,
                                  fused=accelerator.device.type in ("cpu", "cuda"))
    from transformers import get_scheduler

    scheduler = get_scheduler("constant_with_warmup" if t.scheduler == "constant" else t.scheduler,
                              optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    trainable = [p for p in model.parameters() if p.requires_grad]
    prefix, prefix_time = _frozen_prefix(cfg, model, encoded, pad_id, accelerator, console)
    # before a checkpoint is restored: the adapters are still zero, so a resumed run quantises the same way
    _calibrate_int8(accelerator.unwrap_model(model), encoded["train"], prefix, pad_id, accelerator.device)

    # everything the loop carries from step to step; a checkpoint saves it, a resume restores it
    st: dict[str, Any] = dict(epoch=0, batches_done=0, best_value=None, best_step=0, bad_evals=0, samples=0,
                              real_tokens=0, padded_tokens=0, train_time=0.0, loss_sum=0.0, loss_count=0)
    best_state, step = None, 0
    if resume_from is not None:
        restored, best_state = load_checkpoint(resume_from, accelerator.unwrap_model(model), optimizer, scheduler,
                                               accelerator.scaler)
        st.update({k: restored[k] for k in st})
        step = restored["step"]
        if main:
            _truncate_metrics(run_dir / "metrics.jsonl", restored["step"])
    log = MetricsLog(run_dir / "metrics.jsonl") if main else None
    evaluate = lambda split: _evaluate(model, encoded[split], label_names, t.eval_batch_size, pad_id, accelerator,  # noqa: E731
                                       prefix, split)
    # the budget covers what train_time_s counts: the steps and the training rows' prefix computation
    deadline = (time.time() + t.time_budget_minutes * 60 - st["train_time"] - prefix_time.get("train", 0.0)
                if t.time_budget_minutes else None)
    stop_reason = "completed"
    loss_sum = torch.tensor(st["loss_sum"], device=accelerator.device)
    progress = _progress(console, main, total_steps)
    kill_after = int(os.environ.get("LORAFIT_TEST_KILL_AFTER_STEP", "0"))  # crash-test hook: SIGKILL self

    def epoch_position() -> float:
        return round(st["epoch"] + min(1.0, st["batches_done"] / max(len(sampler), 1)), 4)

    def run_eval() -> bool:
        """Evaluate on validation, keep the best state; return True when early stopping says stop."""
        nonlocal best_state
        m = evaluate("validation")
        improved = better(t.metric_for_best, m[t.metric_for_best], st["best_value"])
        if improved:
            st.update(best_value=m[t.metric_for_best], best_step=step, bad_evals=0)
            best_state = trainable_state_dict(accelerator.unwrap_model(model))
        else:
            st["bad_evals"] += 1
        if main:
            log.write(type="eval", split="validation", step=step, epoch=epoch_position(), **scalar_metrics(m),
                      per_class=m["per_class"], confusion_matrix=m["confusion_matrix"], best=improved)
            progress.console.print(
                f"step {step} epoch {epoch_position():.2f}: validation accuracy {m['accuracy']:.4f} "
                f"macro F1 {m['f1_macro']:.4f} loss {m['loss']:.4f}{'  (best)' if improved else ''}"
            )
        return t.early_stopping_patience is not None and st["bad_evals"] >= t.early_stopping_patience

    def checkpoint() -> None:
        if main:
            st["loss_sum"] = float(loss_sum)
            save_checkpoint(run_dir, step, accelerator.unwrap_model(model), optimizer, scheduler, accelerator.scaler,
                            dict(st), best_state, t.keep_checkpoints)

    model.train()
    with progress, _StopSignals() as signals:
        task = progress.add_task("train", total=total_steps, info="", completed=step)
        while step < total_steps and stop_reason == "completed":
            sampler.set_epoch(st["epoch"])
            batches = accelerator.skip_first_batches(loader, st["batches_done"]) if st["batches_done"] else loader
            t0 = time.time()
            for batch in batches:
                with accelerator.accumulate(model), training_attention(accelerator.device):
                    if prefix is not None:
                        logits = prefix.logits(model, batch, "train", accelerator.device)
                    else:
                        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    loss = F.cross_entropy(logits.float(), batch["labels"], label_smoothing=t.label_smoothing)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and t.max_grad_norm:
                        accelerator.clip_grad_norm_(trainable, t.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                st["loss_count"] += 1
                st["batches_done"] += 1
                st["samples"] += len(batch["labels"])
                st["real_tokens"] += int(batch["attention_mask"].sum())
                st["padded_tokens"] += batch["attention_mask"].numel()
                if not accelerator.sync_gradients:
                    continue
                step += 1
                if step % t.log_every == 0 or step == total_steps:
                    st["train_time"] += time.time() - t0
                    t0 = time.time()
                    mean_loss = (loss_sum / st["loss_count"]).item()
                    if not math.isfinite(mean_loss):
                        last = _latest_checkpoint_note(run_dir)
                        raise LorafitError(f"training loss became {mean_loss} at step {step}; {last}lower "
                                           "--learning-rate or use --precision fp32 and train again")
                    lr = scheduler.get_last_lr()[0]
                    sps = st["samples"] * accelerator.num_processes / max(st["train_time"], 1e-9)
                    if main:
                        log.write(type="train", step=step, epoch=epoch_position(), loss=mean_loss, lr=lr,
                                  samples_per_s=round(sps, 2))
                    progress.update(task, completed=step, info=f"loss {mean_loss:.4f}  lr {lr:.2e}  {sps:.1f} samples/s")
                    loss_sum.zero_()
                    st["loss_count"] = 0
                if t.eval_every and step % t.eval_every == 0:
                    st["train_time"] += time.time() - t0
                    if run_eval():
                        stop_reason = "early_stopping"
                    t0 = time.time()
                if deadline and time.time() > deadline and stop_reason == "completed":
                    stop_reason = "time_budget"
                if t.checkpoint_every and step % t.checkpoint_every == 0 and st["batches_done"] < len(sampler):
                    st["train_time"] += time.time() - t0
                    checkpoint()
                    t0 = time.time()
                if signals.received:
                    st["train_time"] += time.time() - t0
                    checkpoint()
                    raise Interrupted(f"{signals.received} at step {step}; checkpoint saved; resume with: "
                                      f"lorafit train --resume {run_dir}")
                if kill_after and step == kill_after:
                    os.kill(os.getpid(), 9)
                if step >= total_steps or stop_reason != "completed":
                    break
            st["train_time"] += time.time() - t0
            progress.update(task, completed=step)
            epoch_done = st["batches_done"] >= len(sampler)
            if not (t.eval_every and step % t.eval_every == 0):  # not just evaluated at this very step
                if run_eval() and stop_reason == "completed":
                    stop_reason = "early_stopping"
            if epoch_done:
                st["epoch"] += 1
                st["batches_done"] = 0
            if step < total_steps and stop_reason == "completed":
                checkpoint()

    unwrapped = accelerator.unwrap_model(model)
    if best_state is not None:
        load_trainable_state_dict(unwrapped, best_state)
    test_metrics = evaluate("test")
    test_logits = test_metrics.pop("_logits")
    if main:
        log.write(type="eval", split="test", step=step, epoch=round(step / steps_per_epoch, 4), **scalar_metrics(test_metrics),
                  per_class=test_metrics["per_class"], confusion_matrix=test_metrics["confusion_matrix"])
        log.close()
    train_prefix_s = prefix_time.get("train", 0.0)
    info = {
        "steps": step, "epochs_completed": round(step / steps_per_epoch, 4), "stop_reason": stop_reason,
        "best_step": st["best_step"], f"best_validation_{t.metric_for_best}": st["best_value"],
        "train_samples": st["samples"] * accelerator.num_processes,
        # the train split's one-off prefix computation is part of training's cost, so it counts in the throughput;
        # the validation and test splits' is evaluation work, which is not counted (nor is it for the peer)
        "train_time_s": round(st["train_time"] + train_prefix_s, 2), "prefix_cache_s": round(sum(prefix_time.values()), 2),
        "prefix_cache_train_s": round(train_prefix_s, 2), "prefix_cache_from_layer": prefix.k if prefix is not None else None,
        "train_samples_per_s": round(st["samples"] * accelerator.num_processes / max(st["train_time"] + train_prefix_s, 1e-9), 2),
        "padding_efficiency": round(st["real_tokens"] / max(st["padded_tokens"], 1), 4),
        "resumed": resume_from is not None,
    }
    return {"test_metrics": test_metrics, "test_logits": test_logits, "info": info}


def _latest_checkpoint_note(run_dir) -> str:
    from .checkpoint import list_checkpoints

    found = list_checkpoints(run_dir) if run_dir else []
    return f"the last good checkpoint is {found[-1]}; " if found else ""


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint: the resumed run logs those steps again."""
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


def _frozen_prefix(cfg: Config, model, encoded, pad_id, accelerator, console):
    """Cache the frozen lower layers' output for every split when only top layers train (see prefix_cache)."""
    from .prefix_cache import FrozenPrefix

    if not cfg.train.cache_frozen_prefix:
        return None, {}
    dtype = torch.float32 if accelerator.mixed_precision == "no" else torch.bfloat16
    prefix = FrozenPrefix.maybe(accelerator.unwrap_model(model), dtype)
    if prefix is None:
        return None, {}
    elapsed = {}
    for split, enc in encoded.items():
        t0 = time.time()
        prefix.compute(split, enc, cfg.train.eval_batch_size, pad_id, accelerator.device, accelerator.autocast)
        elapsed[split] = time.time() - t0
    console.print(f"cached the frozen embeddings + layers 0..{prefix.k - 1} for {sum(map(len, encoded.values()))} "
                  f"texts in {sum(elapsed.values()):.1f}s; each step now runs layers {prefix.k}+ only")
    return prefix, elapsed


def _calibrate_int8(model, enc: Encoded, prefix, pad_id, device, rows: int = 64) -> None:
    """Quantise the int8 frozen weights (frozen.py) with activation ranges from the first training rows."""
    n = min(rows, len(enc))
    sample = Encoded(enc.input_ids[:n], enc.labels[:n], enc.full_lengths[:n])  # rows 0..n-1: the cache's too
    forward = (lambda batch: prefix.logits(model, batch, "train", device)) if prefix is not None else None
    calibrate_int8(model, lambda: predict_logits(model, sample, n, pad_id, device, forward=forward))


def _evaluate(model, enc: Encoded, label_names, batch_size, pad_id, accelerator, prefix=None, split=None) -> dict[str, Any]:
    forward = (lambda batch: prefix.logits(model, batch, split, accelerator.device)) if prefix is not None else None
    logits = predict_logits(accelerator.unwrap_model(model), enc, batch_size, pad_id, accelerator.device,
                            autocast=accelerator.autocast, forward=forward)
    metrics = compute_metrics(enc.labels, logits, label_names)
    metrics["_logits"] = logits
    return metrics


def _param_groups(model, cfg: Config) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm; the head may get its own learning rate."""
    head_lr = cfg.train.head_learning_rate or cfg.train.learning_rate
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "norm" in name.lower()
        is_head = "modules_to_save" in name or name.split(".")[0] in ("classifier", "pre_classifier", "score")
        groups.setdefault((no_decay, is_head), []).append(p)
    return [
        {"params": ps, "weight_decay": 0.0 if no_decay else cfg.train.weight_decay,
         "lr": head_lr if is_head else cfg.train.learning_rate}
        for (no_decay, is_head), ps in groups.items()
    ]


def _write_test_predictions(path: Path, bundle: DataBundle, logits: np.ndarray) -> None:
    probs = softmax(logits)
    names = bundle.label_names
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["row", "text", "label", "predicted"] + [f"prob_{n}" for n in names])
    for i, text in enumerate(bundle.test.texts):
        writer.writerow([int(bundle.test.source_rows[i]), text, names[bundle.test.labels[i]], names[int(probs[i].argmax())]]
                        + [f"{p:.6f}" for p in probs[i]])
    atomic_write_text(path, buf.getvalue())


def _report_if_available(run_dir: Path, console) -> None:
    """The report is a bonus on top of the run: a failure to draw is a warning, never a failed run."""
    try:
        from . import report
    except ImportError:
        return
    try:
        report.write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - plotting must never break a finished run
        console.print(f"[yellow]warning: the report could not be written ({type(exc).__name__}: {exc}); "
                      f"results are intact; retry with: lorafit report {run_dir}[/]")


def _as_config(config) -> Config:
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return Config.from_dict(config)
    return Config.from_yaml(config)


def _console(main: bool):
    from rich.console import Console

    return Console(quiet=not main, stderr=False)


def _progress(console, main: bool, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"), console=console, disable=not main, transient=False,
    )


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")
