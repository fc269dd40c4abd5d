"""Tokenizing for inference: one truncating pass (data.encode(..., full_lengths=False), what prediction and the
distillation teacher use) against training's encoding, which also counts each text's untruncated length and so
tokenizes the texts longer than max_length a second time.

Texts: the bundled AG News test rows (most under 128 tokens) and the same rows joined five at a time (long
documents, all over 128 tokens), 5,000 of each; all-MiniLM-L6-v2's tokenizer (the embedded default model), one
thread (TOKENIZERS_PARALLELISM=false, as one core of a prediction actor has it), best of --repeat.

    python bench/encode_passes.py
"""

from __future__ import annotations

import argparse
import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core: the figure per core that docs/batch.md uses

from common import best_time, cpu_summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--texts", type=int, default=5000)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from lorafit.config import DataConfig
    from lorafit.data import encode, load_data
    from lorafit.model import load_tokenizer

    tokenizer = load_tokenizer("embedded:all-MiniLM-L6-v2")
    rows = load_data(DataConfig(validation_size=0), seed=0).test.texts
    articles = (rows * (args.texts // len(rows) + 1))[:args.texts]
    documents = [" ".join(articles[i:i + 5]) for i in range(args.texts)]
    print(cpu_summary())
    print(f"{args.texts} texts, max length {args.max_length}, one tokenizer thread, best of {args.repeat}\n")
    print(f"{'texts':22s} {'over max':>9s} {'two passes':>12s} {'one pass':>12s} {'ratio':>6s}")
    for name, texts in (("AG News articles", articles), ("5 articles joined", documents)):
        two, training = best_time(lambda: encode(tokenizer, texts, args.max_length), args.repeat)
        one, inference = best_time(lambda: encode(tokenizer, texts, args.max_length, full_lengths=False), args.repeat)
        assert inference.input_ids == training.input_ids  # the same tokens either way
        over = float((training.full_lengths > args.max_length).mean())
        print(f"{name:22s} {over:9.0%} {len(texts) / two:8.0f} t/s {len(texts) / one:8.0f} t/s {two / one:5.2f}x")


if __name__ == "__main__":
    main()
