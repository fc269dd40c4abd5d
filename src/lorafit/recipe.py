"""The training recipe: one loop from config to run directory, readable top to bottom.

    recipe = TrainingRecipe(cfg, extensions=[...])
    recipe.setup()                      # runtime, data, model, optimizer, forward pass, run directory
    while recipe.train_epoch():         # one epoch (validation evaluations inside); False when over
        pass
    run = recipe.finish()               # best weights back, test evaluation, model/ and outputs saved

What the loop does not hold lives beside it: the device, precision, process group and trackers (runtime.py), the
data and its batches (data_prep.py), every change to the forward pass (forward_pass.py), the console output
(console.py), the run directory's files (rundir.py), checkpoints (checkpoint.py). Features plug in through the
Extension hooks below (distill.Distillation, blend.TfidfBlend, rdrop.RDrop; train.py picks them from the
config); this module imports none of them.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from rich.markup import escape

from . import console as out
from . import forward_pass, rundir
from .checkpoint import list_checkpoints, load_checkpoint, rng_state, save_checkpoint, torch_rng_state
from .config import Config
from .data_prep import check_same_splits, prepare_data, resolve_label_offset, training_loader
from .errors import Interrupted, LorafitError, describe, smaller_batch
from .evaluate import better, compute_metrics, predict_logits, scalar_metrics, softmax
from .extensions import CrossEntropyLoss, Extension, LossFn
from .model import (
    backbone_identity, check_backbone, check_quantization, load_trainable_state_dict, param_groups_of, prepare_model,
    save_weights, trainable_state_dict,
)
from .runtime import Runtime, StopSignals

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
    # TrainingRecipe.window (a device tensor: no sync per step) and are copied here by save_checkpoint
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


# counters a step changes before its optimizer update; restored from the boundary after an out-of-memory error
STEP_COUNTERS = ("batches_done", "loss_count", "seen", "samples", "real_tokens", "padded_tokens")


class TrainingRecipe:
    """The training loop, start to end (see the module doc for the calls).

    `extensions`: Extension objects (train.recipe_for picks them from the config). `callbacks`: objects that may
    define on_evaluate(recipe, split, step, metrics), called on the main process after every validation
    evaluation (a search's pruning). `reuse`: a dict the caller keeps across recipes (a hyperparameter search): the
    encoded data and the frozen-prefix states are stored there and taken back when their key matches.
    `evaluate_test=False` (a search trial): the test split is never evaluated, so no frozen prefix is cached for it.

    Multi-process (torchrun / accelerate launch): every process loads the data, evaluates and decides the same;
    each trains on its part of every global batch, DDP averages the gradients; every stop decision is agreed
    across processes; only the main process writes the run directory.
    """

    def __init__(self, cfg: Config, console=None, extensions: Sequence[Extension] = (), callbacks: Sequence[Any] = (),
                 reuse: Optional[dict] = None, evaluate_test: bool = True):
        self.cfg = cfg
        self.console = console
        self.extensions = list(extensions)
        self.callbacks = list(callbacks)
        self.reuse = reuse
        self.evaluate_test = evaluate_test
        self.state = LoopState()
        self.best_state: Optional[dict[str, torch.Tensor]] = None
        self.run_dir: Optional[Path] = None
        self.record: Optional[rundir.RunRecord] = None
        self.log: Optional[rundir.MetricsLog] = None
        self.runtime: Optional[Runtime] = None
        self.forward: Optional[forward_pass.ForwardPass] = None
        self.last_logits: dict[str, np.ndarray] = {}  # each split's last evaluation, as reported
        self.resumed_from: Optional[Path] = None
        self.cleanup = contextlib.ExitStack()  # undone by finish() or a failure: forward pass, threads, signals
        self.started = time.time()
        self.window: Optional[torch.Tensor] = None  # this process's window sums since the last log, on device
        self.boundary: Optional[dict[str, Any]] = None  # the loop's state after the last optimizer step (OOM)
        self.updating = False  # inside the optimizer step
        self.evaluating = False  # inside evaluate()

    @property
    def main(self) -> bool:
        return self.runtime.main

    @property
    def precision(self) -> str:
        return self.runtime.precision

    # --- the whole run ---------------------------------------------------------------------------------
    def run(self, run_dir: Optional[Path] = None, resume_from: Optional[Path] = None) -> Run:
        self.setup(run_dir=run_dir, resume_from=resume_from)
        while self.train_epoch():
            pass
        return self.finish()

    # --- setup -----------------------------------------------------------------------------------------
    def setup(self, run_dir: Optional[Path] = None, resume_from: Optional[Path] = None) -> None:
        self.runtime = Runtime(self.cfg)  # device, precision, trackers, process group: resolved once
        check_quantization(self.cfg.model, self.cfg.train.device)  # --quantize without bitsandbytes/CUDA: now
        self.console = self.console or out.make_console(self.main)
        self.resumed_from = resume_from
        with self.failures_recorded():
            self._setup(run_dir, resume_from)

    def _setup(self, run_dir: Optional[Path], resume_from: Optional[Path]) -> None:
        from accelerate.utils import set_seed
        from transformers import get_scheduler

        t, rt = self.cfg.train, self.runtime
        rt.use_cpu_threads(self.cfg, self.cleanup)  # before tokenising and building the model
        set_seed(t.seed)
        data = prepare_data(self.cfg, self.reuse)
        self.cfg, note = resolve_label_offset(self.cfg, data.bundle)
        if note and self.main:
            self.console.print(note)
        for ext in self.extensions:  # before the run directory exists: bad input writes nothing
            data = ext.prepare_data(self, data)
        self.data = data
        self.has_validation = len(data.encoded["validation"]) > 0
        set_seed(t.seed)  # the head's initialisation does not depend on how much data loading drew
        model, self.model_info = prepare_model(self.cfg.model, len(data.bundle.label_names), data.bundle.label_names)
        self.run_dir = self._open_run_dir(run_dir, resume_from)
        rt.start_accelerator(self.cfg, self.run_dir, self.cleanup)
        acc = rt.accelerator

        self.loader = training_loader(data.encoded["train"], self.cfg, data.pad_id, rt.process_index, rt.num_processes)
        self.steps_per_epoch = math.ceil(len(self.loader.batch_sampler) / t.grad_accum_steps)
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * self.steps_per_epoch))
        warmup = t.warmup_steps if t.warmup_steps is not None else int(round(t.warmup_ratio * self.total_steps))
        # only the model goes through prepare (device, DDP): the loader is ProcessBatches', and the optimizer and
        # scheduler step once per optimizer step here, where Accelerate's wrappers assume a sharded epoch
        self.model = acc.prepare(model)
        self.unwrapped = acc.unwrap_model(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        # the fused kernel updates all parameters in one pass instead of a dozen ops per parameter tensor; groups
        # from the unwrapped model, whose parameter names DDP does not prefix
        self.optimizer = torch.optim.AdamW(param_groups_of(self.unwrapped, self.cfg), lr=t.learning_rate,
                                           weight_decay=t.weight_decay, fused=rt.device.type in ("cpu", "cuda"))
        self.scheduler = get_scheduler("constant_with_warmup" if t.scheduler == "constant" else t.scheduler,
                                       self.optimizer, num_warmup_steps=warmup, num_training_steps=self.total_steps)
        self.scaler = torch.amp.GradScaler(rt.device.type) if self.precision == "fp16" else None
        cached = {k: v for k, v in data.encoded.items() if k != "test" or self.evaluate_test}
        self.forward = forward_pass.apply(self.cfg, self.unwrapped, self.precision, rt.device, cached, data.pad_id,
                                          self.console, self.reuse)
        self.cleanup.callback(self.forward.close)
        self.loss_fn: LossFn = CrossEntropyLoss(t.label_smoothing)
        for ext in self.extensions:
            self.loss_fn = ext.loss_fn(self, self.loss_fn)

        if resume_from is not None:
            saved, self.best_state = load_checkpoint(resume_from, self.unwrapped, self.optimizer, self.scheduler,
                                                     self.scaler, process_index=rt.process_index)
            self.state = LoopState.from_checkpoint(saved, self.main)
            if self.state.loss_count:
                self.window = torch.tensor([self.state.loss_sum, self.state.correct], dtype=torch.float64,
                                           device=rt.device)
            if self.main:
                rundir.truncate_metrics(self.run_dir, self.state.step)
        if self.main:
            self.log = rundir.MetricsLog.open(self.run_dir)
            self.record.update(**self.forward.record)
            for ext in self.extensions:
                ext.on_start(self)
        # the budget covers what train_time_s counts: the steps and the one-off work on the training rows
        self.deadline = (time.time() + t.time_budget_minutes * 60 - self.state.train_time
                         - self.forward.train_setup_s if t.time_budget_minutes else None)
        if self.main:
            self.console.print(out.header_lines(self.cfg, self.model_info, rt.device, rt.num_processes, self.precision,
                                                forward_pass.frozen_mode(self.cfg, self.precision, rt.device.type),
                                                {k: len(v) for k, v in data.encoded.items()}, resume_from))
            if not self.has_validation:
                self.console.print("no validation split: no validation evaluations; the last epoch's weights are kept")
        self.signals = self.cleanup.enter_context(StopSignals())
        self.progress = self.cleanup.enter_context(out.progress_bar(self.console, self.main))
        self.task = self.progress.add_task("train", total=self.total_steps, completed=self.state.step, info="",
                                           epoch=self._epoch_label())

    def _open_run_dir(self, run_dir: Optional[Path], resume_from: Optional[Path]) -> Path:
        """The main process creates (or reopens) the run directory and tells the others its path."""
        from accelerate.utils import broadcast_object_list

        problem, bundle = None, self.data.bundle
        if self.main:
            try:
                run_dir = rundir.new_run_dir(self.cfg) if resume_from is None else run_dir
            except LorafitError as exc:
                problem = str(exc)
        if self.runtime.num_processes > 1:  # every process must leave here together, even on an error
            run_dir, problem = broadcast_object_list([str(run_dir) if run_dir else None, problem])
        if problem:
            raise LorafitError(problem)
        run_dir = Path(run_dir)
        if resume_from is not None:
            check_same_splits(run_dir, rundir.read_splits(run_dir), bundle)
        if self.main and resume_from is not None:  # a resumed run continues on the backbone it started on
            self.record = rundir.RunRecord.reopen(run_dir)
            check_backbone(self.record.data.get("backbone"), self.cfg.model.model, run_dir)
        elif self.main:
            self.record = rundir.RunRecord.start(run_dir)
            rundir.write_run_inputs(run_dir, self.cfg, bundle, self.data.tokenizer)
            device = self.runtime.device
            self.record.update(precision=self.precision, device=str(device), num_processes=self.runtime.num_processes,
                               frozen_weights=forward_pass.frozen_mode(self.cfg, self.precision, device.type) or "fp32",
                               model=self.model_info.as_dict(), data_sizes=bundle.summary["sizes"],
                               backbone=backbone_identity(self.cfg.model.model))
        return run_dir

    # --- one epoch ---------------------------------------------------------------------------------------
    def train_epoch(self) -> bool:
        """Train to the end of the current epoch (or max steps, or a stop); return False when training is over."""
        with self.failures_recorded(), torch.enable_grad():  # grad mode as the caller left it, afterwards
            try:
                self._train_epoch()
            except torch.cuda.OutOfMemoryError:  # a class on CPU builds too
                raise self._out_of_memory() from None
        return self.state.step < self.total_steps and self.state.stop_reason == "completed"

    def _train_epoch(self) -> None:
        st, t, sampler = self.state, self.cfg.train, self.loader.batch_sampler
        if st.step >= self.total_steps or st.stop_reason != "completed":
            return
        sampler.epoch, sampler.start = st.epoch, st.batches_done  # the order follows LoopState alone
        self.model.train()
        self._mark_step_boundary()
        evaluated_at = None
        clock = time.time()

        def untimed(work: Callable[[], Any]) -> Any:  # train_time stops while logs, evaluations, checkpoints run
            nonlocal clock
            st.train_time += time.time() - clock
            result = work()
            clock = time.time()
            return result

        for batch in self.loader:
            st.batches_done += 1
            sync = st.batches_done % t.grad_accum_steps == 0 or st.batches_done == len(sampler)
            self.train_step(batch, sync)
            if not sync:
                continue
            st.step += 1
            if st.step % t.log_every == 0 or st.step == self.total_steps:
                untimed(self._log_training)
            self._mark_step_boundary()  # after the log row, whose window it then no longer holds
            stop = {"early_stopping": False, "time_budget": self.deadline is not None and time.time() > self.deadline,
                    "signal": self.signals.received is not None}
            if t.eval_every and st.step % t.eval_every == 0 and self.has_validation:
                stop["early_stopping"] = untimed(self._validate)
                evaluated_at = st.step
            stop = self.runtime.agree(stop)
            if stop["signal"]:
                untimed(self.save_checkpoint)
                raise Interrupted(f"{self.signals.received or 'a signal to another process'} at step {st.step}; "
                                  f"checkpoint saved; resume with: lorafit train --resume {self.run_dir}")
            if st.stop_reason == "completed":
                st.stop_reason = next((reason for reason, hit in stop.items() if hit), "completed")
            if (t.checkpoint_every and st.step % t.checkpoint_every == 0 and st.batches_done < len(sampler)
                    and st.stop_reason == "completed"):
                untimed(self.save_checkpoint)
            if st.step >= self.total_steps or st.stop_reason != "completed":
                break
        st.train_time += time.time() - clock
        self.progress.update(self.task, completed=st.step)
        if evaluated_at != st.step and self.has_validation:  # not just evaluated at this very step
            early = self.runtime.agree({"early_stopping": self._validate()})["early_stopping"]
            if early and st.stop_reason == "completed":
                st.stop_reason = "early_stopping"
        if st.batches_done >= len(sampler):
            st.epoch += 1
            st.batches_done = 0
            self.progress.update(self.task, epoch=self._epoch_label())
        if st.step < self.total_steps and st.stop_reason == "completed":
            self.save_checkpoint()

    def train_step(self, batch: dict, sync: bool) -> None:
        """Forward, backward and (on `sync`) the optimizer step, for this process's part of a global batch."""
        st, t, acc = self.state, self.cfg.train, self.runtime.accelerator
        labels, mask = batch["labels"], batch["attention_mask"]  # statistics from the host copy: no device sync
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        # DDP all-reduces the gradients in backward; between optimizer steps (accumulation) it must not
        with contextlib.nullcontext() if sync else acc.no_sync(self.model):
            loss, logits = self.loss_fn(lambda b: self.forward.train_logits(self.model, b), batch)
            scaled = loss / t.grad_accum_steps
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        if sync:
            self.updating = True  # an error from here to the scheduler step leaves the weights half-updated
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
            self.updating = False
        # summed in float64 in the order of the steps, continued from a checkpoint's sums: a resumed run logs the
        # uninterrupted run's numbers exactly
        window = torch.stack([loss.detach(), (logits.argmax(-1) == batch["labels"]).sum()]).double()
        self.window = window if self.window is None else self.window + window
        st.loss_count += 1
        st.seen += int((labels >= 0).sum())  # labelled rows (a distilled student's soft-only rows are not)
        st.samples += len(labels)
        st.real_tokens += int(mask.sum())
        st.padded_tokens += mask.numel()

    def _mark_step_boundary(self) -> None:
        """Remember where the last completed optimizer step left the loop (counters, window, torch RNG states), so
        that an out-of-memory error in the next step can still leave a checkpoint at this step. Only torch's
        generators: a step draws from no other (dropout), and NumPy's state alone would cost ~65 us a step."""
        st = self.state
        self.boundary = {**{k: getattr(st, k) for k in STEP_COUNTERS}, "epoch": st.epoch, "step": st.step,
                         "window": self.window, "torch_rng": torch_rng_state()}

    def _out_of_memory(self) -> LorafitError:
        """CUDA ran out of memory: checkpoint the last completed step (the SIGINT path's resumable state) where the
        weights are whole, and say in one line which batch size to lower."""
        st, t, rt = self.state, self.cfg.train, self.runtime
        self.optimizer.zero_grad(set_to_none=True)  # the failed step's partial gradients
        if rt.device.type == "cuda":
            torch.cuda.empty_cache()
        saved, b = None, self.boundary
        # one process cannot save alone (save_checkpoint gathers every process's RNG states): use the last one
        if not self.updating and b is not None and b["step"] == st.step and rt.num_processes == 1:
            for key in STEP_COUNTERS:
                setattr(st, key, b[key])
            st.epoch, self.window = b["epoch"], b["window"]
            try:
                saved = self.save_checkpoint(rngs=[(b["torch_rng"], rng_state()[1])])
            except Exception as exc:  # noqa: BLE001 - the out-of-memory line matters more than this checkpoint
                self.console.print(f"[yellow]warning: no checkpoint at step {st.step} ({escape(describe(exc))})[/]")
        found = list_checkpoints(self.run_dir) if self.run_dir is not None else []
        where = f"checkpoint saved at step {st.step}" if saved else f"last checkpoint {found[-1].name}" if found else ""
        if self.evaluating:  # the evaluation batch is what to lower, and a resumed run may change it
            half = max(1, t.eval_batch_size // 2)
            fix = (f"{where}: resume with: lorafit train --resume {self.run_dir} --eval-batch-size {half}" if found
                   else f"no checkpoint yet; train again with --eval-batch-size {half}")
            return LorafitError(f"CUDA out of memory at step {st.step} while evaluating with --eval-batch-size "
                                f"{t.eval_batch_size}: {fix}")
        return LorafitError(f"CUDA out of memory at step {st.step + 1} with --batch-size {t.batch_size}: "
                            f"{smaller_batch(t.batch_size, t.grad_accum_steps, rt.num_processes)}"
                            + (f"; {where}: after freeing GPU memory, resume with: lorafit train --resume {self.run_dir}"
                               if found else "; no checkpoint yet"))

    def _window_totals(self) -> tuple[float, int, float, int]:
        """The logging window's (loss sum, batches, correct, rows) over every process."""
        st = self.state
        here = torch.tensor([0.0, st.loss_count, 0.0, st.seen], dtype=torch.float64)
        if self.window is not None:
            here[0], here[2] = self.window.cpu()
        total = self.runtime.sum(here)
        return float(total[0]), int(total[1]), float(total[2]), int(total[3])

    def _log_training(self) -> None:
        st = self.state
        loss_sum, batches, correct, rows = self._window_totals()
        mean_loss = loss_sum / max(batches, 1)
        if not math.isfinite(mean_loss):
            found = list_checkpoints(self.run_dir) if self.run_dir else []
            note = f"the last good checkpoint is {found[-1]}; " if found else ""
            raise LorafitError(f"training loss became {mean_loss} at step {st.step}; {note}"
                               "lower --learning-rate or use --precision fp32 and train again")
        lr = self.scheduler.get_last_lr()[0]
        sps = st.samples * self.runtime.num_processes / max(st.train_time, 1e-9)
        accuracy = correct / max(rows, 1)
        if self.main:
            self.log.write(type="train", step=st.step, epoch=self._epoch_position(), loss=mean_loss,
                           accuracy=round(accuracy, 6), lr=lr, samples_per_s=round(sps, 2))
        self.runtime.track("train", {"loss": mean_loss, "accuracy": accuracy, "lr": lr, "samples_per_s": sps}, st.step)
        self.progress.update(self.task, completed=st.step, info=out.progress_info(self.console.width, mean_loss, lr, sps))
        self.window = None
        st.loss_count = st.seen = 0

    def _epoch_position(self) -> float:
        st = self.state
        return round(st.epoch + min(1.0, st.batches_done / max(len(self.loader.batch_sampler), 1)), 4)

    def _epoch_label(self) -> str:
        total = self.total_steps / self.steps_per_epoch
        shown = f"{total:g}" if total == int(total) else f"{total:.1f}"
        return f"{min(self.state.epoch + 1, math.ceil(total))}/{shown}"

    # --- evaluation ------------------------------------------------------------------------------------
    def evaluate(self, split: str) -> dict[str, Any]:
        """Metrics of the current weights on `split` (evaluate.compute_metrics); the logits go to last_logits.
        Every process computes the same numbers on the unwrapped model: no collective, nothing to gather."""
        enc = self.data.encoded[split]
        self.evaluating = True  # an out-of-memory error inside names --eval-batch-size (read by _out_of_memory)
        logits = predict_logits(self.unwrapped, enc, self.cfg.train.eval_batch_size, self.data.pad_id,
                                self.runtime.device, autocast=self.forward.autocast,
                                forward=self.forward.eval_forward(self.unwrapped, split))
        self.evaluating = False
        for ext in self.extensions:
            logits = ext.transform_logits(self, split, logits)
        self.last_logits[split] = logits
        return compute_metrics(enc.labels, logits, self.data.bundle.label_names)

    def _validate(self) -> bool:
        """Evaluate on validation, keep the best weights; return True when early stopping says stop."""
        st, t = self.state, self.cfg.train
        m = self.evaluate("validation")
        improved = better(t.metric_for_best, m[t.metric_for_best], st.best_value)
        if improved:
            st.best_value, st.best_step, st.bad_evals = m[t.metric_for_best], st.step, 0
            self.best_state = trainable_state_dict(self.unwrapped)
        else:
            st.bad_evals += 1
        self._record_eval("validation", m, epoch=self._epoch_position(), best=improved)
        if self.main:
            self.progress.console.print(out.validation_line(st.step, self._epoch_position(), m, improved))
        if self.main:
            for observer in self.extensions + self.callbacks:
                if hasattr(observer, "on_evaluate"):
                    observer.on_evaluate(self, "validation", st.step, m)
        return t.early_stopping_patience is not None and st.bad_evals >= t.early_stopping_patience

    # --- checkpoints -----------------------------------------------------------------------------------
    def save_checkpoint(self, rngs: Optional[list] = None) -> Optional[Path]:
        """A resumable checkpoint at the current step (written by the main process; every process calls it).
        `rngs`: this process's RNG states to record, when not the current ones (single process only)."""
        from accelerate.utils import gather_object

        loss_sum, batches, correct, rows = self._window_totals()
        rngs = rngs or [rng_state()]
        if self.runtime.num_processes > 1:
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
        save model/ and the outputs; undo the forward-pass changes, threads and signal handlers."""
        with self.failures_recorded():
            try:
                return self._finish(self.evaluate_test if evaluate_test is None else evaluate_test)
            except torch.cuda.OutOfMemoryError:
                if self.evaluating:  # the test split's evaluation: training is over, a resume evaluates again
                    raise self._out_of_memory() from None
                raise

    def _finish(self, evaluate_test: bool) -> Run:
        st = self.state
        self.progress.update(self.task, completed=st.step)
        if self.best_state is not None:
            load_trainable_state_dict(self.unwrapped, self.best_state)
        for ext in self.extensions:
            ext.after_training(self)
        test_metrics: dict[str, Any] = {}
        if evaluate_test:
            test_metrics = self.evaluate("test")
            self._record_eval("test", test_metrics, epoch=round(st.step / self.steps_per_epoch, 4))
        if self.log is not None:
            self.log.close()
        self.cleanup.close()  # the model's plain forward back before it is saved
        info = self._summary()
        if self.main:
            test = self.data.bundle.test
            save_weights(self.unwrapped, self.cfg.model, self.run_dir / rundir.MODEL_DIR,
                         [part for ext in self.extensions for part in ext.model_parts(self)])
            if evaluate_test:
                rundir.write_test_metrics(self.run_dir, test_metrics)
                rundir.write_test_predictions(self.run_dir, test.source_rows, test.texts, test.labels,
                                              softmax(self.last_logits["test"]), self.data.bundle.label_names)
            self.record.update(status="completed", finished_at=rundir.now(), **info)
            for ext in self.extensions:
                ext.on_finish(self, test_metrics)
            report = self._report() if evaluate_test else None  # the report is built around the test results
            self.console.print(out.result_lines(info, test_metrics, self.cfg.train.metric_for_best,
                                                self.best_state is None, self.run_dir, report))
        self.runtime.accelerator.wait_for_everyone()  # when train() returns on any process, the run is complete
        return Run(self.run_dir, self.cfg, test_metrics, info)

    def _summary(self) -> dict[str, Any]:
        st, t, processes = self.state, self.cfg.train, self.runtime.num_processes
        # one-off work on the training rows (the frozen-prefix cache) is part of training's cost: counted
        train_time = st.train_time + self.forward.train_setup_s
        return {
            "wall_time_s": round(time.time() - self.started, 2),
            "steps": st.step, "epochs_completed": round(st.step / self.steps_per_epoch, 4),
            "stop_reason": st.stop_reason, "best_step": st.best_step,
            f"best_validation_{t.metric_for_best}": st.best_value,
            "weights": "best validation" if self.best_state is not None else "last (no validation split)",
            "train_samples": st.samples * processes,
            "train_time_s": round(train_time, 2),
            **self.forward.timings(),
            "train_samples_per_s": round(st.samples * processes / max(train_time, 1e-9), 2),
            "padding_efficiency": round(st.real_tokens / max(st.padded_tokens, 1), 4),
            "resumed": self.resumed_from is not None,
            "peak_gpu_memory_gb": self.runtime.peak_gpu_memory_gb(),
        }

    def _report(self) -> Optional[Path]:
        """report.html, or None: the report is a bonus on top of the run, and a failure to draw is a warning, never
        a failed run."""
        try:
            from . import report
        except ImportError:
            return None
        try:
            return report.write_report(self.run_dir)
        except Exception as exc:  # noqa: BLE001 - plotting must never break a finished run
            self.console.print(f"[yellow]warning: the report could not be written ({escape(describe(exc))}); "
                               f"results are intact; retry with: lorafit report {self.run_dir}[/]")
            return None

    def _record_eval(self, split: str, m: dict[str, Any], epoch: float, **extra: Any) -> None:
        """An evaluation's row in metrics.jsonl (main process) and its scalars to the trackers."""
        if self.main:
            self.log.write(type="eval", split=split, step=self.state.step, epoch=epoch, **scalar_metrics(m),
                           per_class=m["per_class"], confusion_matrix=m["confusion_matrix"], **extra)
        self.runtime.track(split, scalar_metrics(m), self.state.step)

    @contextlib.contextmanager
    def failures_recorded(self):
        """Any exception marks the run interrupted or failed in run.json and undoes the forward-pass changes."""
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
        peak = self.runtime.peak_gpu_memory_gb() if self.runtime is not None else None
        if peak is not None:  # a failed CUDA run (out of memory above all) says how much it held
            fields["peak_gpu_memory_gb"] = peak
        try:
            self.cleanup.close()
        finally:
            if self.main and self.record is not None:
                self.record.update(finished_at=rundir.now(), **fields)
