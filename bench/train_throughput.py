"""Training throughput and accuracy: lorafit against the Hugging Face Trainer + PEFT script users would run.

Every contender trains on the same rows (lorafit's split of the bundled AG News sample, cleaned the same way),
the same embedded MiniLM, batch size, max length and epochs, in its own fresh process (so peak memory is its
own), one after another on the same machine. Prints samples/s, the ratio to the peer, wall time, peak memory,
and test accuracy / macro F1 on the same 1,001 test rows.

Contenders
  peer-same     Trainer + PEFT with exactly lorafit's default LoRA settings (rank, alpha, dropout, modules,
                layers), fp32, dynamic padding, random batches: the like-for-like peer for the ratio.
  peer-usual    Trainer + PEFT, the usual recipe: LoRA r=8 alpha=16 on query/value of every layer, fp32.
  lorafit       lorafit's default config.
  lorafit-*     the default with one speed option switched off, to show what each contributes.

    python bench/train_throughput.py                       # everything, 3 epochs (about 30 min on 2 cores)
    python bench/train_throughput.py --epochs 1 --only peer-same,lorafit
    python bench/train_throughput.py --epochs 20 --time-budget-minutes 3 --only peer-usual,lorafit
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from common import peak_rss_mib, report_result, run_child

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ABLATIONS = {
    "lorafit": {},
    "lorafit-fp32": {"precision": "fp32"},  # on a CPU without bf16 units this is the default's own precision
    "lorafit-int8": {"int8_frozen_weights": True},  # fp32 training only: the frozen weights' matmuls in int8
    "lorafit-top3": {"lora_layers": [-3, -2, -1]},  # adapters on the top 3 layers instead of 2
    "lorafit-no-cache": {"cache_frozen_prefix": False},
    "lorafit-no-grouping": {"group_by_length": False},
    "lorafit-no-pad-multiple": {"pad_to_multiple_of": None},
    "lorafit-attention-dropout": {"attention_dropout": None},  # the checkpoint's 0.1
}
CONTENDERS = ["peer-same", "peer-usual", *ABLATIONS]


def run_lorafit(name: str, args) -> dict:
    import lorafit

    overrides = dict(ABLATIONS[name], epochs=args.epochs, output_dir=args.out, run_name=name, overwrite=True,
                     log_every=50, checkpoint_every=None)
    if args.time_budget_minutes:
        overrides["time_budget_minutes"] = args.time_budget_minutes
    if args.max_train_samples:
        overrides["max_train_samples"] = args.max_train_samples
    t0 = time.time()
    run = lorafit.train(**overrides)
    wall = time.time() - t0
    return {"samples_per_s": run.info["train_samples_per_s"], "train_time_s": run.info["train_time_s"],
            "wall_s": round(wall, 1), "accuracy": run.test_metrics["accuracy"], "f1_macro": run.test_metrics["f1_macro"],
            "precision": _precision(json.loads((run.path / "run.json").read_text()))}


def _precision(record: dict) -> str:
    """'fp32', 'bf16', or 'fp32+int8' where the frozen weights ran in int8."""
    return record["precision"] + ("+int8" if record.get("frozen_weights") == "int8" else "")


def run_peer(name: str, args, overrides: Optional[dict] = None) -> dict:
    """The script a user writes today: datasets.map tokenization, DataCollatorWithPadding, Trainer, PEFT.
    `overrides` (config leaf names: seed, max_eval_samples, ...) change the rows and seed it shares with lorafit."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    from lorafit.config import Config
    from lorafit.data import load_data
    from lorafit.model import find_target_modules, resolve_model_path

    cfg = Config().with_overrides(overrides or {})
    if args.max_train_samples:
        cfg = cfg.with_overrides({"max_train_samples": args.max_train_samples})
    bundle = load_data(cfg.data, cfg.train.seed)  # the very rows lorafit trains and tests on
    path = resolve_model_path(cfg.model.model)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(cfg.train.seed)
    extra = {}
    if name == "peer-same" and cfg.model.attention_dropout is not None:
        extra["attention_probs_dropout_prob"] = cfg.model.attention_dropout  # lorafit's default drops it
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(bundle.label_names), **extra)
    if name == "peer-same":
        # lorafit's default adapters, named the way PEFT users name them
        targets = find_target_modules(model, cfg.model.target_modules, cfg.model.lora_layers)
        lora = LoraConfig(task_type="SEQ_CLS", r=cfg.model.lora_r, lora_alpha=cfg.model.lora_alpha,
                          lora_dropout=cfg.model.lora_dropout, target_modules=targets)
        lr = cfg.train.learning_rate
    else:
        lora = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])
        lr = 5e-4
    model = get_peft_model(model, lora)

    def dataset(split):
        ds = Dataset.from_dict({"text": split.texts, "label": split.labels.tolist()})
        return ds.map(lambda b: tok(b["text"], truncation=True, max_length=cfg.data.max_length), batched=True,
                      remove_columns=["text"])

    train_ds, val_ds, test_ds = dataset(bundle.train), dataset(bundle.validation), dataset(bundle.test)

    def metrics(p):
        preds = p.predictions.argmax(-1)
        return {"accuracy": accuracy_score(p.label_ids, preds), "f1_macro": f1_score(p.label_ids, preds, average="macro")}

    targs = TrainingArguments(
        output_dir=str(Path(args.out) / name), per_device_train_batch_size=cfg.train.batch_size,
        per_device_eval_batch_size=cfg.train.eval_batch_size, num_train_epochs=args.epochs, learning_rate=lr,
        weight_decay=0.01, warmup_steps=cfg.train.warmup_ratio,  # transformers 5: a float < 1 is a ratio
        lr_scheduler_type="linear", eval_strategy="epoch",
        save_strategy="no", logging_steps=50, report_to=[], use_cpu=True, seed=cfg.train.seed, dataloader_num_workers=0,
    )
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        """The peer's equivalent of --time-budget-minutes: stop when the wall clock runs out."""

        def __init__(self, minutes):
            self.deadline = time.time() + minutes * 60 if minutes else None

        def on_step_end(self, args_, state, control, **kwargs):
            if self.deadline and time.time() > self.deadline:
                control.should_training_stop = True
            return control

    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=val_ds,
                      data_collator=DataCollatorWithPadding(tok), compute_metrics=metrics,
                      callbacks=[TimeBudget(args.time_budget_minutes)])
    t0 = time.time()
    out = trainer.train()
    train_time = time.time() - t0
    test = trainer.evaluate(test_ds, metric_key_prefix="test")
    samples = trainer.state.global_step * cfg.train.batch_size  # the last batch of an epoch may be smaller
    # like lorafit's, the peer's throughput counts training only: its per-epoch evaluations are taken out
    eval_time = sum(h.get("eval_runtime", 0.0) for h in trainer.state.log_history)
    train_only = train_time - eval_time
    return {"samples_per_s": round(min(samples, len(train_ds) * args.epochs) / train_only, 2),
            "train_time_s": round(train_only, 1),
            "wall_s": round(time.time() - t0, 1), "accuracy": test["test_accuracy"], "f1_macro": test["test_f1_macro"],
            "precision": "fp32", "trainer_samples_per_s": out.metrics.get("train_samples_per_second")}


