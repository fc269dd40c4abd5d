"""Resume after SIGKILL gives the same final metrics, weights and metrics.jsonl as an uninterrupted run: mid-epoch,
and at an epoch boundary with whole epochs still to run, with the frozen-prefix cache on and off. The process is
killed from outside, as a crash would: the test waits until a given checkpoint exists, then sends SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _train_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "lorafit.cli", "train", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def kill_when(cmd: list[str], ready, timeout: float = 300) -> subprocess.CompletedProcess:
    """Start `cmd`, SIGKILL it as soon as `ready()` holds (polled every 10 ms); return how it ended."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline and not ready():
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def checkpoint_exists(run: Path, step: int):
    return lambda: (run / "checkpoints" / f"step-{step:06d}" / "state.json").is_file()


def latest_checkpoint_state(run: Path) -> dict:
    from lorafit.checkpoint import list_checkpoints

    return json.loads((list_checkpoints(run)[-1] / "state.json").read_text())


def metric_rows(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields, which no two runs share."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("samples_per_s", "time")} for r in rows]


def assert_same_run(ref: Path, got: Path):
    ref_metrics = json.loads((ref / "test_metrics.json").read_text())
    got_metrics = json.loads((got / "test_metrics.json").read_text())
    assert got_metrics["accuracy"] == ref_metrics["accuracy"]
    assert got_metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=1e-5, abs=1e-6)
    # the blend's record of the best weights' validation accuracy: kept from the evaluation that found them, or
    # (resumed after it) measured again on the restored weights
    ref_blend, got_blend = (json.loads((d / "run.json").read_text())["tfidf"] for d in (ref, got))
    for key in ("validation_accuracy_encoder", "validation_accuracy_blend"):
        assert got_blend[key] == ref_blend[key], key
    a = load_file(ref / "model" / "adapter_model.safetensors")
    b = load_file(got / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    ref_rows, got_rows = metric_rows(ref), metric_rows(got)
    assert [(r["type"], r.get("split"), r["step"]) for r in got_rows] == [
        (r["type"], r.get("split"), r["step"]) for r in ref_rows]  # each step once, as in the reference run
    for r, g in zip(ref_rows, got_rows):
        assert g.keys() == r.keys()
        for k in r:
            if isinstance(r[k], float):
                assert g[k] == pytest.approx(r[k], rel=1e-5, abs=1e-6), (r["type"], r["step"], k)
            else:
                assert g[k] == r[k], (r["type"], r["step"], k)


@pytest.fixture(scope="module")
def resume_config(tiny_model_dir, tmp_path_factory):
    def make(name, **overrides):
        out = tmp_path_factory.mktemp(name)
        values = dict(pooling="cls", epochs=2, max_train_samples=160, checkpoint_every=3, keep_checkpoints=2,
                      eval_every=4, lora_dropout=0.1, num_threads=1)
        values.update(overrides)
        cfg = tiny_config(tiny_model_dir("bert"), out, **values)
        cfg.to_yaml(out / "config.yaml")
        return out

    return make


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(resume_config):
    import lorafit

    ref_dir = resume_config("ref")
    lorafit.train(str(ref_dir / "config.yaml"))  # in this process: the same numbers, a process start saved

    killed_dir = resume_config("killed")
    run = killed_dir / "run"
    # 10 steps an epoch, checkpoints every 3 steps and at the epoch end: step 12 is mid-way through epoch 2
    killed = kill_when([sys.executable, "-m", "lorafit.cli", "train", str(killed_dir / "config.yaml")],
                       checkpoint_exists(run, 12))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    assert not (run / "model").exists() and not (run / "test_metrics.json").exists()
    assert latest_checkpoint_state(run)["batches_done"] > 0  # resuming inside an epoch

    resumed = _train_cli("--resume", run)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["resumed"] is True
    assert_same_run(ref_dir / "run", run)


@pytest.mark.parametrize("cache", [True, False], ids=["prefix-cache", "no-cache"])
def test_sigkill_at_an_epoch_boundary_then_resume_matches_uninterrupted(resume_config, cache):
    """The defect this guards: a resumed process replayed an earlier epoch's batch order in the epochs after it."""
    import lorafit
    from lorafit.train import resume

    # LoRA on the top layer only, so the prefix cache covers layer 0 when it is on; checkpoints at epoch ends only
    settings = dict(epochs=3, lora_layers=[-1], checkpoint_every=None, eval_every=None, cache_frozen_prefix=cache)
    ref_dir = resume_config("ref-epoch", **settings)
    ref = lorafit.train(str(ref_dir / "config.yaml"))
    assert ref.info["prefix_cache_from_layer"] == (1 if cache else None)
    steps_per_epoch = ref.info["steps"] // 3

    killed_dir = resume_config("killed-epoch", **settings)
    run = killed_dir / "run"
    killed = kill_when([sys.executable, "-m", "lorafit.cli", "train", str(killed_dir / "config.yaml")],
                       checkpoint_exists(run, steps_per_epoch))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = latest_checkpoint_state(run)
    assert state["batches_done"] == 0 and state["step"] <= ref.info["steps"] - steps_per_epoch  # a whole epoch to go

    resumed = resume(run)
    assert resumed.info["resumed"] is True
    assert_same_run(ref.path, run)


def test_sigterm_saves_a_checkpoint_and_marks_interrupted(resume_config):
    out = resume_config("term", epochs=400, checkpoint_every=100000)
    proc = subprocess.Popen([sys.executable, "-m", "lorafit.cli", "train", str(out / "config.yaml")],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = out / "run"
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").is_file():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "resume with: lorafit train --resume" in stderr
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    assert any(p.name.startswith("step-") for p in (run / "checkpoints").iterdir())
    from lorafit.errors import LorafitError
    from lorafit.rundir import read_run

    with pytest.raises(LorafitError, match="--resume"):
        read_run(run)
