"""Where and in what arithmetic lorafit runs: the device and precision choices that training and every inference
command share, resolved the same way everywhere ('auto' means the same thing in `train` and in `predict`)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Optional, Union

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


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device_type: str):
    """The context a forward runs in at `precision`: autocast to bf16/fp16, or nothing in fp32. Training and
    prediction alike (lorafit applies it rather than Accelerate, whose process-wide mixed-precision state a second
    run in the same process may not change)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=AUTOCAST_DTYPES[precision])


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


# --- a training process --------------------------------------------------------------------------------------
class Runtime:
    """One training process's place, resolved once: device, precision, CPU threads, the process group and (once
    the run directory exists) the Accelerator, which prepares the model for DDP and holds the trackers.

    The process group (Accelerate's PartialState) comes first: the main process must be known before the run
    directory is created. The Accelerator shares that same process-wide state; it is made only when the run
    directory exists because its TensorBoard tracker needs the logging folder when it is constructed. It always
    runs with mixed_precision="no": a second Accelerator in the same process (a notebook, a sweep) may not change
    Accelerate's process-wide precision, so lorafit applies its own through runtime.autocast."""

    def __init__(self, cfg):
        from accelerate import PartialState

        from .trackers import trackers_of

        self.device_name = resolve_device(cfg.train.device)
        self.precision = resolve_precision(cfg.train.precision, self.device_name)
        self.trackers = trackers_of(cfg)  # a missing tracker package fails here, before any work
        self.process = PartialState(cpu=self.device_name == "cpu")
        self.main = self.process.is_main_process
        self.num_processes = self.process.num_processes
        self.process_index = self.process.process_index
        self.device = self.process.device
        self.accelerator = None

    def use_cpu_threads(self, cfg, cleanup) -> None:
        """train.num_threads (default: every core) for this run on the CPU; `cleanup` restores the caller's."""
        if self.device_name == "cpu":
            cleanup.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(cfg.train.num_threads or os.cpu_count() or 1)

    def start_accelerator(self, cfg, run_dir: Path, cleanup) -> None:
        """The Accelerator, and the trackers of train.report_to logging under the run directory."""
        from accelerate import Accelerator, DistributedDataParallelKwargs
        from accelerate.utils import ProjectConfiguration

        from .trackers import flat_config, tracker_init

        # broadcast_buffers off: the only buffers are frozen (position ids, token types) and equal on every process.
        # With the frozen-prefix cache the embeddings that own them are swapped out during the forward, and DDP's
        # per-forward buffer broadcast then fails on an empty list (`!tensors.empty() INTERNAL ASSERT FAILED`).
        # (torch 2.13 deprecates the name for forward_sync_buffers, which Accelerate's kwargs do not offer yet.)
        self.accelerator = Accelerator(
            cpu=self.device_name == "cpu", mixed_precision="no",
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)], log_with=self.trackers or None,
            project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")))
        if self.accelerator.log_with:
            project, init = tracker_init(cfg, run_dir.name, run_dir, os.environ)
            self.accelerator.init_trackers(project, config=flat_config(cfg), init_kwargs=init)
            cleanup.callback(self.accelerator.end_training)

    def track(self, split: str, values: dict, step: int) -> None:
        """A metrics row to the trackers (Accelerate logs from the main process only)."""
        if self.accelerator is not None and self.accelerator.log_with:
            self.accelerator.log({f"{split}/{k}": v for k, v in values.items()}, step=step)

    def agree(self, flags: dict[str, bool]) -> dict[str, bool]:
        """A stop decision holds for every process if it holds for one: no process may stop while another
        waits for it in a collective."""
        if self.num_processes == 1:
            return flags
        votes = self.accelerator.reduce(torch.tensor([float(v) for v in flags.values()], device=self.device), "max")
        return {name: bool(v) for name, v in zip(flags, votes.tolist())}

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` (on the CPU) summed over the processes."""
        if self.num_processes == 1:
            return values
        return self.accelerator.reduce(values.to(self.device), "sum").cpu()

    def peak_gpu_memory_gb(self) -> Optional[float]:
        return peak_gpu_memory_gb(self.device)


def peak_gpu_memory_gb(device: torch.device) -> Optional[float]:
    """The most GPU memory tensors held in this process (torch.cuda.max_memory_allocated), in GB; None off CUDA."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 3)


class StopSignals:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step and stops cleanly. A second
    signal stops at once. Handlers are installed only in the main thread, and restored on exit."""

    def __init__(self):
        self.received: Optional[str] = None
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()
