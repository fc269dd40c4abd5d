"""The training recipe: one readable loop from config to run directory.

Accelerate handles the device, mixed precision and multi-process runs (`accelerate launch -m lorafit.cli
train ...`); the loop itself is plain PyTorch so a reader sees every step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from rich.markup import escape
from torch import nn

from .config import Config
from .data import (
    Collator, DataBundle, Encoded, EncodedDataset, LengthGroupedBatches, encode, filter_by_length, load_data,
)
from .errors import Interrupted, LorafitError, describe
from .evaluate import better, compute_metrics, predict_logits, scalar_metrics, softmax
from .fileio import atomic_write_json, atomic_write_text
from .frozen import calibrate_int8, frozen_linears, int8_available
from .model import (
    backbone_identity, check_backbone, check_quantization, is_head_parameter, load_tokenizer, load_trainable_state_dict,
    prepare_model, save_weights, trainable_state_dict,
)
from .rundir import PREDICTIONS, MetricsLog, RunRecord, new_run_dir, write_predictions
from .runtime import resolve_device, resolve_precision

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
def make_accelerator(cfg: Config, run_dir: Optional[Path] = None):
    """The Accelerator (device, process group, DDP, trackers) and lorafit's resolved precision.

    Accelerate holds its mixed precision in one process-wide state that a second Accelerator may not change
    (a notebook or a sweep training twice with other precisions), and resetting it needs private API. So the
    Accelerator always runs with mixed_precision="no" and lorafit applies the precision itself through
    torch.autocast and, for fp16, torch.amp.GradScaler (TrainingRecipe.autocast)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration

    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    if device == "cpu":
        torch.set_num_threads(cfg.train.num_threads or os.cpu_count() or 1)
    trackers = trackers_of(cfg)
    # broadcast_buffers off: the only buffers are frozen (position ids, token types) and equal on every process.
    # With the frozen-prefix cache the embeddings that own them are swapped out during the forward, and DDP's
    # per-forward buffer broadcast then fails on an empty list (`!tensors.empty() INTERNAL ASSERT FAILED`).
    # (torch 2.13 deprecates the name for forward_sync_buffers, which Accelerate's kwargs do not offer yet.)
    accelerator = Accelerator(
        cpu=device == "cpu", mixed_precision="no",
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / "tensorboard"))
        if run_dir is not None else None,
    )
    return accelerator, precision


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def trackers_of(cfg: Config) -> list[str]:
    """train.report_to without 'none'; a tracker whose package is missing is one clear line, before training."""
    import importlib.util

    chosen = [t for t in cfg.train.report_to if t != "none"]
    for tracker in chosen:
        if importlib.util.find_spec(TRACKER_PACKAGES[tracker]) is None:
            raise LorafitError(f"train.report_to: {tracker} is not installed; pip install {tracker} (or "
                               f"'lorafit[tracking]'), or drop it from --report-to")
    return chosen


WANDB_HOST = "https://api.wandb.ai"


def wandb_mode(env: Mapping[str, str], netrc_path: Optional[Union[str, Path]] = None) -> str:
    """W&B's mode for --report-to wandb: WANDB_MODE when set; else 'online' when credentials exist (WANDB_API_KEY,
    or a netrc entry for the W&B host, WANDB_BASE_URL's or api.wandb.ai, which is where `wandb login` stores the
    key); else 'offline' (logs under <run>/wandb, `wandb sync` later). netrc_path: default NETRC, else ~/.netrc."""
    import netrc
    from urllib.parse import urlparse

    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    if env.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(env.get("WANDB_BASE_URL") or WANDB_HOST).hostname  # wandb login keys its entry by host alone
    if netrc_path is None:
        netrc_path = env.get("NETRC") or Path(env.get("HOME") or Path.home()) / ".netrc"
    try:
        entry = netrc.netrc(str(netrc_path)).authenticators(host) if host else None
    except (OSError, netrc.NetrcParseError):  # no file, unreadable or malformed: no credentials to go online with
        entry = None
    return "online" if entry and entry[2] else "offline"


def tracker_init(cfg: Config, run_name: str, run_dir: Path, env: Mapping[str, str],
                 netrc_path: Optional[Union[str, Path]] = None) -> tuple[str, dict[str, dict[str, Any]]]:
    """Accelerate's init_trackers(project_name, init_kwargs=...) arguments. Accelerate passes project_name to
    wandb.init as project= (and so would override WANDB_PROJECT): with W&B among the trackers, train.wandb_project,
    else WANDB_PROJECT, else 'lorafit'; without it always 'lorafit'. The entity is passed only when set, so wandb
    reads WANDB_ENTITY itself otherwise."""
    t = cfg.train
    project = "lorafit"
    wandb = {"name": run_name, "dir": str(run_dir)}
    if "wandb" in t.report_to:
        project = t.wandb_project or env.get("WANDB_PROJECT") or project
        wandb["mode"] = wandb_mode(env, netrc_path)
        if t.wandb_entity:
            wandb["entity"] = t.wandb_entity
    return project, {"wandb": wandb, "mlflow": {"run_name": run_name}}


def flat_config(cfg: Config) -> dict[str, Any]:
    """The resolved config as section.name -> scalar, as trackers' hyperparameter tables take it."""
    out = {}
    for section, values in cfg.model_dump(mode="json").items():
        for name, value in values.items():
            out[f"{section}.{name}"] = (",".join(map(str, value)) if isinstance(value, list)
                                        else "none" if value is None else value)
    return out


def frozen_mode(cfg: Config, precision: str, device: str) -> Optional[str]:
    """How the frozen Linear weights compute in training steps (see frozen.py): in the autocast dtype, in int8
    for fp32 training on an x86 CPU (train.int8_frozen_weights), or as they are (also for a quantized base,
    whose weights bitsandbytes computes in its own kernels)."""
    if cfg.model.quantize != "none":
        return None
    if precision in ("bf16", "fp16"):
        return precision
    if precision == "fp32" and device == "cpu" and cfg.train.int8_frozen_weights and int8_available():
        return "int8"
    return None


def smaller_batch(batch_size: int, grad_accum_steps: int, processes: int = 1) -> str:
    """What to train with after running out of memory: half the batch, twice the accumulation steps."""
    half = batch_size // 2
    if half < 1:
        return "train again with a shorter --max-length or a smaller model (--batch-size is already 1)"
    before, after = batch_size * grad_accum_steps * processes, half * 2 * grad_accum_steps * processes
    same = f"the same global batch of {before}" if after == before else f"a global batch of {after} for {before}"
    return f"train again with --batch-size {half} --grad-accum-steps {2 * grad_accum_steps} ({same})"


