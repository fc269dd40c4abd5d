"""How a run fails (issue 23): an exception without a message still says where it stopped, and CUDA running out
of memory is one line naming the batch size to lower and leaves a checkpoint that --resume continues exactly.
torch.cuda.OutOfMemoryError exists on CPU builds, so the out-of-memory path is exercised by raising it."""

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_config
from test_resume import assert_same_run

from lorafit.errors import describe


@pytest.fixture()
def fake_library(tmp_path, monkeypatch):
    """A module outside the tests (pytest rewrites the asserts of test modules, adding a message), shaped like
    bitsandbytes' check that stopped the issue's run."""
    package = tmp_path / "lib" / "fakebnb" / "nn"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "modules.py").write_text("def fix_state(weight):\n    assert weight.shape[1] == 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    import importlib
    import sys

    yield importlib.import_module("fakebnb.nn.modules")
    for name in ("fakebnb.nn.modules", "fakebnb.nn", "fakebnb"):  # the next test imports its own copy
        sys.modules.pop(name, None)


def test_an_exception_without_a_message_names_its_file_line_and_source(fake_library):
    with pytest.raises(AssertionError) as caught:
        fake_library.fix_state(torch.zeros(4, 8))
    assert str(caught.value) == ""
    assert describe(caught.value) == "AssertionError at fakebnb/nn/modules.py:2 (assert weight.shape[1] == 1)"
    assert describe(ValueError("bad value")) == "ValueError: bad value"
    assert describe(AssertionError()) == "AssertionError"  # never raised: no traceback to point into


def test_a_failed_run_records_the_location_of_a_bare_assertion(tiny_model_dir, tmp_path, monkeypatch, fake_library):
    import lorafit
    from lorafit.recipe import TrainingRecipe

    def broken_step(self, batch, sync):
        fake_library.fix_state(batch["input_ids"])  # as bitsandbytes' fix_4bit_weight_quant_state_from_module

    monkeypatch.setattr(TrainingRecipe, "train_step", broken_step)
    with pytest.raises(AssertionError):
        lorafit.train(tiny_config(tiny_model_dir("bert"), tmp_path / "runs", max_train_samples=64, epochs=1))
    info = json.loads((tmp_path / "runs" / "run" / "run.json").read_text())
    assert info["status"] == "failed"
    assert info["error"] == "AssertionError at fakebnb/nn/modules.py:2 (assert weight.shape[1] == 1)"
    assert "peak_gpu_memory_gb" not in info  # a CPU run holds no GPU memory


@pytest.fixture()
def oom_config(tiny_model_dir, tmp_path):
    def make(name):
        out = tmp_path / name
        cfg = tiny_config(tiny_model_dir("bert"), out, pooling="cls", epochs=2, max_train_samples=160,
                          batch_size=16, grad_accum_steps=2, checkpoint_every=None, eval_every=2, lora_dropout=0.1,
                          num_threads=1)
        out.mkdir()
        cfg.to_yaml(out / "config.yaml")
        return out

    return make


def test_cuda_out_of_memory_is_one_line_and_the_run_resumes_exactly(oom_config, monkeypatch):
    import lorafit
    from lorafit.cli import app
    from lorafit.recipe import TrainingRecipe
    from lorafit.train import resume

    ref_dir = oom_config("ref")
    ref = lorafit.train(str(ref_dir / "config.yaml"))
    assert ref.info["peak_gpu_memory_gb"] is None  # recorded for CUDA runs only

    real_step, calls = TrainingRecipe.train_step, []

    def step_then_oom(self, batch, sync):
        calls.append(sync)
        if len(calls) == 8:  # the 2nd micro-batch of optimizer step 4 (grad accumulation 2): mid-step
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, batch, sync)

    run_dir = oom_config("oom")
    monkeypatch.setattr(TrainingRecipe, "train_step", step_then_oom)
    result = CliRunner().invoke(app, ["train", str(run_dir / "config.yaml")])
    monkeypatch.setattr(TrainingRecipe, "train_step", real_step)
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    run = run_dir / "run"
    assert f"CUDA out of memory at step 4 with --batch-size 16: train again with --batch-size 8 --grad-accum-steps 4 " \
           f"(the same global batch of 32); checkpoint saved at step 3: after freeing GPU memory, resume with: " \
           f"lorafit train --resume {run}" in message
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and "CUDA out of memory at step 4" in info["error"]
    state = json.loads((run / "checkpoints" / "step-000003" / "state.json").read_text())
    assert state["step"] == 3 and state["batches_done"] == 6  # the completed step's position, not the failed one's

    resumed = resume(run)
    assert resumed.info["resumed"] is True
    assert_same_run(ref.path, run)


