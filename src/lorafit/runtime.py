"""Where and in what arithmetic lorafit runs: the device and precision choices that training and every inference
command share, resolved the same way everywhere ('auto' means the same thing in `train` and in `predict`)."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from .errors import LorafitError

# on a GPU a forward of a few hundred texts keeps it busy; on a 2-core CPU 16 ran torch 1.2x faster than 64 and
# ONNX as fast (bench/inference.py, docs/serving.md)
CPU_BATCH_SIZE = 16
GPU_BATCH_SIZE = 256


def cpu_supports_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run several times faster than fp32. Without them bf16 is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(device: str, field: str = "train.device") -> str:
    """'auto' is a CUDA GPU where there is one, then Apple's MPS, then the CPU; a device asked for by name that
    is not there is one line naming `field`."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if mps_available() else "cpu"
    kind = device.split(":")[0]  # "cuda:1", as torch names a process's own GPU, is a CUDA device too
    if kind == "cuda" and not torch.cuda.is_available():
        raise LorafitError(f"{field}: cuda requested but no CUDA GPU is visible; use --device auto or cpu")
    if kind == "mps" and not mps_available():
        raise LorafitError(f"{field}: mps requested but Apple MPS is not available; use --device auto or cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise LorafitError(f"{field}: unknown device '{device}'; use auto, cpu, cuda or mps")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """Training's precision: 'auto' is bf16 where the CPU or GPU computes it fast, fp16 on GPUs without bf16."""
    if precision != "auto":
        if precision == "fp16" and device == "cpu":
            raise LorafitError("train.precision: fp16 needs a GPU; use bf16 or fp32 on the CPU")
        return precision
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device == "cpu":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return "fp32"  # MPS autocast covers few ops; fp32 is the safe default there


def inference_precision(precision: str, device: str) -> str:
    """Prediction's precision: 'auto' is bf16 on a CUDA GPU that has it and fp32 elsewhere (on a CPU bf16 autocast
    is a choice the user makes: it changes the logits slightly, and pays only with AVX512-BF16 or AMX)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise LorafitError(f"precision '{precision}': use auto, fp32 or bf16")
    if precision != "auto":
        return precision
    return "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"


def inference_batch_size(batch_size: Union[str, int], device: str) -> int:
    """Texts per forward: 'auto' is GPU-sized on a GPU, small on a CPU."""
    if batch_size == "auto":
        return CPU_BATCH_SIZE if device == "cpu" else GPU_BATCH_SIZE
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LorafitError(f"batch_size {batch_size!r}: use auto or a whole number of at least 1")
    return batch_size
