"""How the frozen Linear weights of the trained layers compute during training steps.

LoRA trains a few small matrices beside large frozen ones, and the frozen matmuls are most of a step's work.
Neither PEFT nor Accelerate makes them cheaper on a CPU, so these paths are written here (frozen_linears):

- bf16 / fp16: under autocast the frozen weights are held in the autocast dtype (autocast caches the casts of
  trainable weights only, so it cast each frozen weight anew at every call: ~8% of a CPU step).
- int8, in fp32 training on x86 CPUs: each frozen weight is quantised once (Int8Weight) and the forward matmul
  runs as fbgemm's int8 dynamic-quantised linear (1.6-2.1x fp32 on an AVX2 CPU without bf16 units:
  bench/cpu_kernels.py); the backward matmul (the gradient for the layers below) stays fp32 with the original
  weight. Evaluation, prediction and the frozen-prefix computation always use the fp32 weights.
- fused LoRA, in fp32 training on the CPU: each PEFT LoRA layer runs as one autograd node (base + low-rank
  path) that computes PEFT's numbers with less work: the scaling folded into B, the low-rank output added into
  the base output in place, and backward matmuls in the operand layouts MKL is fast with (PEFT's gradient of B,
  g^T h, takes three times as long as (h^T g)^T).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .runtime import AUTOCAST_DTYPES


HELD_DTYPES = AUTOCAST_DTYPES  # the frozen weights are held in the dtype autocast computes in


# The int8 path relies on torch's deprecated quantized-tensor ops (torch.ops.quantized.linear_prepack /
# linear_dynamic): pyproject bounds torch above.
def int8_available() -> bool:
    """fbgemm's int8 kernels: x86 CPUs (the deprecated quantized-tensor ops that carry them must still exist)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


def _is_frozen(linear: nn.Module) -> bool:
    return not linear.weight.requires_grad and (linear.bias is None or not linear.bias.requires_grad)


def _frozen_linears(model: nn.Module) -> list[nn.Linear]:
    # float weights only: a bitsandbytes layer (QLoRA base) holds packed integers that must stay as they are
    return [m for m in model.modules()
            if isinstance(m, nn.Linear) and _is_frozen(m) and m.weight.is_floating_point()]


def _lora_linears(model: nn.Module) -> list[nn.Module]:
    """PEFT LoRA Linear layers over a frozen nn.Linear."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return []
    return [m for m in model.modules()
            if type(m) is LoraLinear and type(m.base_layer) is nn.Linear and _is_frozen(m.base_layer)]


class Int8Weight:
    """A frozen Linear in int8 for fbgemm's dynamic-quantised matmul: weights per output channel, activations
    per tensor (7-bit: reduce_range, which CPUs without VNNI need against saturation). Activations of BERT-like
    encoders have a few channels 20-100x larger than the rest, which per-tensor scales turn into 5-14% error
    per matmul; SmoothQuant's per-input-channel scale s (x/s, W*s: the same product) moves part of that range
    into the weights and brings it to 1-4% (measured on all-MiniLM-L6-v2's top layers, alpha 0.7)."""

    ALPHA = 0.7

    def __init__(self, linear: nn.Linear, activation_absmax: Optional[torch.Tensor]):
        self.linear = linear
        w = linear.weight.detach().float()
        self.inv_smooth = None  # no activation ranges: plain per-tensor activations
        if activation_absmax is not None:
            smooth = (activation_absmax.float().clamp(min=1e-5).pow(self.ALPHA)
                      / w.abs().amax(0).clamp(min=1e-5).pow(1 - self.ALPHA))
            self.inv_smooth = 1.0 / smooth
            w = w * smooth
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8).double()
        with warnings.catch_warnings():  # quantized tensors are deprecated in torch 2.13; int8_available() guards
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(w, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8)
            bias = None if linear.bias is None else linear.bias.detach().float()
            self.packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return torch.ops.quantized.linear_dynamic(x if self.inv_smooth is None else x * self.inv_smooth,
                                                      self.packed, True)
        except RuntimeError:
            # non-finite activations (a diverged run) have no quantisation scale: fp32 lets the NaN reach the
            # loss, where the training loop stops with its own message
            return F.linear(x, self.linear.weight, self.linear.bias)


def _absmax(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1]).abs().amax(0)


def _int8_of(linear: nn.Linear, x: torch.Tensor) -> Optional[Int8Weight]:
    """The linear's Int8Weight; quantised on first use from this input's ranges if calibrate_int8 did not run."""
    if "_lorafit_int8" not in vars(linear):
        return None
    if linear._lorafit_int8 is None:
        linear._lorafit_int8 = Int8Weight(linear, _absmax(x))
    return linear._lorafit_int8


