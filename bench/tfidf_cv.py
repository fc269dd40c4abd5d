"""The TF-IDF blend (model.tfidf_weight) decided by k-fold cross-validation on the training rows, never the test rows.

The bundled training split (4,549 rows) is cut into K stratified folds. For each fold, lorafit trains CONFIG with
tfidf_weight 0 (the encoder alone) on the other folds, carving its validation split from them as every run does,
and predicts the held-out fold; lorafit's own `fit_tfidf` fits the TF-IDF + logistic regression model on the same
training rows, as a run with the blend does. With both models'
out-of-fold probabilities for every training row, the script prints the accuracy of the blend at each weight, and
for a few weights the paired counts: rows only the encoder gets right, rows only the blend gets right, and
z = (b - a) / sqrt(a + b) (McNemar's statistic: |z| > 2 is a difference unlikely to be chance).

    python bench/tfidf_cv.py                                   # the default config, 5 folds
    python bench/tfidf_cv.py configs/quality.yaml --out bench/out/tfidf-cv-quality
    python bench/tfidf_cv.py --folds 2 --max-rows 300 --epochs 0.2   # a smoke test of the script (numbers meaningless)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WEIGHTS = [round(0.05 * i, 2) for i in range(13)]  # 0 .. 0.6
PAIRED = (0.2, 0.3, 0.4)


def write_fold(path: Path, texts: list[str], labels: np.ndarray, names: list[str], rows: np.ndarray) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([texts[i], names[labels[i]]] for i in rows)


def out_of_fold(args) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """Encoder and TF-IDF probabilities of every training row, each from the fold that did not train on it."""
    from sklearn.model_selection import StratifiedKFold

    import lorafit
    from lorafit.config import Config
    from lorafit.data import load_data
    from lorafit.tfidf import fit_tfidf

    base = Config.from_yaml(args.config) if args.config else Config()
    whole = load_data(base.data.model_copy(update={"validation_size": 0, "max_train_samples": args.max_rows}), 0)
    texts, labels, names = list(whole.train.texts), np.asarray(whole.train.labels), whole.label_names
    encoder, tfidf = np.zeros((len(texts), len(names))), np.zeros((len(texts), len(names)))
    folds = []
    split = StratifiedKFold(args.folds, shuffle=True, random_state=args.cv_seed).split(texts, labels)
    for k, (train_rows, held_out) in enumerate(split):
        fold_dir = Path(args.out) / f"fold{k}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        write_fold(fold_dir / "train.csv", texts, labels, names, train_rows)
        write_fold(fold_dir / "held_out.csv", texts, labels, names, held_out)
        overrides = {"train_file": str(fold_dir / "train.csv"), "test_file": str(fold_dir / "held_out.csv"),
                     "label_names": names, "seed": k + 1, "tfidf_weight": 0.0, "output_dir": str(fold_dir),
                     "run_name": "run", "overwrite": True}
        if args.epochs:
            overrides["epochs"] = args.epochs
        cfg = base.with_overrides(overrides, source=f"fold {k}")
        run = lorafit.train(cfg)
        with open(run.path / "test_predictions.csv", newline="", encoding="utf-8") as f:
            encoder[held_out] = [[float(r[f"prob_{n}"]) for n in names] for r in csv.DictReader(f)]
        bundle = load_data(cfg.data, cfg.data_seed)  # the run's own training and validation rows
        assert bundle.test.texts == [texts[i] for i in held_out], "held-out rows out of order"
        model, _ = fit_tfidf(bundle.train.texts, bundle.train.labels, len(names), weight=0.0,
                             validation=(bundle.validation.texts, bundle.validation.labels))
        tfidf[held_out] = model.proba(bundle.test.texts)
        right = {name: float((probs[held_out].argmax(1) == labels[held_out]).mean())
                 for name, probs in (("encoder", encoder), ("tfidf", tfidf))}
        folds.append({"fold": k, "rows": len(held_out), **right, "train_time_s": run.info["train_time_s"]})
        print(f"fold {k}: {folds[-1]}", flush=True)
    return encoder, tfidf, labels, folds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=None, help="a lorafit config YAML (default: the default config)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--cv-seed", type=int, default=0)
    parser.add_argument("--max-rows", type=int, default=None, help="use this many training rows (smoke tests)")
    parser.add_argument("--epochs", type=float, default=None, help="override the config's epochs (smoke tests)")
    parser.add_argument("--out", default="bench/out/tfidf-cv")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from cpu_kernels import cpu_summary

    encoder, tfidf, labels, folds = out_of_fold(args)
    right = encoder.argmax(1) == labels
    recipe = args.config or "the default config"
    table = [f"{args.folds}-fold cross-validation on {len(labels)} training rows of {recipe} (cv seed {args.cv_seed}); "
             f"CPU: {cpu_summary()}", "",
             "| TF-IDF weight | out-of-fold accuracy | change (points) |", "| ---: | ---: | ---: |"]
    results = {"folds": folds, "weights": {}}
    for w in WEIGHTS:
        accuracy = float((((1 - w) * encoder + w * tfidf).argmax(1) == labels).mean())
        results["weights"][str(w)] = accuracy
        table.append(f"| {w:.2f} | {accuracy:.4f} | {100 * (accuracy - right.mean()):+.2f} |")
    table += ["", "| weight | only the encoder right | only the blend right | z |", "| ---: | ---: | ---: | ---: |"]
    for w in PAIRED:
        blend = ((1 - w) * encoder + w * tfidf).argmax(1) == labels
        a, b = int((right & ~blend).sum()), int((~right & blend).sum())
        z = (b - a) / max(np.sqrt(a + b), 1e-9)
        results.setdefault("paired", {})[str(w)] = {"only_encoder": a, "only_blend": b, "z": round(float(z), 2)}
        table.append(f"| {w:.2f} | {a} | {b} | {z:+.2f} |")
    table.append(f"\nencoder alone: {right.mean():.4f}, TF-IDF alone: {float((tfidf.argmax(1) == labels).mean()):.4f} "
                 "out of fold")
    print("\n".join(table))
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(dict(results, args=vars(args), cpu=cpu_summary()), indent=2))
    (out / "table.md").write_text("\n".join(table) + "\n")
    np.savez(out / "out_of_fold.npz", encoder=encoder, tfidf=tfidf, labels=labels)


if __name__ == "__main__":
    main()
