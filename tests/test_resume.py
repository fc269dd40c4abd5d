"""Resume after SIGKILL gives the same final metrics and weights as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config


def _train_cli(cfg_path, env=None, extra=()):
    return subprocess.run([sys.executable, "-m", "lorafit.cli", "train", str(cfg_path), *extra],
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, capture_output=True, text=True,
                          timeout=600)


def _weights(run_dir):
    return load_file(run_dir / "model" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def resume_config(tiny_model_dir, tmp_path_factory):
    def make(name):
        out = tmp_path_factory.mktemp(name)
        cfg = tiny_config(tiny_model_dir("bert"), out, pooling="cls", epochs=2, max_train_samples=160,
                          checkpoint_every=3, keep_checkpoints=2, eval_every=4, lora_dropout=0.1)
        cfg.to_yaml(out / "config.yaml")
        return out

    return make


def test_sigkill_then_resume_matches_uninterrupted(resume_config):
    ref_dir = resume_config("ref")
    done = _train_cli(ref_dir / "config.yaml")
    assert done.returncode == 0, done.stderr[-2000:]

    killed_dir = resume_config("killed")
    killed = _train_cli(killed_dir / "config.yaml", env={"LORAFIT_TEST_KILL_AFTER_STEP": "13"})
    assert killed.returncode == -signal.SIGKILL
    run = killed_dir / "run"
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    assert not (run / "model").exists() and not (run / "test_metrics.json").exists()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert ckpts == ["step-000010", "step-000012"]  # every 3 steps and at the epoch end (10 steps), keep 2

    resumed = subprocess.run(
        [sys.executable, "-m", "lorafit.cli", "train", "--resume", str(run)], capture_output=True, text=True,
        timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["resumed"] is True

    ref_metrics = json.loads((ref_dir / "run" / "test_metrics.json").read_text())
    got_metrics = json.loads((run / "test_metrics.json").read_text())
    assert got_metrics["accuracy"] == ref_metrics["accuracy"]
    assert got_metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=1e-5, abs=1e-6)
    a, b = _weights(ref_dir / "run"), _weights(run)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # the metrics log has each step once, as in the reference run
    steps = lambda d: [(r["type"], r.get("split"), r["step"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    assert steps(run) == steps(ref_dir / "run")


def test_sigterm_saves_a_checkpoint_and_marks_interrupted(resume_config):
    out = resume_config("term")
    cfg_path = out / "config.yaml"
    text = cfg_path.read_text().replace("epochs: 2.0", "epochs: 400.0").replace("checkpoint_every: 3", "checkpoint_every: 100000")
    cfg_path.write_text(text)
    proc = subprocess.Popen([sys.executable, "-m", "lorafit.cli", "train", str(cfg_path)],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
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
