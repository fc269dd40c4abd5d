"""Hyperparameter search wall time: `lorafit search` against the Optuna + Trainer + PEFT script users write today.

Both run the same study: the same search space (lorafit's default, the seed's: lr, batch size, accumulation,
weight decay, LoRA r / alpha / dropout, target modules, layers), the same TPE sampler with the same seed and
startup trials, the same median pruner on the validation accuracy of each epoch, the same 1M-parameter
budget, the same rows (lorafit's split of the bundled AG News sample), the same embedded MiniLM, epochs and
max length. Each contender runs in its own fresh process, one after the other. Prints the wall time of each
study, the ratio, both best validation accuracies, and the CPU (bench/cpu_kernels.py).

The peer builds a fresh model and Trainer per trial (tokenising with datasets.map, dynamic padding with
DataCollatorWithPadding), counts the trainable parameters of the built model and prunes it when over the budget,
and reports each epoch's validation accuracy to Optuna. lorafit counts the parameters on a meta skeleton before
building anything and shares one tokenisation and one frozen-prefix cache across trials with the same frozen
layers.

    python bench/search.py                                         # 20 trials, 1 epoch each
    python bench/search.py --n-trials 3 --max-train-samples 200 --max-eval-samples 100   # smoke test

Contenders: peer (fp32, the Trainer's default), peer-bf16 (the same script with the Trainer's bf16=True; run only
on a CPU with bf16 units, where lorafit's precision: auto trains in bf16 too) and lorafit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import report_result, run_child

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONTENDERS = ["peer", "peer-bf16", "lorafit"]


def base_overrides(args) -> dict:
    """The fixed part of the study, as lorafit config leaves; the peer reads the same values."""
    values = {"epochs": args.epochs, "checkpoint_every": None, "eval_every": None}
    if args.max_train_samples:
        values["max_train_samples"] = args.max_train_samples
    if args.max_eval_samples:
        values["max_eval_samples"] = args.max_eval_samples
    return values


def sampler_and_pruner(args):
    """The one sampler and pruner both contenders use (lorafit's defaults for search.sampler / search.pruner)."""
    import optuna

    from lorafit.config import SearchConfig
    from lorafit.search import make_pruner

    s = SearchConfig(sampler_seed=args.sampler_seed)
    sampler = optuna.samplers.TPESampler(seed=s.sampler_seed, n_startup_trials=s.startup_trials, constant_liar=True)
    return sampler, make_pruner(s)


def run_lorafit(args) -> dict:
    # the libraries both contenders use are imported before the clock starts, as run_peer imports them before its
    # t0; lorafit imports them lazily, which would otherwise count about 2 s of imports against it alone
    import optuna  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import lorafit

    out = Path(args.out) / "lorafit"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    result = lorafit.search(**base_overrides(args), n_trials=args.n_trials, sampler_seed=args.sampler_seed,
                            search_dir=str(out), study_name="bench", output_dir=str(out / "runs"))
    wall = time.time() - t0
    trials = result.study.trials
    return {"wall_s": round(wall, 1), "best_validation_accuracy": result.best_value,
            "test_accuracy_of_best": (result.best_test_metrics or {}).get("accuracy"),
            "trials": len(trials), "pruned": sum(t.state.name == "PRUNED" for t in trials),
            "over_budget": sum(bool(t.user_attrs.get("over_budget")) for t in trials)}


def run_peer(args, bf16: bool = False) -> dict:
    """Optuna + a fresh Trainer + PEFT model per trial: the objective users glue together today. `bf16`: the
    Trainer's own bf16 mixed precision (`bf16=True`, CPU autocast), the strongest peer on a CPU with bf16 units."""
    import numpy as np
    import optuna
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    from lorafit.config import Config
    from lorafit.data import load_data
    from lorafit.model import find_target_modules, resolve_model_path
    from lorafit.search import search_config, suggest

    cfg = search_config(Config(), **base_overrides(args))
    space, budget = cfg.search.space, cfg.model.param_budget
    t0 = time.time()
    bundle = load_data(cfg.data, cfg.train.seed)  # the very rows lorafit trains and validates on
    path = resolve_model_path(cfg.model.model)
    out = Path(args.out) / "peer"
    shutil.rmtree(out, ignore_errors=True)

    def objective(trial):
        p = {**cfg.train.model_dump(), **cfg.model.model_dump(), **suggest(trial, space)}
        tok = AutoTokenizer.from_pretrained(path)

        def dataset(split):
            ds = Dataset.from_dict({"text": split.texts, "label": split.labels.tolist()})
            return ds.map(lambda b: tok(b["text"], truncation=True, max_length=cfg.data.max_length), batched=True,
                          remove_columns=["text"])

        train_ds, val_ds = dataset(bundle.train), dataset(bundle.validation)
        torch.manual_seed(cfg.train.seed)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(bundle.label_names))
        targets = find_target_modules(model, p["target_modules"], p["lora_layers"])
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=p["lora_r"], lora_alpha=p["lora_alpha"],
                                                 lora_dropout=p["lora_dropout"], target_modules=targets))
        trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
        trial.set_user_attr("trainable_params", trainable)
        if budget is not None and trainable > budget:
            raise optuna.TrialPruned(f"{trainable} trainable parameters over the budget")

        class ReportToOptuna(TrainerCallback):
            def on_evaluate(self, targs, state, control, metrics=None, **kwargs):
                trial.report(metrics["eval_accuracy"], state.global_step)
                if trial.should_prune():
                    raise optuna.TrialPruned()

        def accuracy(pred):
            return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

        targs = TrainingArguments(
            output_dir=str(out / f"trial-{trial.number}"), per_device_train_batch_size=p["batch_size"],
            per_device_eval_batch_size=cfg.train.eval_batch_size, gradient_accumulation_steps=p["grad_accum_steps"],
            num_train_epochs=args.epochs, learning_rate=p["learning_rate"], weight_decay=p["weight_decay"],
            warmup_steps=cfg.train.warmup_ratio, lr_scheduler_type="linear", eval_strategy="epoch",
            save_strategy="no", logging_steps=50, report_to=[], use_cpu=True, seed=cfg.train.seed,
            dataloader_num_workers=0, disable_tqdm=True, bf16=bf16,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=val_ds,
                          data_collator=DataCollatorWithPadding(tok), compute_metrics=accuracy,
                          callbacks=[ReportToOptuna()])
        trainer.train()
        return max(h["eval_accuracy"] for h in trainer.state.log_history if "eval_accuracy" in h)

    sampler, pruner = sampler_and_pruner(args)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    # like lorafit's n_trials, over-budget proposals do not count as trials
    while sum(1 for t in study.trials if not t.user_attrs.get("trainable_params", 0) > (budget or float("inf"))
              and t.state.name in ("COMPLETE", "PRUNED")) < args.n_trials:
        study.optimize(objective, n_trials=1)
    wall = time.time() - t0
    return {"wall_s": round(wall, 1), "best_validation_accuracy": study.best_value, "test_accuracy_of_best": None,
            "trials": len(study.trials), "pruned": sum(t.state.name == "PRUNED" for t in study.trials),
            "over_budget": sum(1 for t in study.trials if t.user_attrs.get("trainable_params", 0) > (budget or 1e18))}


