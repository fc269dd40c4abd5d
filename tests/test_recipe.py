"""TrainingRecipe's interface as other code uses it: the step-by-step calls, callbacks, reuse across recipes,
no test evaluation, two precisions in one process, no validation split; global state left as it was; R-Drop."""

import importlib
import math
import json

import pytest
import torch

from conftest import tiny_config
from lorafit.recipe import TrainingRecipe


def _cfg(tiny_model_dir, out, **overrides):
    values = dict(pooling="cls", epochs=1, max_train_samples=64, max_eval_samples=40, lora_layers=[-1], num_threads=1)
    values.update(overrides)
    return tiny_config(tiny_model_dir("bert"), out, **values)


class Recorder:
    def __init__(self, fail_at=None):
        self.calls = []
        self.fail_at = fail_at

    def on_evaluate(self, recipe, split, step, metrics):
        self.calls.append((split, step, metrics["accuracy"]))
        if step == self.fail_at:
            raise RuntimeError("pruned by the callback")


def test_step_by_step_with_callbacks_and_no_test_evaluation(tiny_model_dir, tmp_path):
    recorder = Recorder()
    recipe = TrainingRecipe(_cfg(tiny_model_dir, tmp_path, epochs=2, eval_every=3), callbacks=[recorder])
    recipe.setup()
    epochs = 0
    while recipe.train_epoch():
        epochs += 1
    assert epochs == 1 and recipe.state.epoch == 2 and recipe.state.step == 8  # 4 steps an epoch
    assert [(s, step) for s, step, _ in recorder.calls] == [("validation", 3), ("validation", 4), ("validation", 6),
                                                           ("validation", 8)]
    metrics = recipe.evaluate("validation")
    assert metrics["accuracy"] == recorder.calls[-1][2]
    run = recipe.finish(evaluate_test=False)
    assert run.test_metrics == {}
    assert not (run.path / "test_metrics.json").exists() and not (run.path / "test_predictions.csv").exists()
    info = json.loads((run.path / "run.json").read_text())
    assert info["status"] == "completed" and (run.path / "model").is_dir()
    assert info["speed_paths"] == {"prefix_cache": True, "prefix_cache_from_layer": 1, "frozen_weights": "fp32",
                                   "fused_lora": True, "fast_dropout": True, "attention_kernel": "math",
                                   "quantized_base": "none"}
    train_rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()
                  if '"train"' in line]
    assert train_rows and all(0 <= r["accuracy"] <= 1 for r in train_rows)


def test_a_recipe_that_never_evaluates_test_caches_no_test_prefix(tiny_model_dir, tmp_path):
    recipe = TrainingRecipe(_cfg(tiny_model_dir, tmp_path), evaluate_test=False)  # as a search trial runs
    recipe.setup()
    assert set(recipe.forward.prefix.flat) == {"train", "validation"} and set(recipe.forward.prefix_time) == {"train", "validation"}
    while recipe.train_epoch():
        pass
    run = recipe.finish()
    assert run.test_metrics == {} and not (run.path / "test_metrics.json").exists()


def test_a_callback_error_ends_the_run_as_failed_and_state_is_restored(tiny_model_dir, tmp_path):
    threads = torch.get_num_threads()
    recipe = TrainingRecipe(_cfg(tiny_model_dir, tmp_path, eval_every=2), callbacks=[Recorder(fail_at=2)])
    recipe.setup()
    with torch.no_grad(), pytest.raises(RuntimeError, match="pruned"):
        recipe.train_epoch()  # trains although the caller disabled grad ...
    info = json.loads((recipe.run_dir / "run.json").read_text())
    assert info["status"] == "failed" and "pruned by the callback" in info["error"]
    assert torch.is_grad_enabled() and torch.get_num_threads() == threads  # ... and leaves both as they were
    assert not any(type(m).__name__ == "FastDropout" for m in recipe.unwrapped.modules())  # speed paths undone


def test_reuse_skips_tokenising_and_the_prefix_and_gives_the_same_run(tiny_model_dir, tmp_path, monkeypatch):
    prep_module = importlib.import_module("lorafit.data_prep")  # where the recipe encodes its splits
    from lorafit.train import train
    from lorafit.prefix_cache import FrozenPrefix

    counts = {"encode": 0, "prefix": 0}
    real_encode, real_compute = prep_module.encode, FrozenPrefix.compute

    def encode(*args, **kwargs):
        counts["encode"] += 1
        return real_encode(*args, **kwargs)

    def compute(self, *args, **kwargs):
        counts["prefix"] += 1
        return real_compute(self, *args, **kwargs)

    monkeypatch.setattr(prep_module, "encode", encode)
    monkeypatch.setattr(FrozenPrefix, "compute", compute)
    reuse: dict = {}
    first = train(_cfg(tiny_model_dir, tmp_path, run_name="a"), reuse=reuse)
    assert counts == {"encode": 3, "prefix": 3}
    second = train(_cfg(tiny_model_dir, tmp_path, run_name="b"), reuse=reuse)
    assert counts == {"encode": 3, "prefix": 3}  # nothing tokenised or computed again
    assert second.test_metrics["loss"] == first.test_metrics["loss"]
    a = json.loads((first.path / "metrics.jsonl").read_text().splitlines()[-1])
    b = json.loads((second.path / "metrics.jsonl").read_text().splitlines()[-1])
    assert a["accuracy"] == b["accuracy"] and a["loss"] == b["loss"]
    third = train(_cfg(tiny_model_dir, tmp_path, run_name="c", max_length=40), reuse=reuse)
    assert counts == {"encode": 6, "prefix": 6} and third.path.name == "c"  # another key: computed afresh


