"""Batch prediction of a large file: peak memory and rows/s at two sizes, to show memory does not grow with rows.

Each contender predicts a CSV of N rows (the bundled AG News test texts repeated, with an id column) into a CSV, in
a fresh child process per size, which reports its peak resident memory (ru_maxrss), its resident memory once the
model is loaded (so the growth while predicting shows apart from the model), wall time and rows/s. The default
run is a tiny random BERT + LoRA trained on the bundled sample as the tests make it (tests/conftest.py): cheap, so
what is measured is the streaming, not the encoder; --run takes any completed run.

Contenders (one function each, same signature; the table prints one row per contender and size)
  local          lorafit.batch_predict.predict_file in this process: pyarrow's streaming CSV reader, chunk_rows
                 rows at a time, appended to a partial file renamed when complete. Peak: ru_maxrss.
  ray-1-worker   lorafit.ray_predict.predict_with_ray on a local Ray started for the run: Ray Data reads the same
  ray-2-workers  CSV, 1 or 2 actors (1 CPU each) predict chunk_rows rows at a time, CSV shards are written. Peak: the
                 largest summed resident memory of this process and every process under it (Ray's, the actors'),
                 sampled every 0.2 s; "loaded" is this process's alone before Ray starts.

    python bench/batch_predict.py                         # 100k and 1M rows (the 1M row file is ~230 MB), all
    python bench/batch_predict.py --contenders local      # the streaming engine alone
    python bench/batch_predict.py --rows 20000 100000 --run runs/my-run
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_summary, peak_rss_mib, report_result, run_child

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OUT = Path(__file__).resolve().parent / "out" / "batch_predict"
ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    """Resident memory now (Linux /proc), MiB."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# --- contenders: (run, input, output, chunk_rows) -> {rows, seconds, loaded_rss_mib} ------------------------
def local(run: Path, input: Path, output: Path, chunk_rows: int) -> dict:
    import io

    from rich.console import Console

    import lorafit
    from lorafit.batch_predict import predict_file
    from lorafit.config import PredictConfig

    clf = lorafit.load(run, backend="torch")
    loaded = rss_mib()
    console = Console(file=io.StringIO())  # the summary line is returned, not printed in the table's way
    t0 = time.perf_counter()
    summary = predict_file(clf, input, output, PredictConfig(chunk_rows=chunk_rows), console=console)
    return {"rows": summary.predicted, "seconds": time.perf_counter() - t0, "loaded_rss_mib": loaded,
            "summary": summary.line()}


class TreePeak:
    """The largest resident memory of this process plus all its descendants while the block runs (Ray's processes
    and actors are children of the process that started Ray), sampled every `every` seconds."""

    def __init__(self, every: float = 0.2):
        import threading

        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:  # ended between listing and reading
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def ray_engine(run: Path, input: Path, output: Path, chunk_rows: int, workers: int) -> dict:
    from lorafit.config import InferenceConfig, PredictConfig
    from lorafit.ray_predict import predict_with_ray

    loaded = rss_mib()
    cfg = PredictConfig(engine="ray", workers=workers, chunk_rows=chunk_rows)
    with TreePeak() as mem:
        t0 = time.perf_counter()
        result = predict_with_ray(run, input, output.with_suffix(""), cfg, InferenceConfig(backend="torch"),
                                  ray_init_args={"object_store_memory": 500_000_000, "log_to_driver": False})
        seconds = time.perf_counter() - t0
    rows = sum(sum(1 for _ in f.open(encoding="utf-8")) - 1 for f in result.files)  # CSV shards, a header each
    return {"rows": rows, "seconds": seconds, "loaded_rss_mib": loaded, "tree_peak_rss_mib": mem.peak / 2**20,
            "summary": f"{len(result.files)} shards"}


def ray_1_worker(run: Path, input: Path, output: Path, chunk_rows: int) -> dict:
    return ray_engine(run, input, output, chunk_rows, 1)


def ray_2_workers(run: Path, input: Path, output: Path, chunk_rows: int) -> dict:
    return ray_engine(run, input, output, chunk_rows, 2)


CONTENDERS = {"local": local, "ray-1-worker": ray_1_worker, "ray-2-workers": ray_2_workers}


