"""`lorafit push RUN --repo-id NAME`: publish a run's model to the Hugging Face Hub through huggingface_hub's
public API. The files are staged in a temporary folder and uploaded in one commit, so the repo never holds
half a model: either every file lands or none does."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from .card import model_card
from .errors import LorafitError
from .fileio import atomic_write_text
from .rundir import (CONFIG_FILE, DATA_FILE, LABELS_FILE, MODEL_DIR, RUN_FILE, TEST_METRICS_FILE, TOKENIZER_DIR,
                     read_run)

# What a pushed repo holds: enough for `lorafit.load(snapshot_download(repo_id))` (it reads run.json, config.yaml,
# labels.json, tokenizer/ and model/) and for the card's numbers; checkpoints, plots and predictions stay local.
PUSHED_FILES = (MODEL_DIR, TOKENIZER_DIR, LABELS_FILE, CONFIG_FILE, RUN_FILE, DATA_FILE, TEST_METRICS_FILE)
README = "README.md"


def stage(run_dir: str | Path, out: str | Path) -> Path:
    """Copy what a repo needs from a completed run into `out` (which must not exist), with the model card as
    README.md at its root; return `out`. No network."""
    run_dir, _, _ = read_run(run_dir)
    out = Path(out)
    for name in PUSHED_FILES:
        src = run_dir / name
        if not src.exists():
            raise LorafitError(f"{src}: missing; the run directory is incomplete, so it cannot be pushed")
        if src.is_dir():
            # the card is written once, at the root, where the Hub shows it
            shutil.copytree(src, out / name, ignore=shutil.ignore_patterns(README, ".*"))
        else:
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out / name)
    atomic_write_text(out / README, model_card(run_dir))
    return out


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return flag or bool(constants.HF_HUB_OFFLINE)


def push(run_dir: str | Path, repo_id: str, private: bool = False, token: Optional[str] = None) -> str:
    """Create the model repo (if needed) and upload the staged run in one commit; return the commit's URL."""
    from huggingface_hub import HfApi

    run_dir = Path(run_dir)
    read_run(run_dir)  # a run that did not complete is refused before anything else
    if _offline():
        raise LorafitError(f"push to '{repo_id}': offline mode is on (HF_HUB_OFFLINE=1); nothing was uploaded; "
                           "unset HF_HUB_OFFLINE and connect to the internet to push")
    api = HfApi(token=token, library_name="lorafit")
    with tempfile.TemporaryDirectory(prefix="lorafit-push-") as tmp:
        staged = stage(run_dir, Path(tmp) / "repo")
        try:
            api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=staged, repo_type="model",
                                       commit_message=f"lorafit push {run_dir.name}")
        except Exception as exc:  # noqa: BLE001 - HTTP, auth and connection errors all become one line
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise LorafitError(f"push to '{repo_id}' failed ({type(exc).__name__}: {reason}); nothing was uploaded; "
                               "check the network, the repo id and the token (--token or `hf auth login`)") from None
    return str(getattr(commit, "commit_url", commit))
