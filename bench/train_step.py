"""Step-level ablation of lorafit's CPU training paths that are not config switches.

Runs the default recipe's training step (cached prefix, the adapted top layers, batch 16, the precision
`train.precision: auto` picks on this machine) for a fixed number of steps, once with every path on and once with
each path off, each variant in a fresh process, and prints samples/s and the ratio to the default. The paths:

  frozen-bf16      under bf16: frozen Linear weights held in bf16 during training (frozen.frozen_linears)
  frozen-int8      under fp32: frozen weights' forward matmuls in int8 (frozen.frozen_linears; a config switch,
                   train.int8_frozen_weights, here for the step-level view)
  fused-lora       under fp32: each LoRA layer as one autograd node (frozen._LoraLinear) instead of PEFT's forward
  math-attention   SDPA's math kernel for CPU training instead of the fused flash kernel (train.training_attention)
  fast-dropout     the byte-mask dropout (model.FastDropout) instead of nn.Dropout
  fused-adamw      AdamW(fused=True)
  no-attention-dropout, pad-multiple-8: config switches, here for the step-level view (the whole-run view is
                   bench/train_throughput.py)

    python bench/train_step.py                 # all variants, 150 steps each (about 6 min on 2 cores)
    python bench/train_step.py --steps 60 --only default,torch-dropout
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = {  # name: the one path switched off
    "default": None,
    "no-frozen-bf16": "frozen_bf16",
    "no-int8": "frozen_int8",
    "peft-lora": "fused_lora",
    "flash-attention": "math_attention",
    "torch-dropout": "fast_dropout",
    "unfused-adamw": "fused_adamw",
    "attention-dropout": "no_attention_dropout",
    "no-pad-multiple": "pad_multiple",
}


def run_variant(name: str, steps: int, warmup: int, rows: int) -> dict:
    import torch
    import torch.nn.functional as F

    from lorafit.config import Config
    from lorafit.data import Collator, EncodedDataset, LengthGroupedBatches, load_data, pad_token_id
    from lorafit.model import load_tokenizer, prepare_model
    from lorafit.frozen import frozen_linears
    from lorafit.prefix_cache import FrozenPrefix
    from lorafit.runtime import resolve_precision
    from lorafit.train import (calibrate_int8_on_sample, encode_splits, fast_dropout, frozen_mode, param_groups_of,
                               training_attention)

    off = VARIANTS[name]
    cfg = Config().with_overrides({"max_train_samples": rows})
    if off == "no_attention_dropout":
        cfg = cfg.with_overrides({"attention_dropout": None})
    if off == "pad_multiple":
        cfg = cfg.with_overrides({"pad_to_multiple_of": None})
    torch.manual_seed(cfg.train.seed)
    bundle = load_data(cfg.data, cfg.train.seed)
    tok = load_tokenizer(cfg.model.model)
    enc = encode_splits(bundle, tok, cfg)["train"]
    model, _ = prepare_model(cfg.model, len(bundle.label_names), bundle.label_names)
    if off != "fast_dropout":  # the recipe's train.fast_dropout path, entered for the rest of the process
        fast_dropout(model).__enter__()
    precision = resolve_precision("auto", "cpu")
    mode = frozen_mode(cfg, precision, "cpu")
    applies = {"frozen_bf16": mode == "bf16", "frozen_int8": mode == "int8", "fused_lora": precision == "fp32"}
    if not applies.get(off, True):
        return {"skipped": f"not a path of {precision} training on this CPU"}
    if off == "frozen_bf16":
        mode = "plain"  # no frozen_linears at all: autocast casts the fp32 weights at every call
    elif off == "frozen_int8":
        mode = None  # fp32 frozen weights (LoRA layers still fused)
    bf16 = precision == "bf16"
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    sampler = LengthGroupedBatches([len(x) for x in enc.input_ids], cfg.train.batch_size, cfg.train.seed, True)
    loader = torch.utils.data.DataLoader(EncodedDataset(enc), batch_sampler=sampler,
                                         collate_fn=Collator(pad_token_id(tok), cfg.train.pad_to_multiple_of))
    optimizer = torch.optim.AdamW(param_groups_of(model, cfg), lr=cfg.train.learning_rate, fused=off != "fused_adamw")
    trainable = [p for p in model.parameters() if p.requires_grad]
    paths = contextlib.nullcontext() if mode == "plain" else frozen_linears(model, mode, fuse_lora=off != "fused_lora")
    with paths:
        prefix = FrozenPrefix.maybe(model, torch.bfloat16 if bf16 else torch.float32)
        prefix.compute("train", enc, cfg.train.eval_batch_size, pad_token_id(tok), "cpu", autocast if bf16 else None)
        calibrate_int8_on_sample(model, enc, prefix, pad_token_id(tok), "cpu")  # as train.py does (a no-op without int8)
        model.train()
        attention = contextlib.nullcontext if off == "math_attention" else lambda: training_attention(torch.device("cpu"))

        def step(batch) -> int:
            with attention(), autocast():
                logits = prefix.logits(model, batch, "train", "cpu")
            loss = F.cross_entropy(logits.float(), batch["labels"], label_smoothing=cfg.train.label_smoothing)
            with attention():
                loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return len(batch["labels"])

        batches = itertools.cycle(list(loader))  # every variant sees the same batches in the same order
        for batch in itertools.islice(batches, warmup):
            step(batch)
        t0, samples = time.perf_counter(), 0
        for batch in itertools.islice(batches, steps):
            samples += step(batch)
        elapsed = time.perf_counter() - t0
    return {"samples_per_s": round(samples / elapsed, 1), "ms_per_step": round(elapsed / steps * 1000, 1),
            "precision": precision, "frozen": mode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=30, help="untimed steps first (kernel caches, allocator)")
    ap.add_argument("--rows", type=int, default=1600, help="training rows to cache and cycle through")
    ap.add_argument("--only", default=None, help="comma-separated variants")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps, args.warmup, args.rows)))
        return
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    results = {}
    for name in names:
        out = subprocess.run([sys.executable, __file__, "--variant", name, "--steps", str(args.steps),
                              "--warmup", str(args.warmup), "--rows", str(args.rows)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        if "skipped" in result:
            print(f"{name:20s} skipped: {result['skipped']}", flush=True)
            continue
        results[name] = result
        print(f"{name:20s} {results[name]['samples_per_s']:8.1f} samples/s  {results[name]['ms_per_step']:7.1f} ms/step",
              flush=True)
    base = results.get("default")
    if base:
        print("\nthe default's speed over each variant (the speed-up the switched-off path brings):")
        for name, r in results.items():
            if name != "default":
                print(f"  {name:20s} {base['samples_per_s'] / r['samples_per_s']:.2f}x")


if __name__ == "__main__":
    main()
