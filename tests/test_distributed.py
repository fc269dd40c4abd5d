"""Multi-process training on the CPU (gloo), launched as users do (torchrun): 2 processes at batch 4 train the
same steps as 1 process at batch 8, to float tolerance; a killed 2-process run resumes with 2 processes."""

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

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def torchrun(*args) -> list[str]:
    """`torchrun --standalone --nproc-per-node 2 -m lorafit.cli train ...` (standalone: a free local port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "lorafit.cli", "train", *map(str, args)]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def config_path(tiny_model_dir, tmp_path_factory):
    """No dropout anywhere (its masks depend on the batch shape per process), no length grouping, LoRA on the top
    layer so the frozen-prefix cache runs under DDP; 96 rows at a global batch of 8: 12 steps an epoch."""
    out = tmp_path_factory.mktemp("dist")
    cfg = tiny_config(tiny_model_dir("bert"), out, pooling="cls", epochs=2, max_train_samples=96, batch_size=8,
                      lora_layers=[-1], lora_dropout=0.0, encoder_dropout=0.0, attention_dropout=0.0,
                      classifier_dropout=0.0, group_by_length=False, num_threads=1, checkpoint_every=5,
                      learning_rate=2e-2, metric_for_best="loss")
    cfg.to_yaml(out / "config.yaml")
    return out / "config.yaml"


@pytest.fixture(scope="module")
def two_process_run(config_path):
    out = config_path.parent
    done = subprocess.run(torchrun(config_path, "--batch-size", 4, "--run-name", "two"), env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return out / "two"


def test_two_processes_at_batch_4_match_one_process_at_batch_8(config_path, two_process_run):
    import lorafit

    one = lorafit.train(str(config_path), run_name="one")
    two = json.loads((two_process_run / "run.json").read_text())
    assert two["status"] == "completed" and two["num_processes"] == 2
    assert two["steps"] == one.info["steps"] == 24 and two["epochs_completed"] == one.info["epochs_completed"] == 2
    assert two["speed_paths"]["prefix_cache"] is True
    # Why the numbers can differ at all: with 2 processes each step's gradient is the mean of two 4-row means,
    # all-reduced by gloo, instead of one 8-row mean, and each half is padded to its own longest text; the same
    # sums in another order round differently (~1e-7 relative), and that compounds over the 24 steps.
    test_two = json.loads((two_process_run / "test_metrics.json").read_text())
    assert test_two["accuracy"] == one.test_metrics["accuracy"]
    assert test_two["loss"] == pytest.approx(one.test_metrics["loss"], rel=1e-4, abs=1e-5)
    a, b = _weights(one.path), _weights(two_process_run)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4)
    # only the main process wrote: each event once in metrics.jsonl
    rows = [json.loads(line) for line in (two_process_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == [5, 10, 15, 20, 24]


def test_a_killed_two_process_run_resumes_with_two_processes(config_path, two_process_run):
    out = config_path.parent
    run = out / "killed"
    proc = subprocess.Popen(torchrun(config_path, "--batch-size", 4, "--run-name", "killed"), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    ready = run / "checkpoints" / "step-000005" / "state.json"
    while proc.poll() is None and time.time() < deadline and not ready.is_file():
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    # SIGKILL to the launcher and both workers at once, as a crash of the machine would (the workers run in
    # their own process group, so they are found as the launcher's children)
    import psutil

    for process in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        process.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    assert not (run / "model").exists()

    resumed = subprocess.run(torchrun("--resume", run), env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["resumed"] is True and info["steps"] == 24
    ref_metrics = json.loads((two_process_run / "test_metrics.json").read_text())
    got_metrics = json.loads((run / "test_metrics.json").read_text())
    assert got_metrics["accuracy"] == ref_metrics["accuracy"]
    assert got_metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=1e-5, abs=1e-6)
    a, b = _weights(two_process_run), _weights(run)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    steps = lambda d: [(r["type"], r.get("split"), r["step"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    assert steps(run) == steps(two_process_run)
