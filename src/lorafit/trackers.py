"""Experiment trackers (train.report_to: TensorBoard, Weights & Biases, MLflow), through Accelerate's trackers:
which are asked for and installed, W&B's online or offline mode, and the arguments Accelerate passes on."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .config import Config
from .errors import LorafitError

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def trackers_of(cfg: Config) -> list[str]:
    """train.report_to without 'none'; a tracker whose package is missing is one clear line, before training."""
    import importlib.util

    chosen = [t for t in cfg.train.report_to if t != "none"]
    for tracker in chosen:
        if importlib.util.find_spec(TRACKER_PACKAGES[tracker]) is None:
            raise LorafitError(f"train.report_to: {tracker} is not installed; pip install {tracker} (or "
                               f"'lorafit[tracking]'), or drop it from --report-to")
    return chosen


WANDB_HOST = "https://api.wandb.ai"


def wandb_mode(env: Mapping[str, str], netrc_path: Optional[Union[str, Path]] = None) -> str:
    """W&B's mode for --report-to wandb: WANDB_MODE when set; else 'online' when credentials exist (WANDB_API_KEY,
    or a netrc entry for the W&B host, WANDB_BASE_URL's or api.wandb.ai, which is where `wandb login` stores the
    key); else 'offline' (logs under <run>/wandb, `wandb sync` later). netrc_path: default NETRC, else ~/.netrc."""
    import netrc
    from urllib.parse import urlparse

    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    if env.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(env.get("WANDB_BASE_URL") or WANDB_HOST).hostname  # wandb login keys its entry by host alone
    if netrc_path is None:
        netrc_path = env.get("NETRC") or Path(env.get("HOME") or Path.home()) / ".netrc"
    try:
        entry = netrc.netrc(str(netrc_path)).authenticators(host) if host else None
    except (OSError, netrc.NetrcParseError):  # no file, unreadable or malformed: no credentials to go online with
        entry = None
    return "online" if entry and entry[2] else "offline"


def tracker_init(cfg: Config, run_name: str, run_dir: Path, env: Mapping[str, str],
                 netrc_path: Optional[Union[str, Path]] = None) -> tuple[str, dict[str, dict[str, Any]]]:
    """Accelerate's init_trackers(project_name, init_kwargs=...) arguments. Accelerate passes project_name to
    wandb.init as project= (and so would override WANDB_PROJECT): with W&B among the trackers, train.wandb_project,
    else WANDB_PROJECT, else 'lorafit'; without it always 'lorafit'. The entity is passed only when set, so wandb
    reads WANDB_ENTITY itself otherwise."""
    t = cfg.train
    project = "lorafit"
    wandb = {"name": run_name, "dir": str(run_dir)}
    if "wandb" in t.report_to:
        project = t.wandb_project or env.get("WANDB_PROJECT") or project
        wandb["mode"] = wandb_mode(env, netrc_path)
        if t.wandb_entity:
            wandb["entity"] = t.wandb_entity
    return project, {"wandb": wandb, "mlflow": {"run_name": run_name}}


def flat_config(cfg: Config) -> dict[str, Any]:
    """The resolved config as section.name -> scalar, as trackers' hyperparameter tables take it."""
    out = {}
    for section, values in cfg.model_dump(mode="json").items():
        for name, value in values.items():
            out[f"{section}.{name}"] = (",".join(map(str, value)) if isinstance(value, list)
                                        else "none" if value is None else value)
    return out