def test_two_precisions_in_one_process(tiny_model_dir, tmp_path):
    """Accelerate's process-wide state must not refuse the second run's precision (no private reset needed)."""
    from lorafit.train import train

    fp32 = train(_cfg(tiny_model_dir, tmp_path, run_name="fp32", precision="fp32"))
    bf16 = train(_cfg(tiny_model_dir, tmp_path, run_name="bf16", precision="bf16"))
    again = train(_cfg(tiny_model_dir, tmp_path, run_name="fp32-again", precision="fp32"))
    assert json.loads((bf16.path / "run.json").read_text())["precision"] == "bf16"
    assert json.loads((again.path / "run.json").read_text())["precision"] == "fp32"
    assert again.test_metrics["loss"] == fp32.test_metrics["loss"]  # no precision left over from the bf16 run
    assert bf16.test_metrics["loss"] != fp32.test_metrics["loss"]


def test_without_a_validation_split_the_last_weights_are_kept(tiny_model_dir, tmp_path, monkeypatch):
    import numpy as np

    prep_module = importlib.import_module("lorafit.data_prep")  # where the recipe encodes its splits
    from lorafit.train import train
    from lorafit.data import Split

    real = prep_module.load_data

    def no_validation(cfg, seed):  # what --validation-size 0 gives (data.py)
        bundle = real(cfg, seed)
        bundle.validation = Split([], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        return bundle

    monkeypatch.setattr(prep_module, "load_data", no_validation)
    run = train(_cfg(tiny_model_dir, tmp_path, eval_every=2))
    info = json.loads((run.path / "run.json").read_text())
    assert info["status"] == "completed" and info["weights"] == "last (no validation split)"
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r.get("split") == "validation"] and rows[-1]["split"] == "test"


def test_the_progress_bar_keeps_epochs_and_steps_whole_in_80_columns():
    import io

    from rich.console import Console

    from lorafit.console import progress_bar

    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=False)
    with progress_bar(console, main=True) as progress:
        progress.add_task("train", total=10240, completed=1024, epoch="2/40",
                                 info="loss 0.3412  lr 9.87e-04  1234.5 samples/s and more words to overflow")
        progress.refresh()
    text = out.getvalue()
    assert "epoch 2/40" in text and "1024/10240" in text and len(text.strip().splitlines()) == 1


def test_symmetric_kl_known_numbers():
    from lorafit.rdrop import symmetric_kl

    # p = [0.75, 0.25], q = [0.5, 0.5]: KL(p||q) = 0.75 ln 1.5 + 0.25 ln 0.5, KL(q||p) = 0.5 ln(2/3) + 0.5 ln 2
    p, q = torch.tensor([[math.log(3), 0.0]]), torch.zeros(1, 2)
    expected = (0.75 * math.log(1.5) + 0.25 * math.log(0.5) + 0.5 * math.log(2 / 3) + 0.5 * math.log(2)) / 2
    assert symmetric_kl(p, q).item() == pytest.approx(expected, abs=1e-6)
    assert symmetric_kl(q, p).item() == pytest.approx(expected, abs=1e-6)
    assert symmetric_kl(p.repeat(3, 1), p.repeat(3, 1)).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("cache", [True, False])
def test_rdrop_runs_every_row_twice_with_its_own_dropout(tiny_model_dir, tmp_path, monkeypatch, cache):
    """Each step's penalty compares two predictions of the same rows that differ only by dropout, with the frozen
    prefix cached (the copies share its states) or not; with rdrop_alpha 0 nothing of it runs."""
    from lorafit.train import recipe_for

    rdrop_module = importlib.import_module("lorafit.rdrop")
    calls = []
    real = rdrop_module.symmetric_kl

    def spy(a, b):
        calls.append((a.detach().clone(), b.detach().clone()))
        return real(a, b)

    monkeypatch.setattr(rdrop_module, "symmetric_kl", spy)
    recipe = recipe_for(_cfg(tiny_model_dir, tmp_path, rdrop_alpha=1.0, max_steps=3, batch_size=8,
                                 lora_dropout=0.3, cache_frozen_prefix=cache))
    recipe.setup()
    assert (recipe.forward.prefix is not None) == cache
    while recipe.train_epoch():
        pass
    assert len(calls) == 3
    for a, b in calls:
        assert a.shape == b.shape == (8, 4) and not torch.equal(a, b)
    calls.clear()
    recipe_for(_cfg(tiny_model_dir, tmp_path / "plain", max_steps=2, lora_dropout=0.3)).run()
    assert calls == []