def test_out_of_memory_inside_the_optimizer_update_saves_nothing_half_updated(oom_config, monkeypatch):
    import lorafit
    from lorafit.errors import LorafitError
    from lorafit.recipe import TrainingRecipe

    real_setup = TrainingRecipe._setup

    def setup_with_failing_update(self, *args):
        real_setup(self, *args)
        real_update, count = self.optimizer.step, []

        def update(*a, **k):
            count.append(1)
            if len(count) == 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return real_update(*a, **k)

        self.optimizer.step = update

    monkeypatch.setattr(TrainingRecipe, "_setup", setup_with_failing_update)
    run_dir = oom_config("oom-update")
    with pytest.raises(LorafitError, match="CUDA out of memory at step 2 .*; no checkpoint yet"):
        lorafit.train(str(run_dir / "config.yaml"))
    assert not (run_dir / "run" / "checkpoints").exists()


def test_out_of_memory_while_evaluating_names_the_eval_batch_size_and_resumes_with_a_smaller_one(oom_config,
                                                                                                monkeypatch):
    import sys

    from lorafit.cli import app
    from lorafit.train import resume

    recipe_mod = sys.modules["lorafit.recipe"]  # the module whose evaluate() calls predict_logits

    real_predict, calls = recipe_mod.predict_logits, []

    def predict_then_oom(*args, **kwargs):  # what evaluate() runs its batches through
        calls.append(1)
        if len(calls) == 2:  # the validation at step 4 (eval_every 2)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_predict(*args, **kwargs)

    run_dir = oom_config("oom-eval")
    monkeypatch.setattr(recipe_mod, "predict_logits", predict_then_oom)
    result = CliRunner().invoke(app, ["train", str(run_dir / "config.yaml")])
    monkeypatch.setattr(recipe_mod, "predict_logits", real_predict)
    run = run_dir / "run"
    assert result.exit_code == 2, result.output
    assert (f"CUDA out of memory at step 4 while evaluating with --eval-batch-size 32: checkpoint saved at step 4: "
            f"resume with: lorafit train --resume {run} --eval-batch-size 16") in " ".join(result.output.split())
    resumed = resume(run, eval_batch_size=16)
    assert resumed.info["steps"] == 10 and json.loads((run / "run.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("batch, accum, processes, expected", [
    (16, 2, 1, "train again with --batch-size 8 --grad-accum-steps 4 (the same global batch of 32)"),
    (5, 1, 2, "train again with --batch-size 2 --grad-accum-steps 2 (a global batch of 8 for 10)"),
    (1, 4, 1, "train again with a shorter --max-length or a smaller model (--batch-size is already 1)"),
])
def test_the_smaller_batch_keeps_the_global_batch_where_it_can(batch, accum, processes, expected):
    from lorafit.errors import smaller_batch

    assert smaller_batch(batch, accum, processes) == expected


def test_out_of_memory_in_the_test_evaluation_leaves_a_run_that_resumes_to_completion(oom_config, monkeypatch):
    import sys

    from lorafit.errors import LorafitError
    from lorafit.recipe import TrainingRecipe
    from lorafit.train import resume, train

    recipe_mod = sys.modules["lorafit.recipe"]
    real_predict, real_finish, finishing = recipe_mod.predict_logits, TrainingRecipe._finish, []

    def finish(self, evaluate_test):
        finishing.append(True)
        return real_finish(self, evaluate_test)

    def oom_on_the_test_split(*args, **kwargs):
        if finishing:  # the test split's evaluation, after training
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_predict(*args, **kwargs)

    run_dir = oom_config("oom-test")
    monkeypatch.setattr(recipe_mod, "predict_logits", oom_on_the_test_split)
    monkeypatch.setattr(TrainingRecipe, "_finish", finish)
    with pytest.raises(LorafitError, match=r"at step 10 while evaluating with --eval-batch-size 32: checkpoint saved "
                                           r"at step 10: resume with: .* --eval-batch-size 16"):
        train(str(run_dir / "config.yaml"))
    monkeypatch.setattr(recipe_mod, "predict_logits", real_predict)
    monkeypatch.setattr(TrainingRecipe, "_finish", real_finish)
    assert not (run_dir / "run" / "model").exists()
    resumed = resume(run_dir / "run", eval_batch_size=16)
    assert resumed.test_metrics["n"] == 80 and (run_dir / "run" / "model").is_dir()


def test_peak_gpu_memory_is_read_for_cuda_devices_only(monkeypatch):
    from lorafit.runtime import peak_gpu_memory_gb

    seen = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: seen.append(device) or 2_345_678_901)
    assert peak_gpu_memory_gb(torch.device("cuda", 0)) == 2.346 and seen == [torch.device("cuda", 0)]
    assert peak_gpu_memory_gb(torch.device("cpu")) is None and len(seen) == 1
