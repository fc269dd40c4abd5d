"""Batch prediction on a Ray cluster (`lorafit predict RUN --input DIR_OR_GLOB --output DIR --engine ray`): Ray
Data reads the input shards (Parquet, CSV or JSON lines; a file, a folder or a glob), a pool of actors that each
load the run once runs the classifier over batches (`map_batches`), and Ray Data writes the predictions as shards
(CSV or Parquet) into the output folder. Needs `pip install 'lorafit[ray]'`.

IDs: the input's id column (PredictConfig.id_column, else a column named id/ID), else the row's position in the
whole input counted from 0 (files in sorted path order, rows in file order): for one file that is the row number
`lorafit predict` writes with the local engine. Numbering needs the row count and the rows in order before the
actors start, so without an id column the input is read once into Ray's object store (spilled to disk when large);
with an id column it streams from the readers through the actors to the writers.

Every machine of the cluster needs lorafit installed and the run directory (and the input) at the same path.
"""

from __future__ import annotations

import glob
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from .config import InferenceConfig, PredictConfig
from .errors import LorafitError

READERS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".ndjson": "json"}
ROW_NUMBER = "__lorafit_row"  # the generated id column when the input has none


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401 - the [data] part of the extra
    except ImportError:
        raise LorafitError("the ray engine needs Ray Data: pip install 'lorafit[ray]'") from None
    return ray


# --- one batch: the step both engines share ----------------------------------------------------------------------
class BatchPredictor:
    """What map_batches runs on each actor: the model is loaded once, in __init__ (lorafit.load settles 'auto' where
    the actor runs: its own GPU), then every batch goes through batch_predict.predict_table, the local engine's
    step, so both write the same rows (blank texts included). A subclass may add work around __call__ (the tests
    kill an actor with one)."""

    def __init__(self, run_dir: str, text_columns: list[str], id_column: str, cfg: PredictConfig,
                 inference: InferenceConfig):
        from .predict import load

        self.clf = load(run_dir, **inference.model_dump())  # InferenceConfig's fields are load's keywords
        self.text_columns, self.id_column, self.cfg = text_columns, id_column, cfg

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import pyarrow as pa

        from .batch_predict import predict_table

        table = pa.Table.from_pandas(batch[self.text_columns], preserve_index=False)
        return predict_table(self.clf, table, self.cfg, self.text_columns,
                             ids=batch[self.id_column].to_numpy()).to_pandas()


# --- input and output ---------------------------------------------------------------------------------------------
def input_files(spec: str | Path) -> tuple[list[str], str]:
    """A file, a folder (its files of one supported kind, recursively, hidden ones left out) or a glob -> the files
    in sorted order and the Ray Data reader for them."""
    spec = str(spec)
    path = Path(spec)
    if any(c in spec for c in "*?["):
        files = sorted(f for f in glob.glob(spec, recursive=True) if Path(f).is_file())
    elif path.is_dir():
        files = sorted(str(f) for f in path.rglob("*") if f.is_file() and f.suffix.lower() in READERS
                       and not any(part.startswith((".", "_")) for part in f.relative_to(path).parts))
    elif path.is_file():
        files = [spec]
    else:
        raise LorafitError(f"--input {spec}: no such file or folder, and no glob pattern")
    if not files:
        raise LorafitError(f"--input {spec}: no input files ({', '.join(READERS)}) found")
    kinds = {Path(f).suffix.lower() for f in files}
    unknown = sorted(k for k in kinds if k not in READERS)
    if unknown:
        raise LorafitError(f"--input {spec}: the ray engine reads {', '.join(READERS)} files, "
                           f"not {unknown[0] or 'files without a suffix'}")
    readers = {READERS[k] for k in kinds}
    if len(readers) > 1:
        raise LorafitError(f"--input {spec}: mixes {' and '.join(sorted(kinds))} files; give one kind at a time")
    return files, readers.pop()


def _read(ray, files: list[str], reader: str):
    if reader == "parquet":
        return ray.data.read_parquet(files)
    if reader == "csv":
        return ray.data.read_csv(files)
    return ray.data.read_json(files, lines=True)


def _lorafit_cause(exc: BaseException) -> Optional[LorafitError]:
    """The LorafitError an actor raised (a bad row, a bad run) from under Ray's wrapping: a RayTaskError keeps it
    as `.cause` (and poses as its class, so the class's module tells lorafit's own from the wrapper)."""
    found, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, LorafitError) and type(exc).__module__.startswith("lorafit."):
            found = exc
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else (exc.__cause__ or exc.__context__)
    return found


def _numbered(ray, ds):
    """The rows with a ROW_NUMBER column: their position in the input. The input is materialized in order (this
    dataset's own context, not the process's), each block's rows counted, then each block numbered from its offset
    by a task of its own: all on the cluster, nothing but the counts comes to this process."""
    import numpy as np
    import pyarrow as pa

    ds.context.execution_options.preserve_order = True
    blocks = ds.to_arrow_refs()
    count = ray.remote(lambda block: block.num_rows)
    sizes = ray.get([count.remote(b) for b in blocks])
    offsets = np.cumsum([0, *sizes[:-1]]).tolist()

    @ray.remote
    def number(block, start: int):
        return block.append_column(ROW_NUMBER, pa.array(range(start, start + block.num_rows), pa.int64()))

    return ray.data.from_arrow_refs([number.remote(b, o) for b, o in zip(blocks, offsets)])


@dataclass
class RayPredictResult:
    output_dir: Path
    files: list[Path]  # the shards written, sorted
    input_files: list[str]
    seconds: float


