"""How training cost grows with the number of training rows, and what a second process buys.

For each size (default 1k, 4k, 16k, 64k training rows) the bundled AG News sample (or --source) is resampled
to that many rows (with replacement when the source is smaller; a fixed validation slice is added), written to
a temporary CSV and trained with `lorafit train --train-file ... --test-file <bundled test>` in its own
process. Per size it records time per epoch (train_time_s / epochs_completed), samples/s, the process's peak
RSS (os.wait4's rusage of that child), and the frozen-prefix cache size from run.json. It prints a Markdown
table, the least-squares slope of time per epoch against rows (and the ratio time(largest)/time(smallest)
against the rows ratio), saves a plot, and compares 1 process with 2 (torchrun, half the per-process batch,
the same global batch) at one size.

    python bench/scaling.py --cpu                                  # the full run (1k..64k, 1 epoch each)
    python bench/scaling.py --sizes 200,400 --epochs 0.2           # smoke test
Timings are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from common import cpu_name

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VALIDATION_ROWS = 500  # a fixed validation slice, so that every size trains on exactly its number of rows


def bundled(name: str) -> Path:
    return Path(str(resources.files("lorafit") / "resources" / f"ag_news_sample_{name}.csv.gz"))


def resampled_csv(source: Path, rows: int, out: Path, seed: int = 0) -> Path:
    """`rows` training rows plus the validation slice, drawn from `source` (with replacement if it is smaller)."""
    import numpy as np
    import pandas as pd

    df = pd.read_csv(source)
    n = rows + VALIDATION_ROWS
    pick = np.random.default_rng(seed).choice(len(df), size=n, replace=n > len(df))
    df.iloc[pick].to_csv(out, index=False)
    return out


def test_csv(tmp: Path) -> Path:
    """The bundled test split, uncompressed (what --test-file reads)."""
    out = tmp / "test.csv"
    out.write_bytes(gzip.decompress(bundled("test").read_bytes()))
    return out


def run_train(cmd: list[str], log: Path, env: dict) -> tuple[int, float, float]:
    """Run one training command; return (exit code, wall seconds, peak RSS in GB of the process tree's largest)."""
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (max RSS among it and its children)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.time() - t0, usage.ru_maxrss * 1024 / 1e9  # Linux reports KiB


def train_cmd(args, train_file: Path, test_file: Path, run_name: str, batch_size: int, nproc: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "lorafit.cli"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "lorafit.cli"]
    cmd = launcher + [
        "train", "--model", args.model, "--train-file", str(train_file), "--test-file", str(test_file),
        "--validation-size", str(VALIDATION_ROWS), "--epochs", str(args.epochs), "--batch-size", str(batch_size),
        "--output-dir", str(args.out / "runs"), "--run-name", run_name, "--overwrite",
        "--checkpoint-every", "none", "--log-every", "50",
    ]
    if nproc > 1:  # the cores are shared out between the processes instead of oversubscribed
        cmd += ["--num-threads", str(max(1, (os.cpu_count() or 2) // nproc))]
    return cmd + args.extra


def measure(args, train_file: Path, test_file: Path, run_name: str, batch_size: int, nproc: int = 1) -> dict:
    log = args.out / f"{run_name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    code, wall, rss = run_train(train_cmd(args, train_file, test_file, run_name, batch_size, nproc), log, env)
    row = {"run": run_name, "processes": nproc, "exit_code": code, "wall_s": round(wall, 1), "peak_rss_gb": round(rss, 3)}
    info_path = args.out / "runs" / run_name / "run.json"
    if code != 0 or not info_path.is_file():
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        # a worker's exception line ("[rank1]: RuntimeError: ...") says more than the launcher's closing banner
        errors = [line for line in lines if re.search(r"\w+(Error|Exception): ", line) and "ChildFailedError" not in line]
        why = errors[-1] if errors else (lines[-1] if lines else "")
        row["error"] = f"exit code {code}: {why[:300] or '(no output)'} (log: {log})"
        return row
    info = json.loads(info_path.read_text())
    cache = info.get("prefix_cache") or {}  # recorded by the loop through prefix_cache.build_prefix_cache
    epochs = info.get("epochs_completed") or args.epochs
    row.update(
        train_rows=info.get("data_sizes", {}).get("train"), epochs=epochs, train_time_s=info["train_time_s"],
        time_per_epoch_s=round(info["train_time_s"] / max(epochs, 1e-9), 2),
        samples_per_s=info["train_samples_per_s"], prefix_cache_s=info.get("prefix_cache_train_s"),
        cache_gb=cache.get("size_gb", cache.get("estimate_gb")), cache_dtype=cache.get("storage_dtype"),
        cache_enabled=cache.get("enabled", info.get("prefix_cache_from_layer") is not None),
    )
    return row


def fit(rows: list[dict]) -> dict:
    """Least squares time_per_epoch = a + b * rows, the log-log exponent (1.0 is linear), and the end-to-end ratio."""
    import numpy as np

    x = np.array([r["train_rows"] for r in rows], dtype=float)
    y = np.array([r["time_per_epoch_s"] for r in rows], dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    out = {"slope_s_per_1k_rows": round(1000 * slope, 4), "intercept_s": round(intercept, 3),
           "time_ratio": round(y[-1] / y[0], 3), "rows_ratio": round(x[-1] / x[0], 3)}
    if len(rows) > 1 and (y > 0).all():
        out["loglog_exponent"] = round(float(np.polyfit(np.log(x), np.log(y), 1)[0]), 3)
    return out


def plot(rows: list[dict], line: dict, path: Path, title: str) -> None:
    """Time per epoch and peak RSS against rows (matplotlib's object-oriented API: no global backend)."""
    import numpy as np
    from matplotlib.figure import Figure

    x = np.array([r["train_rows"] for r in rows], dtype=float)
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_time, ax_mem = fig.subplots(1, 2)
    ax_time.plot(x, [r["time_per_epoch_s"] for r in rows], "o", label="measured")
    ax_time.plot(x, line["intercept_s"] + line["slope_s_per_1k_rows"] / 1000 * x, "-",
                 label=f"least squares: {line['slope_s_per_1k_rows']:.3g} s per 1k rows")
    ax_time.set(xlabel="training rows", ylabel="time per epoch (s)", title="time per epoch")
    ax_time.legend()
    ax_mem.plot(x, [r["peak_rss_gb"] for r in rows], "o-", label="peak RSS")
    ax_mem.plot(x, [r.get("cache_gb") or 0 for r in rows], "s--", label="prefix cache")
    ax_mem.axhline(8, color="grey", linestyle=":", label="8 GB")
    ax_mem.set(xlabel="training rows", ylabel="GB", title="memory")
    ax_mem.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=120)


def table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| train rows | epochs | time/epoch (s) | samples/s | peak RSS (GB) | prefix cache (GB) |",
             "|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        cache = ("off" if not r.get("cache_enabled") else "on (size not in run.json)" if r.get("cache_gb") is None
                 else f"{r['cache_gb']} {r.get('cache_dtype') or ''}".strip())
        lines.append(f"| {r['train_rows']:,} | {r['epochs']} | {r['time_per_epoch_s']:.1f} | {r['samples_per_s']:.1f} | "
                     f"{r['peak_rss_gb']:.2f} | {cache} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Training cost against rows, and 1 vs 2 processes.")
    parser.add_argument("--sizes", default="1000,4000,16000,64000", help="Training rows, comma-separated.")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16, help="Global batch (the 2-process run halves it per process).")
    parser.add_argument("--model", default="embedded:all-MiniLM-L6-v2")
    parser.add_argument("--source", type=Path, default=None, help="CSV (text,label) to resample (default: bundled sample).")
    parser.add_argument("--compare-size", type=int, default=None, help="Rows for 1 vs 2 processes (default: 2nd size).")
    parser.add_argument("--no-compare", action="store_true", help="Skip the 2-process comparison.")
    parser.add_argument("--out", type=Path, default=Path("bench/out/scaling"))
    parser.add_argument("--cpu", action="store_true", help="Also print bench/cpu_kernels.py's matmul throughput.")
    parser.add_argument("extra", nargs="*", help="Further `lorafit train` flags, after --.")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]

    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores; model {args.model}")
    if args.cpu:
        subprocess.run([sys.executable, str(Path(__file__).with_name("cpu_kernels.py"))], check=False)

    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = args.source or bundled("train")
        test_file = test_csv(tmp)
        for n in sizes:
            train_file = resampled_csv(source, n, tmp / f"train-{n}.csv")
            row = measure(args, train_file, test_file, f"rows-{n}", args.batch_size)
            (failed if "error" in row else rows).append(row)
            print(json.dumps(row), flush=True)
        compare = None
        if not args.no_compare:
            n = args.compare_size or sizes[min(1, len(sizes) - 1)]
            train_file = resampled_csv(source, n, tmp / f"train-{n}.csv")
            one = next((r for r in rows if r["run"] == f"rows-{n}"), None) or measure(
                args, train_file, test_file, f"rows-{n}", args.batch_size)
            two = measure(args, train_file, test_file, f"rows-{n}-2proc", max(1, args.batch_size // 2), nproc=2)
            print(json.dumps(two), flush=True)
            compare = (n, one, two)

    header = (f"Training cost against rows: {args.model}, {args.epochs} epoch(s), batch {args.batch_size}, "
              f"CPU {cpu_name()} ({os.cpu_count()} logical cores)")
    result: dict = {"cpu": cpu_name(), "rows": rows, "failed": failed}
    print()
    if rows:
        print(table(rows, header))
    for row in failed:
        print(f"error: {row['run']}: {row['error']}")
    if len(rows) >= 2:
        line = fit(rows)
        result["fit"] = line
        print(f"\nleast squares: time per epoch = {line['intercept_s']:.2f} s + {line['slope_s_per_1k_rows']:.4f} s per "
              f"1k rows; log-log exponent {line.get('loglog_exponent', float('nan')):.3f} (1 = linear)")
        print(f"time({rows[-1]['train_rows']:,}) / time({rows[0]['train_rows']:,}) = {line['time_ratio']:.2f} against a "
              f"rows ratio of {line['rows_ratio']:.0f}")
        plot(rows, line, args.out / "scaling.png", header.split(":")[0] + f" ({cpu_name()})")
        print(f"plot: {args.out / 'scaling.png'}")
    if compare is not None:
        n, one, two = compare
        result["compare"] = {"rows": n, "one_process": one, "two_processes": two}
        if two.get("error") or one.get("error"):
            print(f"\n1 vs 2 processes at {n:,} rows: error: {two.get('error') or one.get('error')}")
        else:
            speedup = two["samples_per_s"] / max(one["samples_per_s"], 1e-9)
            result["compare"]["speedup"] = round(speedup, 3)
            print(f"\n1 vs 2 processes at {n:,} rows (global batch {args.batch_size}):\n"
                  "| processes | batch per process | time/epoch (s) | samples/s | peak RSS per process (GB) |\n"
                  "|---:|---:|---:|---:|---:|\n"
                  f"| 1 | {args.batch_size} | {one['time_per_epoch_s']:.1f} | {one['samples_per_s']:.1f} | {one['peak_rss_gb']:.2f} |\n"
                  f"| 2 | {max(1, args.batch_size // 2)} | {two['time_per_epoch_s']:.1f} | {two['samples_per_s']:.1f} | "
                  f"{two['peak_rss_gb']:.2f} |\nspeed-up: {speedup:.2f}x")
    (args.out / "scaling.json").write_text(json.dumps(result, indent=2))
    print(f"results: {args.out / 'scaling.json'}")


if __name__ == "__main__":
    main()
