"""Does storing the frozen-prefix cache in 16 bits move validation metrics in fp32 training?

Trains the same config with the cache stored in fp32 and in fp16 (train.cache_dtype), for two seeds, and
prints validation/test accuracy and loss. The effect of fp16 storage (same seed, fp32 vs fp16) is compared with
the noise of the run itself (seed 42 vs 43, both fp32). Accuracy and loss do not depend on machine load, so
these numbers are valid on a busy machine (the timings are not printed).

    python bench/cache_precision.py                                   # embedded MiniLM, 2,000 rows, 1 epoch
    python bench/cache_precision.py --model DIR --lora-layers 1 --max-train-samples 480 --epochs 2   # a tiny model
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:all-MiniLM-L6-v2")
    parser.add_argument("--max-train-samples", type=int, default=2000)
    parser.add_argument("--max-eval-samples", type=int, default=1000)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--seeds", default="42,43")
    parser.add_argument("--lora-layers", default=None, help="e.g. 1 for a 2-layer test model (default: the config's).")
    args = parser.parse_args()

    import lorafit

    layers = {"lora_layers": [int(x) for x in args.lora_layers.split(",")]} if args.lora_layers else {}
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for dtype in ("fp32", "fp16"):
                run = lorafit.train(model=args.model, max_train_samples=args.max_train_samples,
                                    max_eval_samples=args.max_eval_samples, epochs=args.epochs, precision="fp32",
                                    cache_dtype=dtype, seed=seed, output_dir=out, run_name=f"{dtype}-{seed}",
                                    checkpoint_every=None, param_budget=None, **layers)
                rows.append((seed, dtype, run.info["best_validation_accuracy"], run.test_metrics["accuracy"],
                             run.test_metrics["loss"]))
                print(rows[-1], flush=True)
    print(f"\n{args.model}, {args.max_train_samples} train rows, {args.epochs} epochs, fp32 training\n")
    print("| seed | cache storage | validation accuracy | test accuracy | test loss |\n|---|---|---|---|---|")
    for seed, dtype, val, acc, loss in rows:
        print(f"| {seed} | {dtype} | {val:.4f} | {acc:.4f} | {loss:.4f} |")
    by = {(s, d): (v, a, l) for s, d, v, a, l in rows}
    seeds = sorted({s for s, *_ in rows})
    effect = max(abs(by[(s, "fp16")][i] - by[(s, "fp32")][i]) for s in seeds for i in range(3))
    print(f"\nlargest change from fp16 storage (same seed): {effect:.4f}")
    if len(seeds) > 1:
        noise = max(abs(by[(seeds[0], "fp32")][i] - by[(seeds[1], "fp32")][i]) for i in range(3))
        print(f"largest change from the seed alone (fp32 storage): {noise:.4f}")


if __name__ == "__main__":
    main()
