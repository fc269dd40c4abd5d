"""Distillation: a base-size teacher, its students and the default MiniLM run, on the same rows, over seeds.

For each seed: trains the teacher (or takes one given with --teacher-run), the default MiniLM run trained
directly (the baseline of goal 1), and each student distilled from that seed's teacher (so the student is
scored on exactly the teacher's validation and test rows). Then exports every run to ONNX (fp32 + int8) and
reads the export's own accuracy check. Prints, per contender: test accuracy (mean, std, min, max over the seeds;
and the means of the fp32 and int8 checks and of macro F1), mean train time, and for the first seed's run the
inference texts/s of each backend (torch fp32, ONNX fp32, ONNX int8; lorafit.load + decision_function, as
`lorafit predict` runs) with the ratio to the dynamic-padding Trainer.predict peer on the default MiniLM run
(bench/inference.py's peer_predict). Saves everything to bench/out/distill.json (or --out).

Contenders
  teacher    --teacher-model (default embedded:all-mpnet-base-v2) with lorafit's default recipe: LoRA on the top 2
             layers, the 10 frozen layers below computed once (frozen-prefix cache), the default's epochs.
  default    lorafit's default run: embedded all-MiniLM-L6-v2 trained directly (no teacher).
  minilm6    student: the 6-layer MiniLM distilled from the teacher (default recipe + distillation).
  minilm3    student: MiniLM with only its first 3 layers (layer dropping), distilled.
  minilm2    student: MiniLM with only its first 2 layers, distilled.

    python bench/distill.py                                         # the table of docs/distill.md (hours)
    python bench/distill.py --teacher-run runs/mpnet-s1 --teacher-run runs/mpnet-s2 --teacher-run runs/mpnet-s3
    python bench/distill.py --teacher-run T1 --teacher-run T2 --teacher-run T3 --default-run D1 --default-run D2 \\
        --default-run D3                     # completed runs of bench/accuracy.py (its mpnet and default rows)
    python bench/distill.py ... --student-set temperature=1 --student-set epochs=4   # options for every student
    python bench/distill.py --seeds 1 --max-train-samples 64 --max-eval-samples 32 --epochs 0.2 \\
        --teacher-model embedded:all-MiniLM-L6-v2 --repeat 1          # smoke test (numbers meaningless)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import yaml

from common import best_time, run_header, seed_stats

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MINILM = "embedded:all-MiniLM-L6-v2"
STUDENTS = {"minilm6": {"student": MINILM}, "minilm3": {"student": MINILM, "student_layers": 3},
            "minilm2": {"student": MINILM, "student_layers": 2}}
BACKENDS = ("torch", "onnx", "onnx-int8")
ACCURACIES = ("accuracy", "fp32_accuracy", "int8_accuracy", "f1_macro")


def overrides(args, seed: int) -> dict:
    values = {"seed": seed, "checkpoint_every": None}
    if args.epochs:
        values["epochs"] = args.epochs
    return values


def student_options(items: list[str]) -> dict:
    """--student-set NAME=VALUE items as lorafit.distill keyword arguments (values read as YAML: 1 is an int,
    [-6, -5] a list, null None); a flag's dashes become underscores."""
    options = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--student-set {item!r}: write NAME=VALUE, e.g. temperature=1")
        options[name.strip().replace("-", "_")] = yaml.safe_load(value)
    return options


def data_overrides(args) -> dict:
    values = {}
    if args.max_train_samples:
        values["max_train_samples"] = args.max_train_samples
    if args.max_eval_samples:
        values["max_eval_samples"] = args.max_eval_samples
    return values


def result(run) -> dict:
    return {"run": str(run.path), "accuracy": run.test_metrics["accuracy"], "f1_macro": run.test_metrics["f1_macro"],
            "train_time_s": run.info["train_time_s"], "wall_time_s": run.info["wall_time_s"]}


def completed_run(run_dir: Path):
    import lorafit

    return lorafit.Run(run_dir, lorafit.Config.from_yaml(run_dir / "config.yaml"),
                       json.loads((run_dir / "test_metrics.json").read_text()),
                       json.loads((run_dir / "run.json").read_text()))


def texts_of(run_dir: Path) -> list[str]:
    import pandas as pd

    test = pd.read_csv(run_dir / "test_predictions.csv", dtype={"text": str}, keep_default_na=False)
    return test["text"].tolist()


