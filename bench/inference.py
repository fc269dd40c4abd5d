"""Inference speed and accuracy: lorafit's paths against the way users predict with a PEFT run.

One process, one trained run, the same texts (the run's 1,001 bundled AG News test rows, as cleaned by lorafit)
for every contender, one after another on the same machine. Prints texts/s, the ratios to the peer and to the
dynamic-padding peer, each contender's share of this CPU's roofline, accuracy and agreement with the labels of
lorafit's fp32 PyTorch model; saves the table to bench/out/inference.json.

Roofline share: useful GFLOP per text (from the model's config and each text's token count: the encoder's linear
layers and attention, no padding) x texts/s, over this CPU's peak GFLOP/s in the dtype the contender computes in
(fp32; int8 for onnx-int8; bf16 for torch-bf16), measured by bench/cpu_kernels.py's peak_gflops in the same run.

Contenders
  peer           the run loaded as users do: lorafit's base model + PeftModel.from_pretrained(run/model) (adapter
                 not merged), texts tokenized with padding="max_length" (max_length of the run) in datasets.map,
                 predicted with transformers Trainer.predict, batch 32, fp32. For a cls-pooling run the base is
                 AutoModelForSequenceClassification; for mean pooling (the default) lorafit's MeanPoolingClassifier,
                 since Transformers has no mean-pooling classification class.
  peer-dynamic   the same Trainer.predict with dynamic padding (DataCollatorWithPadding): a stronger peer.
  torch-fp32     lorafit.load(run, backend="torch"): merged weights, inference mode, batches sorted by length.
  torch-bf16     the same under bf16 autocast.
  onnx           lorafit export -> ONNX Runtime fp32 (threads = cores), batches sorted by length.
  onnx-int8      the same, dynamically int8-quantised.

A run with the TF-IDF blend (model.tfidf_weight > 0, the default since 2026-12-02): lorafit's contenders predict with
it, as lorafit.load does (its vectorisation counts in their texts/s; the roofline share counts the encoder's GFLOP
only); the peers, as users load a PEFT run, predict with the encoder alone.

    python bench/inference.py                              # trains a short run first (a few minutes on 2 cores)
    python bench/inference.py --run bench/out/runs/minilm-inference
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from common import best_time, command_line, cpu_name  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
DTYPE = {"onnx-int8": "int8", "torch-bf16": "bf16"}  # every other contender computes in fp32


def intermediate_size(config) -> int:
    return getattr(config, "intermediate_size", None) or config.hidden_dim  # DistilBERT names it hidden_dim


def gflop_per_text(config, token_counts) -> float:
    """Mean useful GFLOP per text of an encoder: per layer 2*T*(4h^2 + 2*h*i) for the projections and feed-forward,
    4*T^2*h for attention scores and their weighted sum (T tokens, no padding)."""
    h, i, layers = config.hidden_size, intermediate_size(config), config.num_hidden_layers
    t = np.asarray(token_counts, dtype=np.float64)
    return float((layers * (2 * t * (4 * h * h + 2 * h * i) + 4 * t * t * h)).mean() / 1e9)


def peer_predict(run_dir: Path, texts: list[str], batch_size: int, dynamic: bool):
    """Base + PEFT adapter, Trainer.predict: what a PEFT user writes. Returns (load seconds, predict function)."""
    import datasets
    from peft import PeftModel
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from lorafit.config import Config
    from lorafit.model import build_base
    from lorafit.rundir import read_labels

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    cfg = Config.from_yaml(run_dir / "config.yaml")
    labels = read_labels(run_dir)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    model = PeftModel.from_pretrained(build_base(cfg.model, len(labels), labels), run_dir / "model").eval()
    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="peer-"), per_device_eval_batch_size=batch_size,
                             report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args,
                      data_collator=DataCollatorWithPadding(tokenizer) if dynamic else None)
    load_s = time.perf_counter() - t0

    def run():
        padding = False if dynamic else "max_length"
        ds = datasets.Dataset.from_dict({"text": texts}).map(
            lambda b: tokenizer(b["text"], truncation=True, max_length=cfg.data.max_length, padding=padding),
            batched=True, remove_columns=["text"])
        return trainer.predict(ds).predictions

    return load_s, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="A completed run (default: train one of the embedded model).")
    ap.add_argument("--max-train-samples", type=int, default=1000)
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--batch-size", type=int, default=32, help="Peer batch size (Trainer per_device_eval_batch_size).")
    ap.add_argument("--lorafit-batch-size", type=int, default=None,
                    help="Texts per forward for lorafit's contenders (default: lorafit.load's, 16).")
    ap.add_argument("--repeat", type=int, default=2, help="Timed repetitions per contender (best is kept).")
    ap.add_argument("--only", help="Comma-separated contenders to run (default: all).")
    args = ap.parse_args()

    import lorafit
    from lorafit.export import export_onnx

    run_dir = args.run
    if run_dir is None:
        print(f"training the embedded model on {args.max_train_samples} rows for {args.epochs} epoch(s)...", flush=True)
        run_dir = lorafit.train(max_train_samples=args.max_train_samples, epochs=args.epochs, output_dir=str(OUT / "runs"),
                                run_name="minilm-inference", overwrite=True, checkpoint_every=None).path
    run_dir = Path(run_dir)
    test = pd.read_csv(run_dir / "test_predictions.csv", dtype={"text": str}, keep_default_na=False)
    texts, truth_names = test["text"].tolist(), test["label"].astype(str).to_numpy()
    labels = lorafit.rundir.read_labels(run_dir)
    truth = np.array([labels.index(n) for n in truth_names])
    pooling = lorafit.Config.from_yaml(run_dir / "config.yaml").model.pooling

    t0 = time.perf_counter()
    export = export_onnx(run_dir, int8=True)
    export_s = time.perf_counter() - t0
    print(f"exported ONNX fp32 + int8 in {export_s:.1f}s", flush=True)

    contenders = ["peer", "peer-dynamic", "torch-fp32", "torch-bf16", "onnx", "onnx-int8"]
    if args.only:
        contenders = [c for c in contenders if c in args.only.split(",")]
    rows: dict[str, dict] = {}
    for name in contenders:
        if name.startswith("peer"):
            load_s, fn = peer_predict(run_dir, texts, args.batch_size, dynamic=name == "peer-dynamic")
            fn_texts = fn
        else:
            t0 = time.perf_counter()
            backend = "torch" if name.startswith("torch") else name
            sizes = {} if args.lorafit_batch_size is None else {"batch_size": args.lorafit_batch_size}
            clf = lorafit.load(run_dir, backend=backend, precision="bf16" if name == "torch-bf16" else "fp32", **sizes)
            load_s = time.perf_counter() - t0
            fn_texts = lambda clf=clf: clf.decision_function(texts)  # noqa: E731
        seconds, logits = best_time(fn_texts, args.repeat)
        pred = np.asarray(logits).argmax(-1)
        rows[name] = {"texts_per_s": len(texts) / seconds, "seconds": seconds, "load_s": load_s,
                      "accuracy": float((pred == truth).mean()), "pred": pred}
        print(f"  {name:13s} {rows[name]['texts_per_s']:8.1f} texts/s  accuracy {rows[name]['accuracy']:.4f}", flush=True)

    # the roofline: useful compute per text, and this CPU's peak per dtype, measured now (after the contenders, so
    # the kernel loops do not warm or heat anything for one of them)
    from cpu_kernels import peak_gflops
    from lorafit.data import encode

    ref_clf = lorafit.load(run_dir, backend="torch")
    model_config = ref_clf.model.config
    enc = encode(ref_clf.tokenizer, texts, ref_clf.max_length, full_lengths=False)
    mean_tokens = float(np.mean([len(x) for x in enc.input_ids]))
    per_text = gflop_per_text(model_config, [len(x) for x in enc.input_ids])
    peaks = peak_gflops(model_config.hidden_size, intermediate_size(model_config), rows=16 * max(1, round(mean_tokens)))

    # the blend's own part of lorafit's contenders: vectorising the texts and mixing the probabilities, all texts
    # at once as Classifier.decision_function does
    blend = None
    if ref_clf.tfidf is not None:
        zeros = np.zeros((len(texts), len(labels)), dtype=np.float32)
        seconds, _ = best_time(lambda: ref_clf.tfidf.blend(zeros, texts), args.repeat)
        blend = {"seconds": round(seconds, 4), "us_per_text": round(1e6 * seconds / len(texts), 1),
                 "share_of": {n: round(seconds / r["seconds"], 4) for n, r in rows.items() if not n.startswith("peer")}}

    ref = rows.get("torch-fp32", {}).get("pred")
    peer = rows.get("peer", {}).get("texts_per_s")
    peer_dynamic = rows.get("peer-dynamic", {}).get("texts_per_s")
    print(f"\n{cpu_name()}: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; peak GFLOP/s fp32 {peaks['fp32']:.1f}, int8 {peaks['int8']:.1f}, "
          f"bf16 {peaks['bf16']:.1f} (bench/cpu_kernels.py, this run)")
    print(f"run {run_dir} ({pooling} pooling), {len(texts)} texts, {mean_tokens:.1f} tokens and {per_text:.3f} GFLOP "
          f"per text on average")
    print(f"{'contender':14s} {'texts/s':>9s} {'x peer':>7s} {'x peer-dyn':>11s} {'roofline':>13s} {'accuracy':>9s} "
          f"{'agree fp32':>11s} {'load s':>7s}")
    table = []
    for name, r in rows.items():
        agree = float((r["pred"] == ref).mean()) if ref is not None else None
        ratio = r["texts_per_s"] / peer if peer else None
        ratio_dynamic = r["texts_per_s"] / peer_dynamic if peer_dynamic else None
        dtype = DTYPE.get(name, "fp32")
        share = per_text * r["texts_per_s"] / peaks[dtype] if peaks[dtype] > 0 else float("nan")
        print(f"{name:14s} {r['texts_per_s']:9.1f} {ratio or float('nan'):7.2f} {ratio_dynamic or float('nan'):11.2f} "
              f"{f'{100 * share:.1f}% {dtype}':>13s} {100 * r['accuracy']:8.2f}% "
              f"{'' if agree is None else f'{100 * agree:10.2f}%'} {r['load_s']:7.1f}")
        table.append({"contender": name, "texts_per_s": round(r["texts_per_s"], 1), "ratio_to_peer": ratio and round(ratio, 2),
                      "ratio_to_peer_dynamic": ratio_dynamic and round(ratio_dynamic, 2), "dtype": dtype,
                      "roofline_share": round(share, 4), "accuracy": r["accuracy"], "agreement_with_torch_fp32": agree,
                      "seconds": round(r["seconds"], 3), "load_s": round(r["load_s"], 2)})
    if blend is not None:
        shares = ", ".join(f"{n} {100 * v:.1f}%" for n, v in blend["share_of"].items())
        print(f"TF-IDF blend (weight {ref_clf.tfidf.weight:g}) alone: {blend['seconds']:.3f} s for the {len(texts)} texts, "
              f"{blend['us_per_text']:.0f} us per text; its share of each lorafit contender's time: {shares}")
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"run": str(run_dir), "pooling": pooling, "n_texts": len(texts), "peer_batch_size": args.batch_size,
              "lorafit_batch_size": args.lorafit_batch_size or inspect.signature(lorafit.load).parameters["batch_size"].default,
              "repeat": args.repeat, "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "mean_tokens": round(mean_tokens, 1), "gflop_per_text": round(per_text, 4),
              "peak_gflops": {k: round(v, 1) for k, v in peaks.items()},
              "export_s": round(export_s, 1), "export_check": export.get("check"), "table": table, "tfidf_blend": blend,
              "command": command_line()}
    (OUT / "inference.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {OUT / 'inference.json'}")


if __name__ == "__main__":
    main()