def peak_gpu_memory_gb(device: torch.device) -> Optional[float]:
    """The most GPU memory tensors held in this process (torch.cuda.max_memory_allocated), in GB; None off CUDA."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 3)


def training_attention(device: torch.device, kernel: str = "math"):
    """On the CPU, train with SDPA's math kernel (train.cpu_attention_kernel): the fused flash kernel's backward
    is several times slower for short texts (a profiled step: 28% of it, against 9% for math). GPUs keep their
    fused kernels."""
    if device.type != "cpu" or kernel != "math":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def speed_paths(cfg: Config, precision: str, device_type: str, prefix=None) -> dict[str, Any]:
    """Which speed paths a run uses (run.json's speed_paths). A quantized base (model.quantize) gets none of those
    that rewrite the model: fast dropout swaps modules, the frozen-weight paths swap weights' .data or patch
    forwards, the prefix cache swaps the embeddings; bitsandbytes' packed weights must stay as loaded (issue 23)."""
    t = cfg.train
    quantized = cfg.model.quantize != "none"
    frozen = frozen_mode(cfg, precision, device_type)  # None for a quantized base
    fp32_cpu = precision == "fp32" and device_type == "cpu"
    return {
        "prefix_cache": prefix is not None,
        "prefix_cache_from_layer": prefix.k if prefix is not None else None,
        "frozen_weights": frozen or "fp32",
        "fused_lora": bool(t.fused_lora and fp32_cpu and cfg.model.method == "lora" and not quantized),
        "fast_dropout": bool(t.fast_dropout and device_type == "cpu" and not quantized),
        "attention_kernel": t.cpu_attention_kernel if device_type == "cpu" else "default",
        "quantized_base": cfg.model.quantize,
    }


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
        if len(split.texts) == 0:  # --validation-size 0: no validation split
            encoded[name] = Encoded([], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
            continue
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
                       "keep_checkpoints", "early_stopping_patience", "num_threads", "device", "eval_batch_size",
                       "report_to", "wandb_project", "wandb_entity"}


def train(config: Union[Config, dict, str, Path, None] = None, *, console=None, callbacks: Sequence[Any] = (),
          reuse: Optional[dict] = None, **overrides) -> Run:
    """Fine-tune, evaluate and save a classifier; return the Run. `config` is a Config, a dict or a YAML path.
    `callbacks` and `reuse`: see TrainingRecipe."""
    cfg = as_config(config).with_overrides(overrides) if overrides else as_config(config)
    return TrainingRecipe(cfg, console=console, callbacks=callbacks, reuse=reuse).run()


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
    return TrainingRecipe(cfg, console=console, callbacks=callbacks).run(run_dir=run_dir, resume_from=checkpoints[-1])


@dataclass
class LoopState:
    """Everything the loop carries from step to step; a checkpoint saves it (state.json), a resume restores it.
    Counters are this process's; the training-window sums (loss, accuracy) are saved summed over processes."""

    epoch: int = 0
    batches_done: int = 0  # global batches of the current epoch already trained
    step: int = 0  # optimizer steps
    best_value: Optional[float] = None
    best_step: int = 0
    bad_evals: int = 0  # validation evaluations since the last improvement (early stopping)
    samples: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    train_time: float = 0.0  # seconds in training steps (evaluation and checkpoints excluded)
    # the logging window: batches and rows here; the loss and correct-prediction sums live in
    # TrainingRecipe._window (a device tensor: no sync per step) and are copied here by save_checkpoint
    loss_sum: float = 0.0
    loss_count: int = 0
    correct: float = 0.0
    seen: int = 0
    stop_reason: str = "completed"

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], main: bool) -> "LoopState":
        state = cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})
        if not main:  # the window sums are global and live on the main process (see above)
            state.loss_sum, state.loss_count, state.correct, state.seen = 0.0, 0, 0.0, 0
        return state


class ProcessBatches(torch.utils.data.Sampler):
    """This process's share of each global batch, from `epoch`'s order, starting at global batch `start`.

    The global order is LengthGroupedBatches at the global batch size (per-device batch x processes); each global
    batch is cut in contiguous parts, one per process, so 1 process at batch 8 and 2 at batch 4 train on the same
    rows per step. Hand-written instead of Accelerate's prepared loader, which sets the epoch itself from a
    counter that restarts at 0 in a resumed process (so a resumed run replayed an earlier epoch's order) and
    whose length per process is not the sampler's global length."""

    def __init__(self, order: LengthGroupedBatches, process_index: int = 0, num_processes: int = 1):
        self.order = order
        self.process_index = process_index
        self.num_processes = num_processes
        self.epoch = 0
        self.start = 0

    def __len__(self) -> int:  # global batches per epoch: the same on every process
        return len(self.order)

    def __iter__(self) -> Iterator[list[int]]:
        self.order.set_epoch(self.epoch)
        for batch in self.order.batches()[self.start:]:
            if len(batch) < self.num_processes:  # a short last batch: repeat rows so that every process gets one
                batch = (batch * self.num_processes)[: self.num_processes]
            yield np.array_split(np.asarray(batch), self.num_processes)[self.process_index].tolist()


def symmetric_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """R-Drop's penalty: (KL(p_a || p_b) + KL(p_b || p_a)) / 2 of two predictions of the same rows, mean over rows."""
    la, lb = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
    return (F.kl_div(lb, la, reduction="batchmean", log_target=True) +
            F.kl_div(la, lb, reduction="batchmean", log_target=True)) / 2