def export_accuracies(run: dict) -> None:
    """Export the run to ONNX fp32 + int8 and add the test accuracies of the export's own check to `run`: the
    merged model in fp32 (torch), and the int8 model (goal 2 compares the int8 student with the default in fp32)."""
    from lorafit.export import export_onnx

    check = export_onnx(Path(run["run"]), int8=True)["check"]
    run["fp32_accuracy"] = check["torch"]["accuracy"]
    run["int8_accuracy"] = check["onnx-int8"]["accuracy"]


def backend_speeds(run_dir: Path, texts: list[str], repeat: int) -> dict[str, float]:
    """texts/s of each predict backend on the run's test texts (the run is exported already)."""
    import lorafit

    speeds = {}
    for backend in BACKENDS:
        clf = lorafit.load(run_dir, backend=backend)
        seconds, _ = best_time(lambda clf=clf: clf.decision_function(texts), repeat)
        speeds[backend] = round(len(texts) / seconds, 1)
        print(f"    {run_dir.name} {backend:10s} {speeds[backend]:8.1f} texts/s", flush=True)
    return speeds


def peer_speed(run_dir: Path, texts: list[str], repeat: int, batch_size: int) -> float:
    """texts/s of the dynamic-padding Trainer.predict peer on `run_dir` (bench/inference.py)."""
    from inference import peer_predict

    _, fn = peer_predict(run_dir, texts, batch_size, dynamic=True)
    seconds, _ = best_time(fn, repeat)
    return round(len(texts) / seconds, 1)


def summarise(runs: list[dict]) -> dict:
    return {"runs": len(runs), **{key: seed_stats(runs, key) for key in ACCURACIES},
            "train_time_s": statistics.fmean(r["train_time_s"] for r in runs)}