def worker(name: str, args) -> None:
    result = run_peer(name, args) if name.startswith("peer") else run_lorafit(name, args)
    result["peak_rss_mb"] = round(peak_rss_mib(), 1)
    report_result(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated contenders")
    parser.add_argument("--time-budget-minutes", type=float, default=None,
                        help="time-to-accuracy mode: every contender trains for this wall-clock budget "
                             "(with --epochs large enough not to finish first) and reports its test accuracy")
    parser.add_argument("--out", default="bench/out/train_throughput")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args)
        return

    results = {}
    for name in args.only.split(","):
        cmd = [sys.executable, __file__, "--worker", name, "--epochs", str(args.epochs), "--out", args.out]
        if args.max_train_samples:
            cmd += ["--max-train-samples", str(args.max_train_samples)]
        if args.time_budget_minutes:
            cmd += ["--time-budget-minutes", str(args.time_budget_minutes)]
        print(f"running {name} ...", flush=True)
        result, error = run_child(cmd)
        if result is None:
            print(f"{name} failed:\n{error}")
            continue
        results[name] = result
        print(f"  {name}: {results[name]}", flush=True)

    # the goal is against peer-usual (what users run today); peer-same isolates the engineering
    bases = [b for b in ("peer-usual", "peer-same") if b in results]
    print(f"\n{'contender':<22}{'samples/s':>10}" + "".join(f"{'x ' + b:>13}" for b in bases)
          + f"{'train s':>9}{'wall s':>8}{'peak MB':>9}{'test acc':>10}{'macro F1':>10}  precision")
    for name, r in results.items():
        ratios = "".join(f"{r['samples_per_s'] / results[b]['samples_per_s']:>13.2f}" for b in bases)
        print(f"{name:<22}{r['samples_per_s']:>10.1f}{ratios}{r['train_time_s']:>9.0f}{r['wall_s']:>8.0f}"
              f"{r['peak_rss_mb']:>9.0f}{r['accuracy']:>10.4f}{r['f1_macro']:>10.4f}  {r['precision']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"epochs": args.epochs, "results": results}, indent=2))
    print(f"\nresults in {out / 'results.json'}")


if __name__ == "__main__":
    main()