class TrainingRecipe:
    """The training loop, start to end; `run()` reads as the whole story:

        recipe = TrainingRecipe(cfg)
        recipe.setup()                      # accelerator, data, model, optimizer, prefix cache, run directory
        while recipe.train_epoch():         # one epoch (validation evaluations inside); False when over
            pass
        run = recipe.finish()               # best weights back, test evaluation, model/ and outputs saved

    `callbacks`: objects that may define on_evaluate(recipe, split, step, metrics), called on the main process
    after every validation evaluation; what they raise ends the run (marked failed), e.g. optuna.TrialPruned.
    `reuse`: a dict the caller keeps across recipes (a hyperparameter search): the loaded data, tokenizer and
    encoded splits and the frozen-prefix states are stored there and taken back when their key matches.
    `evaluate_test=False` (a search trial): the test split is never evaluated, so no frozen prefix is cached for it.

    Multi-process (torchrun / accelerate launch): every process loads the data, evaluates and decides the same;
    each trains on its part of every global batch, DDP averages the gradients; every stop decision is agreed
    across processes; only the main process writes the run directory.
    """

    def __init__(self, cfg: Config, console=None, callbacks: Sequence[Any] = (), reuse: Optional[dict] = None,
                 evaluate_test: bool = True):
        self.cfg = cfg
        self.console = console
        self.callbacks = list(callbacks)
        self.reuse = reuse
        self.evaluate_test = evaluate_test
        self.state = LoopState()
        self.best_state: Optional[dict[str, torch.Tensor]] = None
        self.run_dir: Optional[Path] = None
        self.record: Optional[RunRecord] = None
        self.log: Optional[MetricsLog] = None
        self.prefix = None
        self.prefix_time: dict[str, float] = {}
        self.last_logits: dict[str, np.ndarray] = {}
        self.encoder_logits: dict[str, np.ndarray] = {}  # the same before the TF-IDF blend
        self.best_validation_logits: Optional[np.ndarray] = None  # the encoder's, at its best step
        self.tfidf = None  # model.tfidf_weight > 0: the TF-IDF model blended into evaluate() after training
        self.tfidf_info: dict[str, Any] = {}
        self.teacher = None  # a distilled run's teacher (distill.Teacher): its logits join the loss
        self._resume_from: Optional[Path] = None
        self._cleanup = contextlib.ExitStack()  # undone by finish() or a failure: speed paths, threads, signals
        self._t_start = time.time()
        self._window: Optional[torch.Tensor] = None  # this process's window sums since the last log, on device
        self._boundary: Optional[dict[str, Any]] = None  # the loop's state after the last optimizer step (OOM)
        self._updating = False  # inside the optimizer step
        self._evaluating = False  # inside evaluate()

    # --- the whole run ---------------------------------------------------------------------------------
    def run(self, run_dir: Optional[Path] = None, resume_from: Optional[Path] = None) -> Run:
        self.setup(run_dir=run_dir, resume_from=resume_from)
        while self.train_epoch():
            pass
        return self.finish()

    # --- setup -----------------------------------------------------------------------------------------
    def setup(self, run_dir: Optional[Path] = None, resume_from: Optional[Path] = None) -> None:
        from accelerate import PartialState

        threads = torch.get_num_threads()
        self._cleanup.callback(torch.set_num_threads, threads)  # make_accelerator sets the CPU threads
        device = resolve_device(self.cfg.train.device)
        self.precision = resolve_precision(self.cfg.train.precision, device)
        trackers_of(self.cfg)  # a missing tracker package fails here, before any work
        check_quantization(self.cfg.model, self.cfg.train.device)  # likewise --quantize without bitsandbytes/CUDA
        self.process = PartialState(cpu=device == "cpu")  # the process group; the Accelerator follows the run dir
        self.main = self.process.is_main_process
        self.console = self.console or _console(self.main)
        self._resume_from = resume_from
        with self._failures_recorded():
            self._setup(run_dir, resume_from)

    def _setup(self, run_dir: Optional[Path], resume_from: Optional[Path]) -> None:
        cfg, t = self.cfg, self.cfg.train
        from accelerate.utils import set_seed

        if self.process.device.type == "cpu":  # before tokenising and building the model, as make_accelerator would
            torch.set_num_threads(t.num_threads or os.cpu_count() or 1)
        set_seed(t.seed)
        self.bundle, self.tokenizer, self.encoded = self._data()
        self._resolve_label_offset()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if cfg.distill is not None:  # `lorafit distill`: the teacher's logits for every training row (+ unlabelled)
            from .distill import Teacher

            self.teacher = Teacher.attach(self)
        set_seed(t.seed)  # the head's initialisation does not depend on how much data loading drew
        model, self.model_info = prepare_model(cfg.model, len(self.bundle.label_names), self.bundle.label_names)
        self.run_dir = self._open_run_dir(run_dir, resume_from)
        self.accelerator, _ = make_accelerator(cfg, self.run_dir)
        acc = self.accelerator
        if self.accelerator.log_with:
            project, init = tracker_init(cfg, self.run_dir.name, self.run_dir, os.environ)
            self.accelerator.init_trackers(project, config=flat_config(cfg), init_kwargs=init)
            self._cleanup.callback(self.accelerator.end_training)

        train_enc = self.encoded["train"]
        order = LengthGroupedBatches([len(x) for x in train_enc.input_ids], t.batch_size * acc.num_processes, t.seed,
                                     t.group_by_length)
        self.sampler = ProcessBatches(order, acc.process_index, acc.num_processes)
        # the loader gets its own generator so creating an iterator never draws from the global RNG (exact resume)
        self.loader = torch.utils.data.DataLoader(EncodedDataset(train_enc), batch_sampler=self.sampler,
                                                  collate_fn=Collator(self.pad_id, t.pad_to_multiple_of),
                                                  generator=torch.Generator().manual_seed(t.seed))
        self.steps_per_epoch = math.ceil(len(self.sampler) / t.grad_accum_steps)
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * self.steps_per_epoch))
        warmup = t.warmup_steps if t.warmup_steps is not None else int(round(t.warmup_ratio * self.total_steps))
        # only the model goes through prepare (device, DDP): the loader is ProcessBatches', and the optimizer and
        # scheduler step once per optimizer step here, where Accelerate's wrappers assume a sharded epoch
        self.model = acc.prepare(model)
        self.unwrapped = acc.unwrap_model(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        # the fused kernel updates all parameters in one pass instead of a dozen ops per parameter tensor; groups
        # from the unwrapped model, whose parameter names DDP does not prefix
        self.optimizer = torch.optim.AdamW(param_groups_of(self.unwrapped, cfg), lr=t.learning_rate,
                                           weight_decay=t.weight_decay, fused=acc.device.type in ("cpu", "cuda"))
        from transformers import get_scheduler

        self.scheduler = get_scheduler("constant_with_warmup" if t.scheduler == "constant" else t.scheduler,
                                       self.optimizer, num_warmup_steps=warmup, num_training_steps=self.total_steps)
        self.scaler = torch.amp.GradScaler(acc.device.type) if self.precision == "fp16" else None
        self._frozen_prefix()
        self.speed_paths = self._apply_speed_paths()

        if resume_from is not None:
            from .checkpoint import load_checkpoint

            saved, self.best_state = load_checkpoint(resume_from, self.unwrapped, self.optimizer, self.scheduler,
                                                     self.scaler, process_index=acc.process_index)
            self.state = LoopState.from_checkpoint(saved, self.main)
            if self.state.loss_count:
                self._window = torch.tensor([self.state.loss_sum, self.state.correct], dtype=torch.float64,
                                            device=acc.device)
            if self.main:
                _truncate_metrics(self.run_dir / "metrics.jsonl", self.state.step)
        if self.main:
            self.log = MetricsLog(self.run_dir / "metrics.jsonl")
            self.record.update(speed_paths=self.speed_paths, prefix_cache=self.prefix_decision)
            if self.teacher is not None:
                self.record.update(distillation={**self.record.data.get("distillation", {}), **self.teacher.info})
        # the budget covers what train_time_s counts: the steps and the training rows' prefix computation
        self.deadline = (time.time() + t.time_budget_minutes * 60 - self.state.train_time
                         - self.prefix_time.get("train", 0.0) if t.time_budget_minutes else None)
        self.has_validation = len(self.encoded["validation"]) > 0
        self._print_header()
        self._signals = self._cleanup.enter_context(_StopSignals())
        self.progress = self._cleanup.enter_context(_progress(self.console, self.main))
        self._task = self.progress.add_task("train", total=self.total_steps, completed=self.state.step, info="",
                                            epoch=self._epoch_label())

    def _data(self) -> tuple[DataBundle, Any, dict[str, Encoded]]:
        """Load, tokenise and encode the splits, or take them from `reuse` when the same data was encoded."""
        cfg = self.cfg
        key = ("data", json.dumps([cfg.data.model_dump(mode="json"), cfg.model.model, cfg.train.seed], sort_keys=True))
        if self.reuse is not None and key in self.reuse:
            return self.reuse[key]
        bundle = load_data(cfg.data, cfg.data_seed)
        tokenizer = load_tokenizer(cfg.model.model, cfg.model.trust_remote_code)
        found = bundle, tokenizer, encode_splits(bundle, tokenizer, cfg)
        if self.reuse is not None:
            self.reuse[key] = found
        return found

    def _resolve_label_offset(self) -> None:
        """The config keeps the label offset the data stage used (config.yaml, so evaluate and --resume read the
        same numbering); a detected one is said once (issue 24: 1-based labels were a silent empty class 0)."""
        offset = self.bundle.summary.get("label_offset", 0)
        if self.cfg.data.label_offset == offset:
            return
        detected = self.cfg.data.label_offset is None
        self.cfg = self.cfg.with_overrides({"label_offset": offset})
        if detected and offset and self.main:
            k = len(self.bundle.label_names)
            self.console.print(f"labels: the training ids are 1..{k} with no 0, so they count from 1: classes "
                               f"0..{k - 1} (label_offset 1; predict --labels id writes 1..{k}; --label-offset 0 "
                               "keeps the ids as they are)")

    def _open_run_dir(self, run_dir: Optional[Path], resume_from: Optional[Path]) -> Path:
        """The main process creates (or reopens) the run directory and tells the others its path."""
        from accelerate.utils import broadcast_object_list

        problem = None
        if self.main:
            try:
                run_dir = new_run_dir(self.cfg) if resume_from is None else run_dir
            except LorafitError as exc:
                problem = str(exc)
        if self.process.num_processes > 1:  # every process must leave here together, even on an error
            run_dir, problem = broadcast_object_list([str(run_dir) if run_dir else None, problem])
        if problem:
            raise LorafitError(problem)
        run_dir = Path(run_dir)
        if resume_from is not None:
            _check_same_splits(run_dir, self.bundle)
        if self.main:
            self.record = RunRecord.start(run_dir) if resume_from is None else RunRecord.reopen(run_dir)
            if resume_from is not None:  # a resumed run continues on the backbone it started on
                check_backbone(self.record.data.get("backbone"), self.cfg.model.model, run_dir)
        if self.main and resume_from is None:
            self.cfg.to_yaml(run_dir / "config.yaml")
            atomic_write_json(run_dir / "labels.json", self.bundle.label_names)
            atomic_write_json(run_dir / "data.json", self.bundle.summary)
            atomic_write_json(run_dir / "splits.json", {
                k: getattr(self.bundle, k).source_rows.tolist() for k in ("train", "validation", "test")})
            self.tokenizer.save_pretrained(run_dir / "tokenizer")
            self.record.update(precision=self.precision, frozen_weights=self._frozen_mode() or "fp32",
                               device=str(self.process.device), num_processes=self.process.num_processes,
                               model=self.model_info.as_dict(), data_sizes=self.bundle.summary["sizes"],
                               backbone=backbone_identity(self.cfg.model.model))
        return run_dir

    def _frozen_mode(self) -> Optional[str]:
        return frozen_mode(self.cfg, self.precision, self.process.device.type)

    def _frozen_prefix(self) -> None:
        """Cache the frozen lower layers' output for every split this run evaluates when only top layers train."""
        from .prefix_cache import build_prefix_cache

        splits = {k: v for k, v in self.encoded.items() if k != "test" or self.evaluate_test}
        self.prefix, self.prefix_time, self.prefix_decision = build_prefix_cache(
            self.cfg, self.unwrapped, splits, self.pad_id, self.precision, self.accelerator.device,
            self.autocast, self.console, reuse=self.reuse)

    def _apply_speed_paths(self) -> dict[str, Any]:
        """Every change to the model's forward pass, applied here and undone by finish(); returns what is on
        (run.json's speed_paths). The attention kernel applies per training step (self.step_context)."""
        device = self.accelerator.device
        plan = speed_paths(self.cfg, self.precision, device.type, self.prefix)
        if plan["fast_dropout"]:
            self._cleanup.enter_context(fast_dropout(self.unwrapped))
        if plan["quantized_base"] == "none":
            # a bitsandbytes base is never touched: these paths swap weights' .data or modules' forward
            frozen = None if plan["frozen_weights"] == "fp32" else plan["frozen_weights"]
            self._cleanup.enter_context(frozen_linears(self.unwrapped, frozen, fuse_lora=plan["fused_lora"]))
            if frozen == "int8":
                # before a checkpoint is restored: the adapters are still zero, so a resumed run quantises the same
                calibrate_int8_on_sample(self.unwrapped, self.encoded["train"], self.prefix, self.pad_id, device)
        kernel = plan["attention_kernel"]
        self.step_context = lambda: training_attention(device, kernel)
        return plan

    def _print_header(self) -> None:
        if not self.main:
            return
        cfg, info, enc = self.cfg, self.model_info, self.encoded
        frozen = self._frozen_mode()
        # short lines, one fact each, so that an 80-column terminal shows them without wrapping
        budget = "none" if cfg.model.param_budget is None else f"{cfg.model.param_budget:,}"
        processes = f" x {self.accelerator.num_processes}" if self.accelerator.num_processes > 1 else ""
        lines = [
            f"[bold]lorafit[/] {cfg.model.method} on {cfg.model.model}",
            f"  trainable {info.trainable:,} of {info.total:,} ({info.percent:.2f}%), budget {budget}",
            f"  device {self.accelerator.device}{processes}, precision {self.precision}"
            + (f" (frozen weights {frozen})" if frozen == "int8" else ""),
            f"  rows: train {len(enc['train'])}, validation {len(enc['validation'])}, test {len(enc['test'])}",
        ]
        if self._resume_from is not None:
            lines.append(f"  resuming from {self._resume_from.name}")
        self.console.print("\n".join(lines))
        if not self.has_validation:
            self.console.print("no validation split: no validation evaluations; the last epoch's weights are kept")

    def autocast(self):
        """lorafit's mixed precision (see make_accelerator): autocast to bf16/fp16, or nothing in fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.accelerator.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    # --- one epoch ---------------------------------------------------------------------------------------
    def train_epoch(self) -> bool:
        """Train to the end of the current epoch (or max steps, or a stop); return False when training is over."""
        with self._failures_recorded(), torch.enable_grad():  # grad mode as the caller left it, afterwards
            try:
                self._train_epoch()
            except torch.cuda.OutOfMemoryError:  # a class on CPU builds too
                raise self._out_of_memory() from None
        return self.state.step < self.total_steps and self.state.stop_reason == "completed"

    def _train_epoch(self) -> None:
        st, t, acc = self.state, self.cfg.train, self.accelerator
        if st.step >= self.total_steps or st.stop_reason != "completed":
            return
        self.sampler.epoch, self.sampler.start = st.epoch, st.batches_done  # the order follows LoopState alone
        self.model.train()
        self._mark_step_boundary()
        evaluated_at = None
        t0 = time.time()
        for batch in self.loader:
            st.batches_done += 1
            sync = st.batches_done % t.grad_accum_steps == 0 or st.batches_done == len(self.sampler)
            self._train_step(batch, sync)
            if not sync:
                continue
            st.step += 1
            if st.step % t.log_every == 0 or st.step == self.total_steps:
                st.train_time += time.time() - t0
                self._log_training()
                t0 = time.time()
            self._mark_step_boundary()  # after the log row, whose window it then no longer holds
            stop = {"early_stopping": False, "time_budget": self.deadline is not None and time.time() > self.deadline,
                    "signal": self._signals.received is not None}
            if t.eval_every and st.step % t.eval_every == 0 and self.has_validation:
                st.train_time += time.time() - t0
                stop["early_stopping"] = self._validate()
                evaluated_at = st.step
                t0 = time.time()
            stop = self._agree(stop)
            if stop["signal"]:
                st.train_time += time.time() - t0
                self.save_checkpoint()
                raise Interrupted(f"{self._signals.received or 'a signal to another process'} at step {st.step}; "
                                  f"checkpoint saved; resume with: lorafit train --resume {self.run_dir}")
            if st.stop_reason == "completed":
                st.stop_reason = next((reason for reason, hit in stop.items() if hit), "completed")
            if (t.checkpoint_every and st.step % t.checkpoint_every == 0 and st.batches_done < len(self.sampler)
                    and st.stop_reason == "completed"):
                st.train_time += time.time() - t0
                self.save_checkpoint()
                t0 = time.time()
            if st.step >= self.total_steps or st.stop_reason != "completed":
                break
        st.train_time += time.time() - t0
        self.progress.update(self._task, completed=st.step)
        epoch_done = st.batches_done >= len(self.sampler)
        if evaluated_at != st.step and self.has_validation:  # not just evaluated at this very step
            early = self._agree({"early_stopping": self._validate()})["early_stopping"]
            if early and st.stop_reason == "completed":
                st.stop_reason = "early_stopping"
        if epoch_done:
            st.epoch += 1
            st.batches_done = 0
            self.progress.update(self._task, epoch=self._epoch_label())
        if st.step < self.total_steps and st.stop_reason == "completed":
            self.save_checkpoint()

    def _train_step(self, batch: dict, sync: bool) -> None:
        """Forward, backward and (on `sync`) the optimizer step, for this process's part of a global batch."""
        st, t, acc = self.state, self.cfg.train, self.accelerator
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        rows = len(batch["labels"])
        if t.rdrop_alpha:  # R-Drop: every row twice in one batch, so each copy gets its own dropout masks
            batch = {k: torch.cat([v, v]) for k, v in batch.items()}
        # DDP all-reduces the gradients in backward; between optimizer steps (accumulation) it must not
        with contextlib.nullcontext() if sync else acc.no_sync(self.model):
            with self.step_context(), self.autocast():
                if self.prefix is not None:  # the DDP-wrapped model runs, with the cached lower layers swapped in
                    logits = self.prefix.logits(self.model, batch, "train", acc.device)
                else:
                    logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            if self.teacher is not None:  # distillation: hard labels + the teacher's soft labels (distill.py)
                loss = self.teacher.loss(logits.float(), batch, self.cfg)
            else:
                loss = F.cross_entropy(logits.float(), batch["labels"], label_smoothing=t.label_smoothing)
            if t.rdrop_alpha:  # the loss above is the mean over both copies; the penalty pulls them together
                loss = loss + t.rdrop_alpha * symmetric_kl(*logits.float().split(rows))
                logits, batch = logits[:rows], {k: v[:rows] for k, v in batch.items()}  # statistics: the rows once
            scaled = loss / t.grad_accum_steps
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        if sync:
            self._updating = True  # an error from here to the scheduler step leaves the weights half-updated
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if t.max_grad_norm:
                acc.clip_grad_norm_(self.trainable, t.max_grad_norm)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._updating = False
        # summed in float64 in the order of the steps, continued from a checkpoint's sums: a resumed run logs the
        # uninterrupted run's numbers exactly
        window = torch.stack([loss.detach(), (logits.argmax(-1) == batch["labels"]).sum()]).double()
        self._window = window if self._window is None else self._window + window
        st.loss_count += 1
        st.seen += len(batch["labels"]) if self.teacher is None else int((batch["labels"] >= 0).sum())  # labelled
        st.samples += len(batch["labels"])
        st.real_tokens += int(batch["attention_mask"].sum())
        st.padded_tokens += batch["attention_mask"].numel()

    # counters a step changes before its optimizer update; restored from the boundary after an out-of-memory error
    _STEP_COUNTERS = ("batches_done", "loss_count", "seen", "samples", "real_tokens", "padded_tokens")

    def _mark_step_boundary(self) -> None:
        """Remember where the last completed optimizer step left the loop (counters, window, torch RNG states), so
        that an out-of-memory error in the next step can still leave a checkpoint at this step. Only torch's
        generators: a step draws from no other (dropout), and NumPy's state alone would cost ~65 us a step."""
        from .checkpoint import torch_rng_state

        st = self.state
        self._boundary = {**{k: getattr(st, k) for k in self._STEP_COUNTERS}, "epoch": st.epoch, "step": st.step,
                          "window": self._window, "torch_rng": torch_rng_state()}

    def _out_of_memory(self) -> LorafitError:
        """CUDA ran out of memory: checkpoint the last completed step (the SIGINT path's resumable state) where the
        weights are whole, and say in one line which batch size to lower."""
        st, t, acc = self.state, self.cfg.train, self.accelerator
        self.optimizer.zero_grad(set_to_none=True)  # the failed step's partial gradients
        if acc.device.type == "cuda":
            torch.cuda.empty_cache()
        saved = None
        b = self._boundary
        # one process cannot save alone (save_checkpoint gathers every process's RNG states): use the last one
        if not self._updating and b is not None and b["step"] == st.step and acc.num_processes == 1:
            for key in self._STEP_COUNTERS:
                setattr(st, key, b[key])
            st.epoch, self._window = b["epoch"], b["window"]
            try:
                from .checkpoint import rng_state

                saved = self.save_checkpoint(rngs=[(b["torch_rng"], rng_state()[1])])
            except Exception as exc:  # noqa: BLE001 - the out-of-memory line matters more than this checkpoint
                self.console.print(f"[yellow]warning: no checkpoint at step {st.step} ({escape(describe(exc))})[/]")
        from .checkpoint import list_checkpoints

        found = list_checkpoints(self.run_dir) if self.run_dir is not None else []
        where = (("checkpoint saved at step " + str(st.step)) if saved else ("last checkpoint " + found[-1].name)
                 if found else "")
        if self._evaluating:  # the evaluation batch is what to lower, and a resumed run may change it
            half = max(1, t.eval_batch_size // 2)
            fix = (f"{where}: resume with: lorafit train --resume {self.run_dir} --eval-batch-size {half}" if found
                   else f"no checkpoint yet; train again with --eval-batch-size {half}")
            return LorafitError(f"CUDA out of memory at step {st.step} while evaluating with --eval-batch-size "
                                f"{t.eval_batch_size}: {fix}")
        return LorafitError(f"CUDA out of memory at step {st.step + 1} with --batch-size {t.batch_size}: "
                            f"{smaller_batch(t.batch_size, t.grad_accum_steps, acc.num_processes)}"
                            + (f"; {where}: after freeing GPU memory, resume with: lorafit train --resume {self.run_dir}"
                               if found else "; no checkpoint yet"))

    def _window_totals(self) -> tuple[float, int, float, int]:
        """The logging window's (loss sum, batches, correct, rows) over every process."""
        st, acc = self.state, self.accelerator
        here = torch.tensor([0.0, st.loss_count, 0.0, st.seen], dtype=torch.float64)
        if self._window is not None:
            here[0], here[2] = self._window.cpu()
        total = acc.reduce(here.to(acc.device), "sum").cpu() if acc.num_processes > 1 else here
        return float(total[0]), int(total[1]), float(total[2]), int(total[3])

    def _reset_window(self) -> None:
        self._window = None
        self.state.loss_count = self.state.seen = 0

    def _log_training(self) -> None:
        st, acc = self.state, self.accelerator
        loss_sum, batches, correct, rows = self._window_totals()
        mean_loss = loss_sum / max(batches, 1)
        if not math.isfinite(mean_loss):
            raise LorafitError(f"training loss became {mean_loss} at step {st.step}; {_latest_checkpoint_note(self.run_dir)}"
                               "lower --learning-rate or use --precision fp32 and train again")
        lr = self.scheduler.get_last_lr()[0]
        sps = st.samples * acc.num_processes / max(st.train_time, 1e-9)
        accuracy = correct / max(rows, 1)
        if self.main:
            self.log.write(type="train", step=st.step, epoch=self._epoch_position(), loss=mean_loss,
                           accuracy=round(accuracy, 6), lr=lr, samples_per_s=round(sps, 2))
        self._track("train", {"loss": mean_loss, "accuracy": accuracy, "lr": lr, "samples_per_s": sps})
        self.progress.update(self._task, completed=st.step, info=progress_info(self.console.width, mean_loss, lr, sps))
        self._reset_window()

    def _track(self, split: str, values: dict[str, float]) -> None:
        """Send a metrics row to the trackers of train.report_to (Accelerate logs from the main process only)."""
        if self.accelerator.log_with:
            self.accelerator.log({f"{split}/{k}": v for k, v in values.items()}, step=self.state.step)

    def _agree(self, flags: dict[str, bool]) -> dict[str, bool]:
        """A stop decision holds for every process if it holds for one: no process may stop while another
        waits for it in a collective."""
        if self.accelerator.num_processes == 1:
            return flags
        acc = self.accelerator
        votes = acc.reduce(torch.tensor([float(v) for v in flags.values()], device=acc.device), "max")
        return {name: bool(v) for name, v in zip(flags, votes.tolist())}

    def _epoch_position(self) -> float:
        st = self.state
        return round(st.epoch + min(1.0, st.batches_done / max(len(self.sampler), 1)), 4)

    def _epoch_label(self) -> str:
        total = self.total_steps / self.steps_per_epoch
        shown = f"{total:g}" if total == int(total) else f"{total:.1f}"
        return f"{min(self.state.epoch + 1, math.ceil(total))}/{shown}"

    # --- evaluation ------------------------------------------------------------------------------------
    def evaluate(self, split: str) -> dict[str, Any]:
        """Metrics of the current weights on `split` (evaluate.compute_metrics); the logits go to last_logits.
        Every process computes the same numbers on the unwrapped model: no collective, nothing to gather."""
        acc, enc = self.accelerator, self.encoded[split]
        prefix = self.prefix if self.prefix is not None and split in self.prefix.flat else None
        forward = (lambda batch: prefix.logits(self.unwrapped, batch, split, acc.device)) if prefix is not None else None
        # an out-of-memory error inside names --eval-batch-size; left set by an error, read by _out_of_memory
        self._evaluating = True
        logits = predict_logits(self.unwrapped, enc, self.cfg.train.eval_batch_size, self.pad_id, acc.device,
                                autocast=self.autocast, forward=forward)
        self._evaluating = False
        self.encoder_logits[split] = logits
        if self.tfidf is not None:  # after training: what the run's classifier predicts (tfidf.py)
            logits = self.tfidf.blend(logits, getattr(self.bundle, split).texts)
        self.last_logits[split] = logits
        return compute_metrics(enc.labels, logits, self.bundle.label_names)

    def _validate(self) -> bool:
        """Evaluate on validation, keep the best weights; return True when early stopping says stop."""
        st, t = self.state, self.cfg.train
        m = self.evaluate("validation")
        improved = better(t.metric_for_best, m[t.metric_for_best], st.best_value)
        if improved:
            st.best_value, st.best_step, st.bad_evals = m[t.metric_for_best], st.step, 0
            self.best_state = trainable_state_dict(self.unwrapped)
            self.best_validation_logits = self.encoder_logits["validation"]
        else:
            st.bad_evals += 1
        if self.main:
            self.log.write(type="eval", split="validation", step=st.step, epoch=self._epoch_position(),
                           **scalar_metrics(m), per_class=m["per_class"], confusion_matrix=m["confusion_matrix"],
                           best=improved)
            self.progress.console.print(
                f"step {st.step} epoch {self._epoch_position():.2f}  validation: accuracy {m['accuracy']:.4f} "
                f"F1 {m['f1_macro']:.4f} loss {m['loss']:.4f}{' best' if improved else ''}")
        self._track("validation", scalar_metrics(m))
        if self.main:
            for callback in self.callbacks:
                if hasattr(callback, "on_evaluate"):
                    callback.on_evaluate(self, "validation", st.step, m)
        return t.early_stopping_patience is not None and st.bad_evals >= t.early_stopping_patience

    # --- checkpoints -----------------------------------------------------------------------------------
    def save_checkpoint(self, rngs: Optional[list] = None) -> Optional[Path]:
        """A resumable checkpoint at the current step (written by the main process; every process calls it).
        `rngs`: this process's RNG states to record, when not the current ones (single process only)."""
        from accelerate.utils import gather_object

        from .checkpoint import rng_state, save_checkpoint

        loss_sum, batches, correct, rows = self._window_totals()
        rngs = rngs or [rng_state()]
        if self.accelerator.num_processes > 1:
            rngs = gather_object(rngs)  # each process's dropout stream, restored to the same process
        if not self.main:
            return None
        saved = asdict(self.state)
        saved.update(loss_sum=loss_sum, loss_count=batches, correct=correct, seen=rows)
        return save_checkpoint(self.run_dir, self.state.step, self.unwrapped, self.optimizer, self.scheduler,
                               self.scaler, saved, self.best_state, self.cfg.train.keep_checkpoints, rngs=rngs)

    # --- the end ---------------------------------------------------------------------------------------
    def finish(self, evaluate_test: Optional[bool] = None) -> Run:
        """Restore the best weights, evaluate on test (unless evaluate_test, by default the recipe's, says not),
        save model/ and the outputs; undo the speed paths, threads and signal handlers."""
        with self._failures_recorded():
            try:
                return self._finish(self.evaluate_test if evaluate_test is None else evaluate_test)
            except torch.cuda.OutOfMemoryError:
                if self._evaluating:  # the test split's evaluation: training is over, a resume evaluates again
                    raise self._out_of_memory() from None
                raise

    def _finish(self, evaluate_test: bool) -> Run:
        st, t, acc = self.state, self.cfg.train, self.accelerator
        self.progress.update(self._task, completed=st.step)
        if self.best_state is not None:
            load_trainable_state_dict(self.unwrapped, self.best_state)
        self._fit_tfidf()
        test_metrics: dict[str, Any] = {}
        if evaluate_test:
            test_metrics = self.evaluate("test")
            if self.tfidf is not None:
                labels = self.encoded["test"].labels
                self.tfidf_info.update(test_accuracy_encoder=_accuracy(self.encoder_logits["test"], labels),
                                       test_accuracy_tfidf=_accuracy(self.tfidf.proba(self.bundle.test.texts), labels),
                                       test_accuracy_blend=test_metrics["accuracy"])
            if self.main:
                self.log.write(type="eval", split="test", step=st.step,
                               epoch=round(st.step / self.steps_per_epoch, 4), **scalar_metrics(test_metrics),
                               per_class=test_metrics["per_class"], confusion_matrix=test_metrics["confusion_matrix"])
            self._track("test", scalar_metrics(test_metrics))
        if self.log is not None:
            self.log.close()
        self._cleanup.close()  # the model's plain forward back before it is saved
        info = self._summary()
        if self.main:
            save_weights(self.unwrapped, self.cfg.model, self.run_dir / "model", tfidf=self.tfidf)
            if evaluate_test:
                atomic_write_json(self.run_dir / "test_metrics.json", test_metrics)
                write_predictions(self.run_dir / PREDICTIONS, self.bundle.test.source_rows, self.bundle.test.texts,
                                  self.bundle.test.labels, softmax(self.last_logits["test"]), self.bundle.label_names)
            if self.tfidf is not None:
                self.record.update(tfidf=self.tfidf_info)
            self.record.update(status="completed", finished_at=_now(), **info)
            if self.teacher is not None:
                self._record_distillation()
            if evaluate_test:  # the report is built around the test results
                _report_if_available(self.run_dir, self.console)
            self._print_result(info, test_metrics)
        acc.wait_for_everyone()  # when train() returns on any process, the run directory is complete
        return Run(self.run_dir, self.cfg, test_metrics, info)

    def _fit_tfidf(self) -> None:
        """model.tfidf_weight > 0: fit the TF-IDF model on the labelled training rows, after the encoder, and blend
        it into every later evaluate(). Every process fits the same (deterministic) model, so their metrics agree;
        trials of a search share one fit through `reuse`."""
        from .tfidf import TfidfModel, fit_tfidf

        weight, b = self.cfg.model.tfidf_weight, self.bundle
        if not weight:
            return
        if self.has_validation and self.best_validation_logits is None:  # resumed after the best step
            self.evaluate("validation")
            self.best_validation_logits = self.encoder_logits["validation"]
        key = ("tfidf", json.dumps([self.cfg.data.model_dump(mode="json"), self.cfg.data_seed], sort_keys=True))
        found = self.reuse.get(key) if self.reuse is not None else None
        if found is None:
            labelled = b.train.labels >= 0  # a distilled student's teacher-only rows carry no label
            validation = (b.validation.texts, b.validation.labels) if self.has_validation else None
            found = fit_tfidf([t for t, keep in zip(b.train.texts, labelled) if keep], b.train.labels[labelled],
                              len(b.label_names), weight, validation)
            if self.reuse is not None:
                self.reuse[key] = found
        model, info = found
        self.tfidf = TfidfModel(model.vectorizer, model.coef, model.intercept, weight, model.c)
        self.tfidf_info = dict(info, weight=weight)
        if self.has_validation:
            labels, texts = self.encoded["validation"].labels, b.validation.texts
            self.tfidf_info.update(validation_accuracy_encoder=_accuracy(self.best_validation_logits, labels),
                                   validation_accuracy_blend=_accuracy(self.tfidf.blend(self.best_validation_logits,
                                                                                         texts), labels))

    def _record_distillation(self) -> None:
        """run.json's distillation section gets the student's side: its layers and its predict speed."""
        from .distill import layer_count, student_speed

        texts, speed = self.bundle.test.texts, {}
        try:
            speed = student_speed(self.run_dir, texts, self.cfg.train.eval_batch_size) if texts else {}
        except Exception as exc:  # noqa: BLE001 - a measurement for the record must never fail a finished run
            self.console.print(f"[yellow]warning: the student's predict speed could not be measured "
                               f"({escape(describe(exc))})[/]")
        self.record.update(distillation={**self.record.data.get("distillation", {}), **self.teacher.info,
                                         "student_layers": layer_count(self.cfg), **speed,
                                         "speed_measured": "in-run: teacher while computing its logits, student "
                                                           "on the test split"})

    def _summary(self) -> dict[str, Any]:
        st, t, acc = self.state, self.cfg.train, self.accelerator
        train_prefix_s = self.prefix_time.get("train", 0.0)
        return {
            "wall_time_s": round(time.time() - self._t_start, 2),
            "steps": st.step, "epochs_completed": round(st.step / self.steps_per_epoch, 4),
            "stop_reason": st.stop_reason, "best_step": st.best_step,
            f"best_validation_{t.metric_for_best}": st.best_value,
            "weights": "best validation" if self.best_state is not None else "last (no validation split)",
            "train_samples": st.samples * acc.num_processes,
            # the train split's one-off prefix computation is part of training's cost, so it counts in the
            # throughput; the validation and test splits' is evaluation work, which is not counted
            "train_time_s": round(st.train_time + train_prefix_s, 2),
            "prefix_cache_s": round(sum(self.prefix_time.values()), 2),
            "prefix_cache_train_s": round(train_prefix_s, 2),
            "prefix_cache_from_layer": self.prefix.k if self.prefix is not None else None,
            "train_samples_per_s": round(st.samples * acc.num_processes / max(st.train_time + train_prefix_s, 1e-9), 2),
            "padding_efficiency": round(st.real_tokens / max(st.padded_tokens, 1), 4),
            "resumed": self._resume_from is not None,
            "peak_gpu_memory_gb": peak_gpu_memory_gb(acc.device),
        }

    def _print_result(self, info: dict[str, Any], test: dict[str, Any]) -> None:
        t = self.cfg.train
        if info["stop_reason"] != "completed":
            best = info.get(f"best_validation_{t.metric_for_best}")
            self.console.print(f"stopped early ({info['stop_reason']}) at step {info['steps']}; best validation "
                               f"{t.metric_for_best} {best:.4f} at step {info['best_step']}, restored"
                               if best is not None else f"stopped early ({info['stop_reason']}) at step {info['steps']}")
        if self.best_state is None:
            self.console.print("no validation split: kept the last epoch's weights")
        result = (f"[bold green]test accuracy {test['accuracy']:.4f}[/]  macro F1 {test['f1_macro']:.4f}  "
                  f"loss {test['loss']:.4f}" if test else "no test evaluation")
        report = self.run_dir / "report.html"
        self.console.print(f"{result}\n{info['train_samples_per_s']:.1f} samples/s, wall {info['wall_time_s']:.0f}s, "
                           f"run: {self.run_dir}" + (f"\nreport: {report}" if report.is_file() else ""))

    @contextlib.contextmanager
    def _failures_recorded(self):
        """Any exception marks the run interrupted or failed in run.json and undoes the speed paths."""
        try:
            yield
        except (KeyboardInterrupt, Interrupted):
            self._close(status="interrupted")
            raise
        except BaseException as exc:
            error = describe(exc)[:2000]  # a bare AssertionError() still says where it stopped
            self._close(status="failed", error=error)
            if self.main and self.console is not None and not isinstance(exc, LorafitError):
                # the CLI prints a LorafitError itself; for a library's error this line heads the traceback
                self.console.print(f"[bold red]failed:[/] {escape(error)}"
                                   + (f" (run.json of {self.run_dir})" if self.run_dir is not None else ""))
            raise

    def _close(self, **fields) -> None:
        peak = peak_gpu_memory_gb(self.accelerator.device) if getattr(self, "accelerator", None) else None
        if peak is not None:  # a failed CUDA run (out of memory above all) says how much it held
            fields["peak_gpu_memory_gb"] = peak
        try:
            self._cleanup.close()
        finally:
            if self.main and self.record is not None:
                self.record.update(finished_at=_now(), **fields)


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
        self._old.clear()


@contextlib.contextmanager
def fast_dropout(model: nn.Module):
    """Within the block, the model's nn.Dropout modules are FastDropout (model.py: a cheaper CPU mask)."""
    from .model import FastDropout

    swapped = []
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, name, FastDropout(child.p, child.inplace))
                swapped.append((module, name, child))
    try:
        yield
    finally:
        for module, name, child in swapped:
            setattr(module, name, child)


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


def calibrate_int8_on_sample(model, enc: Encoded, prefix, pad_id, device, rows: int = 64) -> None:
    """Quantise the int8 frozen weights (frozen.py) with activation ranges from the first training rows."""
    n = min(rows, len(enc))
    sample = Encoded(enc.input_ids[:n], enc.labels[:n], enc.full_lengths[:n])  # rows 0..n-1: the cache's too
    forward = (lambda batch: prefix.logits(model, batch, "train", device)) if prefix is not None else None
    calibrate_int8(model, lambda: predict_logits(model, sample, n, pad_id, device, forward=forward))


def param_groups_of(model, cfg: Config) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm; the head may get its own learning rate."""
    head_lr = cfg.train.head_learning_rate or cfg.train.learning_rate
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "norm" in name.lower()
        is_head = is_head_parameter(model, name)
        groups.setdefault((no_decay, is_head), []).append(p)
    return [
        {"params": ps, "weight_decay": 0.0 if no_decay else cfg.train.weight_decay,
         "lr": head_lr if is_head else cfg.train.learning_rate}
        for (no_decay, is_head), ps in groups.items()
    ]


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == np.asarray(labels)).mean()) if len(labels) else float("nan")


def _report_if_available(run_dir: Path, console) -> None:
    """The report is a bonus on top of the run: a failure to draw is a warning, never a failed run."""
    try:
        from . import report
    except ImportError:
        return
    try:
        report.write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - plotting must never break a finished run
        console.print(f"[yellow]warning: the report could not be written ({escape(describe(exc))}); "
                      f"results are intact; retry with: lorafit report {run_dir}[/]")


def as_config(config) -> Config:
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


# below this many columns the bar is short, the elapsed time is left out and the figures are terse, so the
# whole line fits 80 columns; a wider terminal shows the long forms
WIDE_CONSOLE = 110


def progress_info(width: int, loss: float, lr: float, samples_per_s: float) -> str:
    if width < WIDE_CONSOLE:
        return f"loss {loss:.3f} lr {lr:.1e} {samples_per_s:.0f}/s"
    return f"loss {loss:.4f}  lr {lr:.2e}  {samples_per_s:.1f} samples/s"


def _progress(console, main: bool):
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


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")
