"""One `lorafit search` worker for test_search_e2e.py's start-together test (not a test module itself).

    python search_race_worker.py CONFIG.yaml SYNC_DIR WORKER_ID URL [URL ...]

For each storage URL in turn (one round each) the worker says it is ready (SYNC_DIR/ready-<round>-<id>), waits for
SYNC_DIR/go-<round>, then opens the study as `lorafit search` does (lorafit.search.open_study: storage, tables,
study) and adds one trial to it, and records the round's outcome in SYNC_DIR/result-<round>-<id>: 'ok', or the
error. Nothing is trained: the workers collide where issue 26's did, in opening a new storage. Imports happen once,
before the first round, so that every worker is released at the same instant. Exits 0 only when every round was
'ok'."""

import sys
import time
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.search import open_study, search_config, suggest


def main(config: str, sync: str, worker: str, *urls: str) -> int:
    sync_dir = Path(sync)
    failed = 0
    for round_, url in enumerate(urls):
        cfg = search_config(config, storage=url, study_name="bars", search_dir=str(sync_dir / f"searches-{round_}"))
        (sync_dir / f"ready-{round_}-{worker}").touch()
        go = sync_dir / f"go-{round_}"
        deadline = time.monotonic() + 300
        while not go.exists():  # a 1 ms poll: the workers leave the barrier within a few ms of each other
            if time.monotonic() > deadline:
                raise SystemExit(f"worker {worker}: no {go} within 300 s")
            time.sleep(0.001)
        try:
            study, _ = open_study(cfg, Path(cfg.search.search_dir) / cfg.search.study_name)
            trial = study.ask()
            study.tell(trial, 1.0 - abs(suggest(trial, cfg.search.space)["learning_rate"] - 3e-3))
            outcome = "ok"
        except LorafitError as exc:  # what `lorafit search` prints on one line before it exits 2
            outcome, failed = f"LorafitError: {exc}", failed + 1
        (sync_dir / f"result-{round_}-{worker}").write_text(outcome)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
