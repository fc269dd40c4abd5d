"""Device, precision and batch size: 'auto' picks the GPU where there is one, the same way in train and predict;
checked on the CPU by making torch report a GPU (nothing runs on it)."""

import pytest
import torch
from typer.testing import CliRunner

import lorafit
from lorafit.cli import app
from lorafit.errors import LorafitError
from lorafit.predict import resolve_backend
from lorafit.runtime import inference_batch_size, inference_precision, resolve_device


@pytest.fixture()
def a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_auto_is_the_cpu_without_a_gpu_and_the_gpu_with_one(monkeypatch, a_gpu):
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"
    assert inference_precision("auto", "cuda") == "bf16" and inference_batch_size("auto", "cuda") == 256
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("lorafit.runtime.mps_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    assert inference_precision("auto", "cpu") == "fp32" and inference_batch_size("auto", "cpu") == 16
    assert inference_precision("bf16", "cpu") == "bf16" and inference_batch_size(7, "cpu") == 7


def test_a_device_that_is_not_there_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LorafitError, match="device: cuda requested but no CUDA GPU is visible"):
        resolve_device("cuda", field="device")
    with pytest.raises(LorafitError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_auto_backend_takes_the_export_on_a_cpu_and_torch_on_a_gpu(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.int8.onnx").write_bytes(b"")
    assert resolve_backend(tmp_path, "auto", "cpu")[0] == "onnx-int8"
    assert resolve_backend(tmp_path, "auto", "cuda")[0] == "torch"
    assert resolve_backend(tmp_path, "onnx-int8", "cuda")[0] == "onnx-int8"  # asked for by name: as asked


def test_load_and_the_commands_take_device(tiny_run, monkeypatch):
    clf = lorafit.load(tiny_run, backend="torch")  # auto on this machine: the CPU, fp32, 16 texts per forward
    assert clf.device == "cpu" and clf.batch_size == 16 and clf.backend.name == "torch"
    assert next(clf.model.parameters()).device.type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LorafitError, match="no CUDA GPU is visible"):
        lorafit.load(tiny_run, device="cuda")
    for command in (["classify", str(tiny_run), "some text"], ["evaluate", str(tiny_run), "-i", "x.csv"],
                    ["predict", str(tiny_run), "-i", "x.csv", "-o", "y.csv"]):
        result = CliRunner().invoke(app, [*command, "--device", "cuda"])
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert "device: cuda requested but no CUDA GPU is visible" in result.output
