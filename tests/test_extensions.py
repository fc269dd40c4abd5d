"""The recipe's extension points (extensions.py) as a new feature would use them: every hook is called, in the
documented order and on the documented objects; what a hook returns is what the run uses."""

import csv
import json

import numpy as np
import pytest
import torch

from conftest import tiny_config
from lorafit.extensions import Extension
from lorafit.recipe import TrainingRecipe


class Note:
    """A part of model/: a file written with the weights (as the TF-IDF blend's model is)."""

    def save(self, directory):
        (directory / "note.txt").write_text("saved with the weights")


class Recording(Extension):
    def __init__(self):
        self.calls = []
        self.losses = 0

    def prepare_data(self, recipe, data):
        self.calls.append("prepare_data")
        assert recipe.run_dir is None  # no run directory yet: bad input would write nothing
        return data

    def loss_fn(self, recipe, loss_fn):
        self.calls.append("loss_fn")

        def counted(forward, batch):
            self.losses += 1
            return loss_fn(forward, batch)

        return counted

    def on_start(self, recipe):
        self.calls.append("on_start")
        recipe.record.update(recording={"started": True})

    def on_evaluate(self, recipe, split, step, metrics):
        self.calls.append(f"on_evaluate:{split}")

    def after_training(self, recipe):
        self.calls.append("after_training")

    def transform_logits(self, recipe, split, logits):
        self.calls.append(f"transform_logits:{split}")
        if split != "test":
            return logits
        always_first = np.full_like(logits, -10.0)
        always_first[:, 0] = 10.0
        return always_first  # every test row predicted as class 0

    def model_parts(self, recipe):
        self.calls.append("model_parts")
        return [Note()]

    def on_finish(self, recipe, test_metrics):
        self.calls.append("on_finish")
        recipe.record.update(recording={**recipe.record.data["recording"], "test_n": test_metrics["n"]})


def test_every_hook_runs_in_order_and_what_it_returns_is_used(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir("bert"), tmp_path, epochs=1, max_train_samples=64, eval_every=2,
                      batch_size=16, num_threads=1)
    ext = Recording()
    run = TrainingRecipe(cfg, extensions=[ext]).run()
    validations = [c for c in ext.calls if c == "on_evaluate:validation"]
    assert ext.calls == ["prepare_data", "loss_fn", "on_start",
                         *["transform_logits:validation", "on_evaluate:validation"] * len(validations),
                         "after_training", "transform_logits:test", "model_parts", "on_finish"]
    assert len(validations) == 2  # 4 steps, an evaluation every 2
    assert ext.losses == 4  # the wrapped loss ran every step
    labels = json.loads((run.path / "labels.json").read_text())
    truth = np.asarray(run.test_metrics["confusion_matrix"]).sum(1)  # rows: the true classes
    assert run.test_metrics["accuracy"] == pytest.approx(truth[0] / truth.sum())  # the transformed logits count
    with open(run.path / "test_predictions.csv", newline="") as f:
        assert {row["predicted"] for row in csv.DictReader(f)} == {labels[0]}  # ... and the predictions file
    assert (run.path / "model" / "note.txt").read_text() == "saved with the weights"
    info = json.loads((run.path / "run.json").read_text())
    assert info["recording"] == {"started": True, "test_n": run.test_metrics["n"]}


def test_a_loss_function_replaces_the_default(tiny_model_dir, tmp_path):
    """A loss that ignores the labels (every row is class `target`) is what the steps optimise."""
    import torch.nn.functional as F

    class Everything(Extension):
        def __init__(self):
            self.target = None

        def loss_fn(self, recipe, loss_fn):
            def to_target(forward, batch):
                logits = forward(batch)
                return F.cross_entropy(logits.float(), torch.full_like(batch["labels"], self.target)), logits
            return to_target

    cfg = tiny_config(tiny_model_dir("bert"), tmp_path, epochs=3, max_train_samples=64, batch_size=16,
                      learning_rate=5e-2, num_threads=1, validation_size=0, tfidf_weight=0)
    ext = Everything()
    recipe = TrainingRecipe(cfg, extensions=[ext])
    recipe.setup()
    recipe.evaluate("test")
    counts = np.bincount(recipe.last_logits["test"].argmax(-1), minlength=4)
    labelled = np.bincount(recipe.data.encoded["train"].labels, minlength=4)
    # a class that neither the untrained model nor a plain cross-entropy run (drawn to the most frequent label)
    # predicts most: only the replaced loss brings every row to it
    ext.target = min((c for c in range(4) if c not in (counts.argmax(), labelled.argmax())), key=lambda c: labelled[c])
    while recipe.train_epoch():
        pass
    recipe.finish(evaluate_test=False)
    recipe.evaluate("test")
    share = float((recipe.last_logits["test"].argmax(-1) == ext.target).mean())
    assert counts[ext.target] / counts.sum() <= 0.5 and share > 0.9, (counts, labelled, ext.target, share)
