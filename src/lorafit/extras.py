"""Optional extras (pyproject.toml): a command that needs one imports it itself, and where it is missing says in
one line which extra to install; every other command works without it."""

from __future__ import annotations

import importlib

from .errors import LorafitError

# the importable modules of the extras that require_extra checks (qlora: model.check_quantization; ray:
# ray_predict; mpnet, data only: embedded.py; each says which extra to install in its own words)
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
    "inference": ("onnx", "onnxruntime"),
    "search": ("optuna",),
}


def require_extra(extra: str, needed_by: str, modules: tuple[str, ...] = ()) -> None:
    """Import the extra's modules (or `modules` of it); a missing one is one line: what needs it, what to install."""
    missing = []
    for module in modules or EXTRA_MODULES[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise LorafitError(f"{needed_by} needs the '{extra}' extra ({', '.join(missing)} not installed): "
                           f"pip install 'lorafit[{extra}]'")