def cpu_description() -> str:
    kernels = subprocess.run([sys.executable, str(Path(__file__).with_name("cpu_kernels.py"))], capture_output=True,
                             text=True)
    return kernels.stdout.strip()  # its first line is common.cpu_summary: the CPU, its cores, torch's view of it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-trials", type=int, default=20)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--sampler-seed", type=int, default=0)
    parser.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated: peer,peer-bf16,lorafit")
    parser.add_argument("--out", default="bench/out/search")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = run_lorafit(args) if args.worker == "lorafit" else run_peer(args, bf16=args.worker == "peer-bf16")
        report_result(result)
        return

    results = {}
    from lorafit.runtime import cpu_supports_bf16

    # every flag but --only goes to the workers ("--only x" as well as "--only=x")
    passed, argv = [], iter(sys.argv[1:])
    for a in argv:
        if a == "--only":
            next(argv, None)
        elif not a.startswith("--only="):
            passed.append(a)
    for name in args.only.split(","):
        if name == "peer-bf16" and not cpu_supports_bf16():
            print("peer-bf16 skipped: this CPU has no bf16 units (bf16 autocast would only be slower)", flush=True)
            continue
        print(f"running {name} ...", flush=True)
        result, error = run_child([sys.executable, __file__, *passed, "--worker", name])
        if result is None:
            print(f"{name} failed:\n{error}")
            continue
        results[name] = result
        print(f"  {name}: {results[name]}", flush=True)

    print(f"\n{args.n_trials} trials, {args.epochs:g} epoch(s) each, sampler seed {args.sampler_seed}")
    print(f"{'contender':<11}{'wall s':>9}{'x peer':>8}{'x peer-bf16':>13}{'best val acc':>14}{'trials':>8}"
          f"{'pruned':>8}{'over budget':>13}")

    def ratio(peer: str, r: dict) -> str:
        return f"{results[peer]['wall_s'] / r['wall_s']:.2f}" if peer in results else "-"

    for name, r in results.items():
        print(f"{name:<11}{r['wall_s']:>9.0f}{ratio('peer', r):>8}{ratio('peer-bf16', r):>13}"
              f"{r['best_validation_accuracy']:>14.4f}{r['trials']:>8}{r['pruned']:>8}{r['over_budget']:>13}")
    print("\nCPU: " + cpu_description())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"\nresults in {out / 'results.json'}")


if __name__ == "__main__":
    main()