def markdown_table(summary: dict, speeds: dict, peer: float) -> str:
    f = lambda x: "–" if x is None else f"{x:.4f}"  # noqa: E731 - no spread from one seed
    lines = ["| contender | runs | accuracy mean | std | min | max | fp32 accuracy mean | int8 accuracy mean | "
             "macro F1 mean | train s | " + " | ".join(f"{b} texts/s (x peer)" for b in BACKENDS) + " |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
             + " | ".join("---:" for _ in BACKENDS) + " |"]
    for name, s in summary.items():
        a = s["accuracy"]
        cells = [f"{speeds[name][b]:.1f} ({speeds[name][b] / peer:.2f}x)" if name in speeds else "–" for b in BACKENDS]
        lines.append(f"| {name} | {s['runs']} | {f(a['mean'])} | {f(a['std'])} | {f(a['min'])} | {f(a['max'])} | "
                     f"{f(s['fp32_accuracy']['mean'])} | {f(s['int8_accuracy']['mean'])} | "
                     f"{f(s['f1_macro']['mean'])} | {s['train_time_s']:.0f} | " + " | ".join(cells) + " |")
    lines.append(f"\naccuracy: each run's own test accuracy (evaluated in its training precision); fp32 and int8: "
                 "its ONNX export's check on the same rows (merged model in fp32; ONNX int8). peer: Trainer.predict "
                 f"with dynamic padding on the default MiniLM run, {peer:.1f} texts/s (bench/inference.py's "
                 "peer-dynamic); speeds on the first seed's runs")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher-model", default="embedded:all-mpnet-base-v2", help="backbone of the trained teachers")
    ap.add_argument("--teacher-run", action="append", type=Path, default=[],
                    help="a completed teacher run to reuse (repeat: one per seed, in --seeds order); no teacher is "
                    "trained then, and the seeds' splits are the teachers'")
    ap.add_argument("--default-run", action="append", type=Path, default=[],
                    help="a completed default MiniLM run to reuse, one per seed in --seeds order; it must have been "
                    "trained on its teacher's split (the same seed and data)")
    ap.add_argument("--students", default=",".join(STUDENTS), help=f"comma-separated, of {', '.join(STUDENTS)}")
    ap.add_argument("--student-set", action="append", default=[], metavar="NAME=VALUE",
                    help="a lorafit.distill option for every student (repeat), e.g. temperature=1 or epochs=4; the "
                    "value is read as YAML")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--epochs", type=float, default=None, help="every run's epochs (quick runs; default: the recipe's)")
    ap.add_argument("--max-train-samples", type=int, default=None, help="teachers and baseline: at most this many "
                    "training rows (students inherit their teacher's)")
    ap.add_argument("--max-eval-samples", type=int, default=None, help="at most this many validation and test rows")
    ap.add_argument("--repeat", type=int, default=2, help="timed repetitions per backend (the best is kept)")
    ap.add_argument("--peer-batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out",
                    help="directory for runs/ and distill.json")
    args = ap.parse_args()

    import lorafit

    seeds = [int(s) for s in args.seeds.split(",")]
    students = [s for s in args.students.split(",") if s]
    unknown = [s for s in students if s not in STUDENTS]
    if unknown:
        ap.error(f"--students: unknown {', '.join(unknown)}; known: {', '.join(STUDENTS)}")
    if args.teacher_run and len(args.teacher_run) not in (1, len(seeds)):
        ap.error("--teacher-run: give one run, or one per seed")
    if args.default_run and len(args.default_run) != len(seeds):
        ap.error("--default-run: give one run per seed")
    try:
        student_set = student_options(args.student_set)
    except ValueError as exc:
        ap.error(str(exc))
    runs_dir = args.out / "runs" / "distill"
    header = run_header(seeds=seeds, teacher_model=args.teacher_model, teacher_runs=[str(p) for p in args.teacher_run],
                        student_set=student_set, epochs=args.epochs, max_train_samples=args.max_train_samples,
                        max_eval_samples=args.max_eval_samples)
    print(f"distillation bench, {header['date']}\nCPU: {header['cpu']}\n", flush=True)

    runs: dict[str, list[dict]] = {"teacher": [], "default": [], **{s: [] for s in students}}
    for i, seed in enumerate(seeds):
        every_run = {**overrides(args, seed), "output_dir": str(runs_dir), "overwrite": True}
        if args.teacher_run:
            teacher = completed_run(args.teacher_run[i % len(args.teacher_run)])
        else:
            print(f"seed {seed}: teacher {args.teacher_model}", flush=True)
            teacher = lorafit.train(model=args.teacher_model, run_name=f"teacher-s{seed}", **every_run,
                                    **data_overrides(args))
        runs["teacher"].append(result(teacher))
        # the teacher's data and split, so that its test rows are the baseline's too
        data = teacher.config.data.model_copy(update={"split_seed": teacher.config.data_seed})
        if args.default_run:
            default = completed_run(args.default_run[i])
            if default.config.data.model_copy(update={"split_seed": default.config.data_seed}) != data:
                sys.exit(f"--default-run {default.path}: its data or split differs from its teacher's "
                         f"({teacher.path}); give the default run of the same seed and data")
        else:
            print(f"seed {seed}: default MiniLM, trained directly", flush=True)
            default = lorafit.train(lorafit.Config(data=data), run_name=f"default-s{seed}", **every_run)
        runs["default"].append(result(default))
        for name in students:
            print(f"seed {seed}: student {name}", flush=True)
            options = {**STUDENTS[name], **every_run, **student_set}  # --student-set wins over --epochs
            runs[name].append(result(lorafit.distill(teacher.path, run_name=f"{name}-s{seed}", **options)))

    print("\nexports (ONNX fp32 + int8) and their accuracy checks:", flush=True)
    for name, rs in runs.items():
        for run in rs:
            export_accuracies(run)
            print(f"    {Path(run['run']).name}: fp32 {run['fp32_accuracy']:.4f}  int8 {run['int8_accuracy']:.4f}",
                  flush=True)
    first = {name: Path(rs[0]["run"]) for name, rs in runs.items()}
    texts = texts_of(first["default"])
    print("\ninference on the first seed's runs:", flush=True)
    speeds = {name: backend_speeds(path, texts, args.repeat) for name, path in first.items()}
    peer = peer_speed(first["default"], texts, args.repeat, args.peer_batch_size)
    print(f"    peer-dynamic (Trainer.predict, default run) {peer:8.1f} texts/s", flush=True)

    summary = {name: summarise(rs) for name, rs in runs.items()}
    table = markdown_table(summary, speeds, peer)
    print(f"\nCPU: {header['cpu']}\n{table}")
    out = {"header": header, "summary": summary, "speeds": speeds, "peer_dynamic_texts_per_s": peer,
           "n_texts": len(texts), "runs": runs, "table": table}
    args.out.mkdir(parents=True, exist_ok=True)
    from lorafit.fileio import atomic_write_json

    atomic_write_json(args.out / "distill.json", out)
    print(f"saved {args.out / 'distill.json'}")


if __name__ == "__main__":
    main()
