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

Two more levers, measured on the same folds and printed in a second table, each row against the recipe's own blend
(its encoder and TF-IDF at --weight) with the paired counts and z:

    --partner CONFIG   a second encoder (another recipe, or the same one: its seeds differ) trained on the same
                       folds; its probabilities averaged with the first encoder's, alone and with the TF-IDF blend
    --char-ngrams      TF-IDF of word 1-2 grams and character 2-5 grams (char_wb) instead of words alone

    python bench/tfidf_cv.py configs/quality.yaml --partner default --char-ngrams --out bench/out/blend-cv-quality
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import numpy as np

from common import cpu_summary

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WEIGHTS = [round(0.05 * i, 2) for i in range(13)]  # 0 .. 0.6
PAIRED = (0.2, 0.3, 0.4)


def write_fold(path: Path, texts: list[str], labels: np.ndarray, names: list[str], rows: np.ndarray) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([texts[i], names[labels[i]]] for i in rows)


def fit_word_char_tfidf(train_texts, train_labels, texts, n_classes: int) -> np.ndarray:
    """The --char-ngrams variant: lorafit's word features beside character 2-5 grams, the same C; probabilities of
    `texts`. Only here, to measure it: lorafit itself fits words alone."""
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from lorafit.tfidf import C, VECTORIZER

    vectorizers = [TfidfVectorizer(**VECTORIZER, dtype=np.float32),
                   TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True,
                                   lowercase=True, dtype=np.float32)]
    x = hstack([v.fit_transform(train_texts) for v in vectorizers]).tocsr()
    with threadpool_limits(1):
        lr = LogisticRegression(C=C, max_iter=3000).fit(x, train_labels)
    probs = np.zeros((len(texts), n_classes))
    probs[:, lr.classes_] = lr.predict_proba(hstack([v.transform(texts) for v in vectorizers]).tocsr())
    return probs


def out_of_fold(args) -> tuple[dict[str, np.ndarray], np.ndarray, list[dict]]:
    """Probabilities of every training row, each from the fold that did not train on it: "encoder" and "tfidf"
    always, "partner" with --partner, "tfidf_char" with --char-ngrams."""
    from sklearn.model_selection import StratifiedKFold

    import lorafit
    from lorafit.config import Config
    from lorafit.data import load_data
    from lorafit.tfidf import fit_tfidf

    def read_config(path):
        return Config() if path in (None, "default") else Config.from_yaml(path)

    base = read_config(args.config)
    whole = load_data(base.data.model_copy(update={"validation_size": 0, "max_train_samples": args.max_rows}), 0)
    texts, labels, names = list(whole.train.texts), np.asarray(whole.train.labels), whole.label_names
    encoders = {"encoder": (base, 1)}  # name -> (config, seed of fold 0)
    if args.partner:
        encoders["partner"] = (read_config(args.partner), 101)  # other seeds, even when the recipe is the same
    probs = {name: np.zeros((len(texts), len(names))) for name in [*encoders, "tfidf"]}
    if args.char_ngrams:
        probs["tfidf_char"] = np.zeros((len(texts), len(names)))
    folds = []
    split = StratifiedKFold(args.folds, shuffle=True, random_state=args.cv_seed).split(texts, labels)
    for k, (train_rows, held_out) in enumerate(split):
        fold_dir = Path(args.out) / f"fold{k}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        write_fold(fold_dir / "train.csv", texts, labels, names, train_rows)
        write_fold(fold_dir / "held_out.csv", texts, labels, names, held_out)
        train_time = {}
        for name, (config, seed) in encoders.items():
            overrides = {"train_file": str(fold_dir / "train.csv"), "test_file": str(fold_dir / "held_out.csv"),
                         "label_names": names, "seed": seed + k, "tfidf_weight": 0.0, "output_dir": str(fold_dir),
                         "run_name": name, "overwrite": True}
            if args.epochs:
                overrides["epochs"] = args.epochs
            cfg = config.with_overrides(overrides, source=f"fold {k}")
            run = lorafit.train(cfg)
            with open(run.path / "test_predictions.csv", newline="", encoding="utf-8") as f:
                probs[name][held_out] = [[float(r[f"prob_{n}"]) for n in names] for r in csv.DictReader(f)]
            train_time[name] = run.info["train_time_s"]
            if name == "encoder":
                bundle = load_data(cfg.data, cfg.data_seed)  # the run's own training and validation rows
        assert bundle.test.texts == [texts[i] for i in held_out], "held-out rows out of order"
        model, _ = fit_tfidf(bundle.train.texts, bundle.train.labels, len(names), weight=0.0)
        probs["tfidf"][held_out] = model.proba(bundle.test.texts)
        if args.char_ngrams:
            probs["tfidf_char"][held_out] = fit_word_char_tfidf(bundle.train.texts, bundle.train.labels,
                                                                bundle.test.texts, len(names))
        right = {name: float((p[held_out].argmax(1) == labels[held_out]).mean()) for name, p in probs.items()}
        folds.append({"fold": k, "rows": len(held_out), **right, "train_time_s": train_time})
        print(f"fold {k}: {folds[-1]}", flush=True)
    return probs, labels, folds


