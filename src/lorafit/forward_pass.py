"""Every change lorafit makes to the model's forward pass during training, applied in one place: `apply()`.

    forward = apply(cfg, model, runtime.precision, device, encoded, pad_id, console)  # decides, builds, patches
    logits = forward.train_logits(ddp_model, batch)     # a training step's forward, every change included
    forward.record                                      # run.json's speed_paths and prefix_cache, as applied
    forward.close()                                     # the model's plain forward back (before it is saved)

What it may change, each listed in config.py's train section and recorded in run.json:
- precision: torch.autocast to bf16 / fp16 (train.precision);
- the attention kernel: SDPA's math kernel on the CPU (train.cpu_attention_kernel);
- the frozen-prefix cache: the embeddings and frozen lower blocks swapped, per forward, for their cached output
  (train.cache_frozen_prefix; prefix_cache.py);
- the frozen Linear weights held in the autocast dtype, or run through fbgemm's int8 kernel, and PEFT's LoRA
  layers as one autograd node (train.int8_frozen_weights, train.fused_lora; frozen.py);
- dropout masks drawn a byte per element on the CPU (train.fast_dropout; FastDropout below).
Nothing else in lorafit patches a model while it trains. A quantized base (model.quantize) gets none of the
patches: bitsandbytes' packed weights must stay as loaded (issue 23).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
from torch import nn

from .config import Config
from .data import Encoded
from .evaluate import predict_logits
from .frozen import calibrate_int8, frozen_linears, int8_available
from .prefix_cache import build_prefix_cache
from .runtime import autocast

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


def training_attention(device: torch.device, kernel: str = "math"):
    """On the CPU, train with SDPA's math kernel (train.cpu_attention_kernel): the fused flash kernel's backward
    is several times slower for short texts (a profiled step: 28% of it, against 9% for math). GPUs keep their
    fused kernels."""
    if device.type != "cpu" or kernel != "math":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


class FastDropout(nn.Dropout):
    """nn.Dropout whose CPU mask takes one random byte per element, drawn eight at a time: `bernoulli_` draws
    a random number per element and costs about 4x more (0.5 vs 1.8 ms for a 16 x 48 x 384 batch here).
    p is rounded to a multiple of 1/256 and the scale follows the rounded p."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        drop = min(255, round(self.p * 256))
        n = x.numel()
        words = torch.empty((n + 7) // 8, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
        keep = words.view(torch.uint8)[:n].view(x.shape) >= drop
        # the scaled mask in x's dtype: one multiply forward and one backward, no casts of a bool mask
        mask = torch.where(keep, torch.tensor(256 / (256 - drop), dtype=x.dtype), torch.tensor(0, dtype=x.dtype))
        return x * mask


@contextlib.contextmanager
def fast_dropout(model: nn.Module):
    """Within the block, the model's nn.Dropout modules are FastDropout (same p); modules that call F.dropout
    directly are left alone."""
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


def calibrate_int8_on_sample(model, enc: Encoded, forward, pad_id, device, rows: int = 64) -> None:
    """Quantise the int8 frozen weights (frozen.py) with activation ranges from the first training rows.
    `forward`: predict_logits' forward over the training split (ForwardPass.eval_forward), or None."""
    n = min(rows, len(enc))
    sample = Encoded(enc.input_ids[:n], enc.labels[:n], None)  # rows 0..n-1: the cache's too
    calibrate_int8(model, lambda: predict_logits(model, sample, n, pad_id, device, forward=forward))


class ForwardPass:
    """The training forward as apply() set it up; `close()` undoes every patch (idempotent)."""

    def __init__(self, precision: str, device: torch.device, attention_kernel: str, prefix, prefix_time: dict,
                 record: dict[str, Any], undo: contextlib.ExitStack):
        self.precision = precision
        self.device = device
        self.attention_kernel = attention_kernel
        self.prefix = prefix  # prefix_cache.FrozenPrefix or None
        self.prefix_time = prefix_time  # seconds spent caching each split
        self.record = record  # {"speed_paths": ..., "prefix_cache": ...} for run.json
        self._undo = undo

    def autocast(self):
        return autocast(self.precision, self.device.type)

    @property
    def train_setup_s(self) -> float:
        """Seconds of one-off work on the training rows (caching their frozen prefix): part of training's cost."""
        return self.prefix_time.get("train", 0.0)

    def timings(self) -> dict[str, Any]:
        """run.json's prefix-cache figures (the validation and test splits' caching is evaluation work)."""
        return {"prefix_cache_s": round(sum(self.prefix_time.values()), 2),
                "prefix_cache_train_s": round(self.train_setup_s, 2),
                "prefix_cache_from_layer": self.prefix.k if self.prefix is not None else None}

    def train_logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """A training step's logits from `model` (the DDP-wrapped one in a multi-process run)."""
        with training_attention(self.device, self.attention_kernel), self.autocast():
            if self.prefix is not None:  # the cached lower layers swapped in around the model's own forward
                return self.prefix.logits(model, batch, "train", self.device)
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def eval_forward(self, model: nn.Module, split: str) -> Optional[Callable[[dict], torch.Tensor]]:
        """evaluate.predict_logits' `forward` for `split`: through the cache when it holds the split, else None."""
        if self.prefix is None or split not in self.prefix.flat:
            return None
        return lambda batch: self.prefix.logits(model, batch, split, self.device)

    def close(self) -> None:
        self._undo.close()


def apply(cfg: Config, model: nn.Module, precision: str, device: torch.device, encoded: dict[str, Encoded],
          pad_id: int, console, reuse: Optional[dict] = None) -> ForwardPass:
    """Decide and apply every forward-pass change for this run on `model` (the unwrapped one). `encoded`: the
    splits whose frozen prefix to cache (those the run evaluates). Call after the model is on its device and
    before a checkpoint is restored: the int8 calibration needs the adapters still at zero."""
    undo = contextlib.ExitStack()
    prefix, prefix_time, prefix_decision = build_prefix_cache(
        cfg, model, encoded, pad_id, precision, device, lambda: autocast(precision, device.type), console, reuse=reuse)
    plan = speed_paths(cfg, precision, device.type, prefix)
    forward = ForwardPass(precision, device, plan["attention_kernel"], prefix, prefix_time,
                          {"speed_paths": plan, "prefix_cache": prefix_decision}, undo)
    try:
        if plan["fast_dropout"]:
            undo.enter_context(fast_dropout(model))
        if plan["quantized_base"] == "none":
            frozen = None if plan["frozen_weights"] == "fp32" else plan["frozen_weights"]
            undo.enter_context(frozen_linears(model, frozen, fuse_lora=plan["fused_lora"]))
            if frozen == "int8":
                calibrate_int8_on_sample(model, encoded["train"], forward.eval_forward(model, "train"), pad_id, device)
    except BaseException:
        undo.close()
        raise
    return forward