# --- inputs and the tiny run ---------------------------------------------------------------------------------
def make_input(rows: int, path: Path) -> Path:
    """N rows `id,text`: the bundled test texts repeated, written block by block (never N rows in memory)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from lorafit.config import DataConfig
    from lorafit.data import load_data

    if path.is_file():
        return path
    texts = load_data(DataConfig(validation_size=0), seed=0).test.texts
    tmp = path.with_suffix(".tmp")
    with pacsv.CSVWriter(str(tmp), pa.schema([("id", pa.int64()), ("text", pa.string())])) as writer:
        for start in range(0, rows, 50_000):
            n = min(50_000, rows - start)
            writer.write_table(pa.table({"id": pa.array(range(start, start + n), pa.int64()),
                                         "text": [texts[i % len(texts)] for i in range(start, start + n)]}))
    os.replace(tmp, path)
    return path


def tiny_run(out: Path) -> Path:
    """A tiny random BERT + LoRA run on the bundled sample, made as tests/conftest.py makes it (seconds)."""
    run = out / "tiny-run" / "run"
    if (run / "run.json").is_file():
        return run
    import lorafit

    tests = runpy.run_path(str(ROOT / "tests" / "conftest.py"))  # the tests' tiny model and config
    model = tests["make_tiny_model"]("bert", out / "tiny-model")
    return lorafit.train(tests["tiny_config"](model, out / "tiny-run", pooling="cls")).path


# --- measurement ---------------------------------------------------------------------------------------------
def child(args) -> None:
    import torch

    # 1 thread by default: a tiny model's matrices are too small for a second thread to pay, and on a shared machine
    # the threads' synchronisation cost 5x the rows/s (2,000 rows: 7.3 s with 2 threads, 1.3 s with 1, 2 cores)
    torch.set_num_threads(args.threads)
    result = CONTENDERS[args.child](Path(args.run), Path(args.input), Path(args.output), args.chunk_rows)
    result["peak_rss_mib"] = result.pop("tree_peak_rss_mib", None) or peak_rss_mib()
    report_result(result)


def measure(name: str, run: Path, input: Path, chunk_rows: int, threads: int) -> dict:
    """One contender on one input in a fresh process: its peak memory is then this prediction's alone."""
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        cmd = [sys.executable, __file__, "--child", name, "--run", str(run), "--input", str(input),
               "--output", str(Path(tmp) / "preds.csv"), "--chunk-rows", str(chunk_rows), "--threads", str(threads)]
        result, error = run_child(cmd)
    if result is None:
        raise SystemExit(f"{name} on {input} failed:\n{error}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--run", type=Path, default=None, help="A completed run (default: a tiny random one).")
    parser.add_argument("--chunk-rows", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each contender's process.")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    OUT.mkdir(parents=True, exist_ok=True)
    run = args.run or tiny_run(OUT)
    print(f"CPU: {cpu_summary()}\nrun: {run}; chunk_rows {args.chunk_rows}; torch threads {args.threads}\n")
    print(f"{'contender':<14}{'rows':>11}{'seconds':>9}{'rows/s':>9}{'loaded MiB':>12}{'peak MiB':>10}"
          f"{'growth MiB':>12}")
    results = []
    for name in args.contenders:
        for rows in args.rows:
            r = measure(name, run, make_input(rows, OUT / f"input-{rows}.csv"), args.chunk_rows, args.threads)
            r.update(contender=name, input_rows=rows, rows_per_s=r["rows"] / r["seconds"],
                     growth_mib=r["peak_rss_mib"] - r["loaded_rss_mib"])
            results.append(r)
            print(f"{name:<14}{rows:>11,}{r['seconds']:>9.1f}{r['rows_per_s']:>9.0f}{r['loaded_rss_mib']:>12.0f}"
                  f"{r['peak_rss_mib']:>10.0f}{r['growth_mib']:>12.0f}", flush=True)
        mine = [r for r in results if r["contender"] == name]
        peaks = [r["peak_rss_mib"] for r in mine]
        print(f"{name}: peak memory at the largest size is {max(peaks) / min(peaks):.3f}x the smallest's "
              f"({'within' if max(peaks) <= 1.10 * min(peaks) else 'NOT within'} 10%)")
    (OUT / "results.json").write_text(json.dumps({"cpu": cpu_summary(), "run": str(run), "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
