"""Matmul throughput of this CPU in the dtypes lorafit can train in, at the shapes of a MiniLM training step.

Decides which path pays on a given machine: bf16 only where the CPU has bf16 units (AVX512-BF16 / AMX; elsewhere
it is emulated and far slower than fp32), int8 through fbgemm's dynamic-quantised linear on x86 CPUs (the
frozen-weight path of fp32 training, lorafit.frozen), fp32 everywhere.

    python bench/cpu_kernels.py
"""

from __future__ import annotations

import os
import platform
import time
import warnings

import torch


def gflops(fn, flop: float, repeat: int = 30) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return flop * repeat / (time.perf_counter() - t0) / 1e9


def cpu_summary() -> str:
    """One line naming the CPU and what lorafit can use on it; benchmark headers print it."""
    from lorafit.frozen import int8_available
    from lorafit.train import cpu_supports_bf16

    try:
        name = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return (f"{name}, {os.cpu_count()} cores; torch {torch.__version__}, {torch.get_num_threads()} threads, CPU "
            f"capability {torch.backends.cpu.get_cpu_capability()}, bf16 units: {cpu_supports_bf16()}, "
            f"fbgemm int8: {int8_available()}")


def main() -> None:
    from lorafit.frozen import Int8Weight, int8_available

    print(cpu_summary())
    rows = 16 * 56  # a batch of 16 AG News texts, ~56 tokens each
    print(f"{'shape (rows x in -> out)':<28}{'fp32':>10}{'bf16':>10}{'int8':>10}  GFLOP/s")
    for k, n in [(384, 384), (384, 1536), (1536, 384)]:
        x, linear = torch.randn(rows, k), torch.nn.Linear(k, n).requires_grad_(False)
        flop = 2 * rows * k * n
        fp32 = gflops(lambda: linear(x), flop)
        xb, wb = x.bfloat16(), linear.weight.bfloat16()
        bf16 = gflops(lambda: torch.nn.functional.linear(xb, wb), flop, repeat=3)
        int8 = float("nan")
        if int8_available():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = Int8Weight(linear, x.abs().amax(0))
            int8 = gflops(lambda: q(x), flop)
        print(f"{f'{rows} x {k} -> {n}':<28}{fp32:>10.1f}{bf16:>10.1f}{int8:>10.1f}")


if __name__ == "__main__":
    main()