# --- the run ------------------------------------------------------------------------------------------------------
def predict_with_ray(run_dir: str | Path, input: str | Path, output_dir: str | Path,
                     cfg: Optional[PredictConfig] = None, inference: Optional[InferenceConfig] = None, *,
                     text_columns: Optional[list[str]] = None, ray_init_args: Optional[dict[str, Any]] = None,
                     predictor: type = BatchPredictor) -> RayPredictResult:
    """Predict every row of `input` (a file, folder or glob of Parquet, CSV or JSON-lines files) on Ray and write
    ID,Label[,prob_<class>...] shards (cfg.shard_format, csv or parquet) into `output_dir`, which must be new or empty.

    cfg.ray_address joins that cluster (e.g. 'auto'); without it a local Ray is started here (with `ray_init_args`)
    and shut down after. cfg.workers actors each hold the model and take cfg.gpus_per_worker GPUs and
    cfg.cpus_per_worker CPUs (Ray sets the actor's torch threads to that); they must leave a CPU of the cluster to the
    read and write tasks. Each actor takes cfg.chunk_rows rows at a time; one that dies is restarted by Ray and its
    batch retried."""
    ray = _ray()  # first: without the extra, that is the one thing to say
    cfg = cfg or PredictConfig()
    inference = inference or InferenceConfig()
    output_format, cpus_per_worker = cfg.shard_format, cfg.cpus_per_worker
    run_dir = Path(run_dir).resolve()  # actors run elsewhere: an absolute path
    from .rundir import read_run

    run_cfg = read_run(run_dir)[1]  # a completed run of a layout this lorafit reads: said here, before Ray starts
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LorafitError(f"--output {out}: exists and is not an empty folder; remove it or choose another")
    files, reader = input_files(input)
    from .batch_predict import checked_id_column
    from .data import check_text_columns

    texts = list(text_columns) if text_columns else run_cfg.data.all_text_columns

    started = not ray.is_initialized()  # a caller's own ray.init (a notebook, the tests) is used and left running
    if started:
        init = dict(ray_init_args or {})
        if cfg.ray_address is None:  # a local Ray for this run only (or RAY_ADDRESS's, Ray's own convention)
            init.setdefault("include_dashboard", False)
            # the actors' CPUs and one more for the reading and writing tasks, however few cores the machine has
            init.setdefault("num_cpus", max(os.cpu_count() or 1, math.ceil(cfg.workers * cfg.cpus_per_worker) + 1))
        ray.init(address=cfg.ray_address, **init)
    t0 = time.perf_counter()
    try:
        cpus = float(ray.cluster_resources().get("CPU", 0))
        if cfg.workers * cpus_per_worker >= cpus:
            # actors holding every CPU leave none to the read and write tasks: Ray Data would wait forever
            raise LorafitError(f"--workers {cfg.workers} x {cpus_per_worker:g} CPU each take all {cpus:g} CPUs of the "
                               "Ray cluster and leave none for reading and writing; use fewer workers")
        ds = _read(ray, files, reader)
        columns = ds.columns()
        origin = f"--input {input}"
        check_text_columns(columns, texts, origin)
        id_col = checked_id_column(columns, cfg.id_column, origin)
        if id_col is None:
            ds, id_col = _numbered(ray, ds), ROW_NUMBER
        ds = ds.select_columns(list(dict.fromkeys([*texts, id_col])))
        gpu = cfg.gpus_per_worker > 0
        # Ray Data restarts an actor that died (lost node, OOM kill) and retries its batch: its defaults for actor
        # pools, which the tests check; the remote options to change them are deprecated from Ray 2.60
        preds = ds.map_batches(
            predictor, batch_format="pandas", batch_size=cfg.chunk_rows,
            compute=ray.data.ActorPoolStrategy(size=cfg.workers),
            fn_constructor_kwargs=dict(run_dir=str(run_dir), text_columns=texts, id_column=id_col, cfg=cfg,
                                       inference=inference),
            num_gpus=cfg.gpus_per_worker if gpu else None, num_cpus=cpus_per_worker)
        # an actor's LorafitError (a bad row) reaches here as itself, not as Ray Data's UserCodeException, which
        # keeps only its text; set on this dataset's own context, not the process's
        preds.context.raise_original_map_exception = True
        out.mkdir(parents=True, exist_ok=True)
        if output_format == "csv":
            preds.write_csv(str(out))
        else:
            preds.write_parquet(str(out))
    except Exception as exc:  # noqa: BLE001 - Ray wraps what an actor raised; a LorafitError is shown as one line
        cause = _lorafit_cause(exc)
        if cause is exc or cause is None:
            raise
        raise LorafitError(str(cause).strip().splitlines()[0]) from None
    finally:
        if started:
            ray.shutdown()
    shards = sorted(p for p in out.iterdir() if p.is_file() and p.suffix == f".{output_format}")
    return RayPredictResult(out, shards, files, time.perf_counter() - t0)


def read_predictions(output_dir: str | Path) -> pd.DataFrame:
    """All shards of an output folder as one table, sorted by ID (how tests and small jobs read it back)."""
    out = Path(output_dir)
    parts = [pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p) for p in sorted(out.iterdir())
             if p.suffix in (".csv", ".parquet")]
    if not parts:
        raise LorafitError(f"{out}: no prediction shards")
    return pd.concat(parts, ignore_index=True).sort_values("ID", kind="stable", ignore_index=True)


__all__ = ["BatchPredictor", "RayPredictResult", "input_files", "predict_with_ray", "read_predictions"]