def paired(reference: np.ndarray, other: np.ndarray, labels: np.ndarray) -> tuple[int, int, float]:
    """Rows only `reference` gets right, rows only `other` gets right, and McNemar's z = (b - a) / sqrt(a + b)."""
    ref_right, other_right = reference.argmax(1) == labels, other.argmax(1) == labels
    a, b = int((ref_right & ~other_right).sum()), int((~ref_right & other_right).sum())
    return a, b, float((b - a) / max(np.sqrt(a + b), 1e-9))


def recipe_row(weight: float) -> str:
    """The second table's reference row: the recipe as it is, its encoder blended with its TF-IDF model."""
    return f"encoder + TF-IDF at {weight} (the recipe)"


def lever_rows(probs: dict[str, np.ndarray], weight: float) -> dict[str, np.ndarray]:
    """The second table's contenders: a few fixed mixtures, not a grid, so that no row is the best of many tries."""
    w, rows = weight, {}
    rows["encoder alone"] = probs["encoder"]
    rows[recipe_row(w)] = (1 - w) * probs["encoder"] + w * probs["tfidf"]
    if "tfidf_char" in probs:
        rows[f"encoder + word+char TF-IDF at {w}"] = (1 - w) * probs["encoder"] + w * probs["tfidf_char"]
    if "partner" in probs:
        pair = (probs["encoder"] + probs["partner"]) / 2
        rows["partner alone"] = probs["partner"]
        rows["encoder and partner, 1:1"] = pair
        rows[f"encoder and partner 1:1, + TF-IDF at {w}"] = (1 - w) * pair + w * probs["tfidf"]
        rows[f"encoder and partner 4:1, + TF-IDF at {w}"] = (
            (1 - w) * (0.8 * probs["encoder"] + 0.2 * probs["partner"]) + w * probs["tfidf"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=None, help="a lorafit config YAML (default: the default config)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--cv-seed", type=int, default=0)
    parser.add_argument("--max-rows", type=int, default=None, help="use this many training rows (smoke tests)")
    parser.add_argument("--epochs", type=float, default=None, help="override the config's epochs (smoke tests)")
    parser.add_argument("--out", default="bench/out/tfidf-cv")
    parser.add_argument("--partner", default=None, help="a second encoder's config YAML ('default' for the default)")
    parser.add_argument("--char-ngrams", action="store_true", help="also measure word + character n-gram TF-IDF")
    parser.add_argument("--weight", type=float, default=0.4, help="the TF-IDF weight of the second table's blends")
    args = parser.parse_args()

    probs, labels, folds = out_of_fold(args)
    encoder, tfidf = probs["encoder"], probs["tfidf"]
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
        a, b, z = paired(encoder, (1 - w) * encoder + w * tfidf, labels)
        results.setdefault("paired", {})[str(w)] = {"only_encoder": a, "only_blend": b, "z": round(z, 2)}
        table.append(f"| {w:.2f} | {a} | {b} | {z:+.2f} |")
    table.append(f"\nencoder alone: {right.mean():.4f}, TF-IDF alone: {float((tfidf.argmax(1) == labels).mean()):.4f} "
                 "out of fold")
    if args.partner or args.char_ngrams:
        rows = lever_rows(probs, args.weight)
        reference = rows[recipe_row(args.weight)]
        reference_accuracy = float((reference.argmax(1) == labels).mean())
        heading = f"Against the recipe's blend; partner: {args.partner or 'none'}"
        if args.char_ngrams:
            heading += f"; word+char TF-IDF alone: {float((probs['tfidf_char'].argmax(1) == labels).mean()):.4f}"
        table += ["", heading, "",
                  "| model | out-of-fold accuracy | change (points) | only the recipe's blend right | only this right "
                  "| z |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, p in rows.items():
            accuracy = float((p.argmax(1) == labels).mean())
            a, b, z = paired(reference, p, labels)
            results.setdefault("levers", {})[name] = {"accuracy": accuracy, "only_recipe": a, "only_this": b,
                                                      "z": round(z, 2)}
            change = 100 * (accuracy - reference_accuracy)
            table.append(f"| {name} | {accuracy:.4f} | {change:+.2f} | {a} | {b} | {z:+.2f} |")
    print("\n".join(table))
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(dict(results, args=vars(args), cpu=cpu_summary()), indent=2))
    (out / "table.md").write_text("\n".join(table) + "\n")
    np.savez(out / "out_of_fold.npz", labels=labels, **probs)


if __name__ == "__main__":
    main()
