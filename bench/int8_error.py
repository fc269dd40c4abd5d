"""Error of the int8 frozen-weight matmuls (lorafit.frozen.Int8Weight) against fp32, per Linear of the embedded
MiniLM, on real AG News rows: plain per-tensor activation quantisation against SmoothQuant-scaled (the one
lorafit trains with). Relative error = |y_int8 - y_fp32| / |y_fp32| over the real (unpadded) tokens.

    python bench/int8_error.py              # 64 training rows, every layer
    python bench/int8_error.py --rows 256 --layers 4,5
"""

from __future__ import annotations

import argparse
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    args = ap.parse_args()

    import torch
    from torch import nn

    from lorafit.config import Config
    from lorafit.data import load_data
    from lorafit.frozen import Int8Weight, int8_available
    from lorafit.model import build_base, load_tokenizer

    if not int8_available():
        raise SystemExit("fbgemm int8 kernels are not available on this CPU")
    warnings.simplefilter("ignore")
    cfg = Config()
    bundle = load_data(cfg.data, cfg.train.seed)
    model = build_base(cfg.model, len(bundle.label_names), bundle.label_names).eval()
    tok = load_tokenizer(cfg.model.model)
    batch = tok(bundle.train.texts[: args.rows], padding=True, truncation=True, max_length=cfg.data.max_length,
                return_tensors="pt")
    real = batch["attention_mask"].bool()
    wanted = None if args.layers is None else {int(i) for i in args.layers.split(",")}
    rows = []

    def measure(name):
        def hook(module, inputs, output):
            x, ref = inputs[0][real], output[real]
            err = lambda q: ((q(x) - ref).norm() / ref.norm()).item()  # noqa: E731
            rows.append((name, err(Int8Weight(module, None)), err(Int8Weight(module, x.abs().amax(0)))))
        return hook

    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, nn.Linear) and "layer" in parts:
            layer = int(parts[parts.index("layer") + 1])
            if wanted is None or layer in wanted:
                module.register_forward_hook(measure(name.replace("encoder.encoder.", "")))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    print(f"{'linear':<40}{'per-tensor':>12}{'smoothed':>10}   (relative error, {args.rows} rows)")
    for name, plain, smooth in rows:
        print(f"{name:<40}{plain:>12.4f}{smooth:>10.4f}")
    print(f"{'mean':<40}{sum(r[1] for r in rows) / len(rows):>12.4f}{sum(r[2] for r in rows) / len(rows):>10.4f}")


if __name__ == "__main__":
    main()
