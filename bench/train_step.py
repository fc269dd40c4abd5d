"""Step-level ablation of lorafit's CPU training paths: the recipe's own step (recipe.TrainingRecipe.train_step),
timed with every path on and with each path off.

Each variant sets up the default recipe in a fresh process (cached prefix, the adapted top layers, batch 16, the
precision `train.precision: auto` picks on this machine, on --rows training rows), then times `train_step` on
the recipe's own batches for a fixed number of steps, and prints samples/s and the ratio to the default. The
paths, each applied by forward_pass.apply() (or, for the optimizer, by the recipe):

  frozen-bf16      under bf16: frozen Linear weights held in bf16 (frozen.frozen_linears); switched off here by
                   undoing the forward pass's patches and putting fast dropout back (no config switch)
  int8             under fp32: frozen weights' forward matmuls in int8 (train.int8_frozen_weights, off by
                   default: this variant switches it on)
  fused-lora       under fp32: each LoRA layer as one autograd node (train.fused_lora)
  math-attention   SDPA's math kernel for CPU training instead of the fused flash kernel (train.cpu_attention_kernel)
  fast-dropout     the byte-mask dropout (forward_pass.FastDropout) instead of nn.Dropout (train.fast_dropout)
  fused-adamw      AdamW(fused=True); switched off here in the recipe's own optimizer, before its first step
                   (no config switch)
  no-attention-dropout, pad-multiple-8: config switches, here for the step-level view (the whole-run view is
                   bench/train_throughput.py)

    python bench/train_step.py                 # all variants, 150 steps each (about 6 min on 2 cores)
    python bench/train_step.py --steps 60 --only default,torch-dropout
    python bench/train_step.py --host-reads    # where a step reads a tensor's value on the host (a sync on a GPU)

--host-reads traces the default recipe's steps for the tensor methods called from Python that bring a value to the
host (`.item()`, a tensor in an `if`, `int(t)`, `.cpu()`, `nonzero`) and prints each place that asks, by its nearest
frame outside torch. On a CPU every
tensor is on the host, so reads of the batch's host copy show too; on a GPU only reads of device tensors sync.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

from common import cpu_summary, report_result, run_child, stepping_recipe

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# name: config overrides that switch one path off, or int8 on (None: a path without a config switch, changed below)
VARIANTS = {
    "default": {},
    "no-frozen-bf16": None,
    "int8": {"int8_frozen_weights": True},
    "peft-lora": {"fused_lora": False},
    "flash-attention": {"cpu_attention_kernel": "default"},
    "torch-dropout": {"fast_dropout": False},
    "unfused-adamw": None,
    "attention-dropout": {"attention_dropout": None},
    "no-pad-multiple": {"pad_to_multiple_of": None},
}
SWITCHED_ON = {"int8"}  # the variants that switch a path on, off by default


def run_variant(name: str, steps: int, warmup: int, rows: int) -> dict:
    from lorafit.forward_pass import fast_dropout

    with stepping_recipe({"max_train_samples": rows, "run_name": name, "max_steps": 100_000,
                          **(VARIANTS[name] or {})}) as (recipe, batches):
        frozen = recipe.forward.record["speed_paths"]["frozen_weights"]
        applies = {"no-frozen-bf16": frozen == "bf16", "int8": frozen == "int8", "peft-lora": recipe.precision == "fp32"}
        if not applies.get(name, True):
            return {"skipped": f"not a path of {recipe.precision} training on this CPU"}
        if name == "no-frozen-bf16":  # autocast casts the fp32 frozen weights at every call, as without the path
            recipe.forward.close()
            recipe.cleanup.enter_context(fast_dropout(recipe.unwrapped))  # its new modules are in training mode
            frozen = "plain"
        if name == "unfused-adamw":  # AdamW reads `fused` from its groups at every step and has no state yet
            for group in recipe.optimizer.param_groups:
                group["fused"] = False
        for batch in itertools.islice(batches, warmup):
            recipe.train_step(batch, sync=True)
        t0, samples = time.perf_counter(), 0
        for batch in itertools.islice(batches, steps):
            recipe.train_step(batch, sync=True)
            samples += len(batch["labels"])
        elapsed = time.perf_counter() - t0
    return {"samples_per_s": round(samples / elapsed, 1), "ms_per_step": round(elapsed / steps * 1000, 1),
            "precision": recipe.precision, "frozen": frozen}


# the tensor methods that bring a value to the host: on a GPU each one waits for the GPU to catch up
HOST_READS = {"item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__int__", "__float__", "__index__"}


def host_reads(steps: int, rows: int) -> dict[tuple[str, str], float]:
    """Places in the default recipe's train_step that read a tensor's value on the host, as (file:line function,
    the line's code), with their count per step."""
    import collections
    import traceback

    from torch.overrides import TorchFunctionMode

    found: collections.Counter = collections.Counter()

    class Reads(TorchFunctionMode):  # sees every torch call made from Python, the model's code too
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", None) in HOST_READS:
                asker = next(f for f in reversed(traceback.extract_stack()[:-1]) if "/torch/" not in f.filename)
                where = asker.filename.split("site-packages/")[-1].split("/src/")[-1]
                found[(f"{where}:{asker.lineno} {asker.name}", (asker.line or "").strip())] += 1
            return func(*args, **(kwargs or {}))

    with stepping_recipe({"max_train_samples": rows, "run_name": "host-reads"}) as (recipe, batches):
        recipe.train_step(next(batches), sync=True)  # the first step's one-off work stays out
        with Reads():
            for batch in itertools.islice(batches, steps):
                recipe.train_step(batch, sync=True)
    return {place: n / steps for place, n in found.most_common()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=30, help="untimed steps first (kernel caches, allocator)")
    ap.add_argument("--rows", type=int, default=1600, help="training rows to cache and cycle through")
    ap.add_argument("--only", default=None, help="comma-separated variants")
    ap.add_argument("--host-reads", action="store_true", help="list where a step reads a tensor's value on the host")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = ap.parse_args()
    if args.host_reads:
        print(cpu_summary(), flush=True)
        for (place, code), per_step in host_reads(min(args.steps, 20), args.rows).items():
            print(f"{per_step:5.1f} per step  {place}\n                {code}")
        return
    if args.variant:
        report_result(run_variant(args.variant, args.steps, args.warmup, args.rows))
        return
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    print(cpu_summary(), flush=True)
    results = {}
    for name in names:
        result, error = run_child([sys.executable, __file__, "--variant", name, "--steps", str(args.steps),
                                   "--warmup", str(args.warmup), "--rows", str(args.rows)])
        if result is None:
            sys.exit(f"{name} failed:\n{error}")
        if "skipped" in result:
            print(f"{name:20s} skipped: {result['skipped']}", flush=True)
            continue
        results[name] = result
        print(f"{name:20s} {result['samples_per_s']:8.1f} samples/s  {result['ms_per_step']:7.1f} ms/step", flush=True)
    base = results.get("default")
    if base:
        print("\nthe speed-up each path brings (default / variant; int8: variant / default):")
        for name, r in results.items():
            if name != "default":
                ratio = r["samples_per_s"] / base["samples_per_s"] if name in SWITCHED_ON else \
                    base["samples_per_s"] / r["samples_per_s"]
                print(f"  {name:20s} {ratio:.2f}x")


if __name__ == "__main__":
    main()