def calibrate_int8(model: nn.Module, run_forward) -> int:
    """Quantise the int8 linears with the activation ranges seen while `run_forward()` runs (in eval mode, so
    through the fp32 weights); returns how many were calibrated. Linears it does not reach stay lazy."""
    seen: dict[nn.Linear, torch.Tensor] = {}

    def record(module, args):
        m = _absmax(args[0])
        seen[module] = m if module not in seen else torch.maximum(seen[module], m)

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if "_lorafit_int8" in vars(m)]
    if not hooks:
        return 0
    try:
        run_forward()
    finally:
        for h in hooks:
            h.remove()
    for module, absmax in seen.items():
        module._lorafit_int8 = Int8Weight(module, absmax)
    return len(seen)


class _Int8Linear(torch.autograd.Function):
    """y = x W^T + b with the int8 kernel forward; dL/dx = g W in fp32 backward (W and b are frozen)."""

    @staticmethod
    def forward(ctx, x, weight, int8):
        ctx.save_for_backward(weight)
        return int8(x)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return (grad @ weight if ctx.needs_input_grad[0] else None), None, None


def _int8_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not self.training or x.device.type != "cpu" or x.dtype != torch.float32:
        return F.linear(x, self.weight, self.bias)
    return _Int8Linear.apply(x, self.weight, _int8_of(self, x))


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T with W, b frozen, A and B trained; `int8` is W as an Int8Weight, or None."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scaling, weight, bias, int8):
        flat = x.reshape(-1, x.shape[-1])
        h = flat @ lora_a.t()
        if int8 is not None:
            y = int8(flat)
        else:
            y = F.linear(flat, weight, bias)
        y.addmm_(h, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(flat, h, lora_a, lora_b, weight)
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        flat, h, lora_a, lora_b, weight = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        gh = (g @ lora_b.t().contiguous().t()).mul_(s)  # column-major B: the fast layout for this skinny matmul
        grad_b = (h.t() @ g).t().mul_(s)
        grad_a = gh.t() @ flat
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(gh, lora_a).view(*grad.shape[:-1], weight.shape[1])
        return grad_x, grad_a, grad_b, None, None, None, None


# Relies on PEFT's LoraLayer internals (lora_A/lora_B/scaling/lora_variant/lora_dropout/merged/
# disable_adapters/active_adapters), not a public API: pyproject bounds peft above; train.fused_lora turns it off.
def _lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's LoRA Linear forward as one node, where it is plain LoRA on a frozen Linear in fp32 CPU training;
    anything else (evaluation, merged or several adapters, DoRA, dropout, autocast) takes PEFT's own forward."""
    base = self.base_layer
    adapters = self.active_adapters
    if (self.training and not args and not kwargs and not self.merged and not self.disable_adapters
            and len(adapters) == 1 and adapters[0] in self.lora_A and adapters[0] not in self.lora_variant
            and isinstance(self.lora_dropout[adapters[0]], nn.Identity) and self.lora_B[adapters[0]].bias is None
            and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")):
        name = adapters[0]
        return _LoraLinear.apply(x, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                                 base.weight, base.bias, _int8_of(base, x))
    return type(self).forward(self, x, *args, **kwargs)


@contextlib.contextmanager
def frozen_linears(model: nn.Module, mode: Optional[str], fuse_lora: bool = True):
    """Within the block, frozen Linear layers compute in `mode`: 'bf16', 'fp16', 'int8' or None (as they are),
    and in fp32 training (int8 or None) LoRA layers run as one node unless `fuse_lora` is off.
    Everything is restored afterwards: weights in fp32, the plain forward."""
    saved, patched = [], []
    if mode in HELD_DTYPES:
        for module in _frozen_linears(model):
            for p in (module.weight, module.bias):
                if p is not None and p.dtype == torch.float32:
                    saved.append((p, p.data))
                    p.data = p.data.to(HELD_DTYPES[mode])
    elif mode == "int8":
        for module in _frozen_linears(model):
            if module.weight.device.type == "cpu":
                module._lorafit_int8 = None  # quantised by calibrate_int8, or on first use
                module.forward = _int8_forward.__get__(module)
                patched.append(module)
    elif mode is not None:
        raise ValueError(f"frozen_linears: unknown mode {mode!r}")
    if fuse_lora and mode in (None, "int8"):  # fp32 training
        for module in _lora_linears(model):
            module.forward = _lora_forward.__get__(module)
            patched.append(module)
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data
        for module in patched:
            del module.forward
            vars(module).pop("_lorafit_int8", None)
