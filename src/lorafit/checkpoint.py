"""Resumable checkpoints: trainable weights, optimizer, scheduler, grad scaler, every RNG state and the position
in the data, so `lorafit train --resume RUN` continues exactly where a killed run stopped.

Hand-written rather than Accelerate's save_state: that pickles RNG states and saves the frozen backbone too;
this saves only what training changes, as safetensors + JSON, and loads without unpickling anything.

    checkpoints/step-000200/
        trainable.safetensors   parameters that train (LoRA + head, or everything for full fine-tuning)
        best.safetensors        the best-so-far trainable parameters (restored at the end of training)
        optimizer.safetensors   AdamW moments and step counts; optimizer.json holds the param groups
        rng.safetensors         torch CPU (and CUDA) generator states, one set per process (rank<i>.*)
        state.json              step, epoch, batches done in the epoch, best metric, counters, scheduler,
                                scaler, Python and NumPy RNG states
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import LorafitError
from .fileio import atomic_directory, atomic_write_json
from .model import load_trainable_state_dict

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d+)$")


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def _flat(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def torch_rng_state() -> dict[str, torch.Tensor]:
    """The torch CPU and CUDA generator states: all that a training step draws from (dropout)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return tensors


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = torch_rng_state()
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    return tensors, {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }


def _set_rng_state(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, np_gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, np_gauss))


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, scaler, loop_state: dict[str, Any],
                    best_state: Optional[dict[str, torch.Tensor]], keep: int,
                    rngs: Optional[list[tuple[dict[str, torch.Tensor], dict[str, Any]]]] = None) -> Path:
    """Write checkpoints/step-N in a temporary directory and rename it into place; prune old ones.
    `rngs`: every process's rng_state() in process order (default: this process's only)."""
    final = Path(run_dir) / CHECKPOINT_DIR / f"step-{step:06d}"
    with atomic_directory(final) as tmp:
        save_file(_flat({n: p for n, p in model.named_parameters() if p.requires_grad}), tmp / "trainable.safetensors")
        if best_state is not None:
            save_file(_flat(best_state), tmp / "best.safetensors")
        opt = optimizer.state_dict()
        save_file(_flat({f"{pid}.{key}": value for pid, st in opt["state"].items() for key, value in st.items()
                         if torch.is_tensor(value)}), tmp / "optimizer.safetensors")
        atomic_write_json(tmp / "optimizer.json", {"param_groups": opt["param_groups"]})
        rngs = rngs or [rng_state()]
        # process 0's states under their plain names (single-process checkpoints read as before)
        tensors = {(name if i == 0 else f"rank{i}.{name}"): t for i, (ts, _) in enumerate(rngs) for name, t in ts.items()}
        save_file(_flat(tensors), tmp / "rng.safetensors")
        atomic_write_json(tmp / "state.json", {
            **loop_state, "step": step, "rng": rngs[0][1], "rng_processes": [js for _, js in rngs[1:]],
            "scheduler": json.loads(json.dumps(scheduler.state_dict(), default=lambda o: None)),
            "scaler": scaler.state_dict() if scaler is not None else None,
        })
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler, process_index: int = 0
                    ) -> tuple[dict[str, Any], Optional[dict[str, torch.Tensor]]]:
    """Restore everything save_checkpoint wrote; return (loop state, best trainable state or None).
    The RNG states are `process_index`'s (process 0's if the checkpoint has fewer processes)."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        trainable = load_file(path / "trainable.safetensors")
        load_trainable_state_dict(model, trainable, source=str(path))  # never a frozen (or quantized) weight
        opt_tensors = load_file(path / "optimizer.safetensors")
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in opt_tensors.items():
            pid, name = key.split(".", 1)
            opt_state.setdefault(int(pid), {})[name] = value
        groups = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))["param_groups"]
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rng_tensors = load_file(path / "rng.safetensors")
        others = state.get("rng_processes") or []
        if 0 < process_index <= len(others):
            prefix = f"rank{process_index}."
            _set_rng_state({k[len(prefix):]: v for k, v in rng_tensors.items() if k.startswith(prefix)},
                           others[process_index - 1])
        else:
            _set_rng_state({k: v for k, v in rng_tensors.items() if not k.startswith("rank")}, state["rng"])
        best = load_file(path / "best.safetensors") if (path / "best.safetensors").is_file() else None
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
        raise LorafitError(f"{path}: checkpoint is damaged ({type(exc).__name__}: {exc}); "
                           "delete it to resume from the one before") from None
    return state, best
