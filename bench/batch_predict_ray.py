"""Batch prediction with the Ray engine (lorafit.ray_predict): rows/s and peak memory at 1 and 2 workers.

The input: --rows texts (default 100,000) made by repeating the bundled AG News texts (train and test samples of
src/lorafit/resources), written as 8 Parquet shards without an id column (so rows are numbered: the engine's
slower path). Each contender starts a local Ray (ray.init, no dashboard), predicts into a new folder of CSV shards
and shuts Ray down; its time is the whole predict_with_ray call (Ray's start included, as a user waits for it).
Peak memory: the largest sum of resident memory of this process and all its child processes (Ray's GCS, raylet and
the actors), sampled every 0.2 s.

On a machine of C cores Ray is told C + 1 logical CPUs: each actor takes one, and one is left to the read and write
tasks (predict_with_ray refuses actors that would take every CPU, since Ray Data would then wait forever).

    python bench/batch_predict_ray.py --run RUN_DIR [--rows 100000] [--batch-size 16]
Prints a table and saves it to bench/out/batch_predict_ray.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OUT = Path(__file__).resolve().parent / "out"
SHARDS = 8


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_input(folder: Path, rows: int) -> None:
    """`rows` texts from the bundled AG News samples, repeated in order, as SHARDS Parquet files."""
    import pandas as pd

    import lorafit
    from lorafit.data import read_table

    res = Path(lorafit.__file__).parent / "resources"
    base = [t for name in ("ag_news_sample_train.csv.gz", "ag_news_sample_test.csv.gz")
            for t in read_table(res / name)["text"].tolist()]
    texts = [base[i % len(base)] for i in range(rows)]
    folder.mkdir(parents=True, exist_ok=True)
    step = -(-rows // SHARDS)
    for k in range(SHARDS):
        pd.DataFrame({"text": texts[k * step:(k + 1) * step]}).to_parquet(folder / f"part-{k:02d}.parquet")


class PeakMemory:
    """The largest RSS of this process plus its descendants while the block runs."""

    def __init__(self, every: float = 0.2):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:  # a process that ended between listing and reading
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def ray_engine(run: Path, input_dir: Path, out: Path, workers: int, batch_size: int) -> dict:
    from lorafit.config import InferenceConfig, PredictConfig
    from lorafit.ray_predict import predict_with_ray

    cores = len(os.sched_getaffinity(0))
    cfg = PredictConfig(engine="ray", workers=workers)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        result = predict_with_ray(run, input_dir, out, cfg, InferenceConfig(batch_size=batch_size, device="cpu"),
                                  ray_init_args={"num_cpus": cores + 1, "object_store_memory": 500_000_000,
                                                 "log_to_driver": False})
        seconds = time.perf_counter() - t0
    rows = sum(sum(1 for _ in f.open()) - 1 for f in result.files)  # CSV shards, one header line each
    return {"seconds": round(seconds, 1), "rows": rows, "peak_rss_gb": round(mem.peak / 1e9, 2),
            "shards": len(result.files)}


def ray_1_worker(run: Path, input_dir: Path, out: Path, batch_size: int) -> dict:
    return ray_engine(run, input_dir, out, 1, batch_size)


def ray_2_workers(run: Path, input_dir: Path, out: Path, batch_size: int) -> dict:
    return ray_engine(run, input_dir, out, 2, batch_size)


CONTENDERS = {"ray-1-worker": ray_1_worker, "ray-2-workers": ray_2_workers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="A completed run directory.")
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=16, help="Texts per forward pass in each actor.")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lorafit-ray-bench-"))
    try:
        make_input(work / "in", args.rows)
        table = []
        for name, fn in CONTENDERS.items():
            row = fn(args.run.resolve(), work / "in", work / name, args.batch_size)
            assert row["rows"] == args.rows, row  # every row predicted once
            row = {"contender": name, **row, "rows_per_s": round(args.rows / row["seconds"])}
            table.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "run": str(args.run), "rows": args.rows,
              "batch_size": args.batch_size, "table": table}
    OUT.mkdir(exist_ok=True)
    (OUT / "batch_predict_ray.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{report['cpu']}, {report['cores']} cores; {args.rows:,} rows; run {args.run}")
    print(f"{'contender':<15}{'seconds':>9}{'rows/s':>9}{'peak GB':>9}{'shards':>8}")
    for r in table:
        print(f"{r['contender']:<15}{r['seconds']:>9}{r['rows_per_s']:>9}{r['peak_rss_gb']:>9}{r['shards']:>8}")


if __name__ == "__main__":
    main()
