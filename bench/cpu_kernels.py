"""Matmul throughput of this CPU in the dtypes lorafit can train in, at the shapes of a MiniLM training step.

Decides which path pays on a given machine: bf16 only where the CPU has bf16 units (AVX512-BF16 / AMX; elsewhere
it is emulated and far slower than fp32), int8 through fbgemm's dynamic-quantised linear on x86 CPUs (the
frozen-weight path of fp32 training, lorafit.frozen), fp32 everywhere.

    python bench/cpu_kernels.py
"""

from __future__ import annotations

import time
import warnings

import torch

from common import cpu_summary


def gflops(fn, flop: float, repeat: int = 30) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return flop * repeat / (time.perf_counter() - t0) / 1e9


def kernel_gflops(rows: int = 16 * 56, shapes=((384, 384), (384, 1536), (1536, 384))) -> list[dict]:
    """GFLOP/s of a frozen linear layer per shape (rows x in -> out) in fp32, bf16 and int8 (nan: not available)."""
    from lorafit.frozen import Int8Weight, int8_available

    out = []
    for k, n in shapes:
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
        out.append({"rows": rows, "in": k, "out": n, "fp32": fp32, "bf16": bf16, "int8": int8})
    return out


def peak_gflops(hidden: int = 384, intermediate: int = 1536, rows: int = 16 * 56) -> dict[str, float]:
    """This CPU's best measured GFLOP/s per dtype at an encoder's linear shapes: the roofline for inference."""
    table = kernel_gflops(rows, ((hidden, hidden), (hidden, intermediate), (intermediate, hidden)))
    return {dtype: max(r[dtype] for r in table) for dtype in ("fp32", "bf16", "int8")}


def main() -> None:
    print(cpu_summary())
    print(f"{'shape (rows x in -> out)':<28}{'fp32':>10}{'bf16':>10}{'int8':>10}  GFLOP/s")
    for r in kernel_gflops():
        shape = f"{r['rows']} x {r['in']} -> {r['out']}"
        print(f"{shape:<28}{r['fp32']:>10.1f}{r['bf16']:>10.1f}{r['int8']:>10.1f}")


if __name__ == "__main__":
    main()
