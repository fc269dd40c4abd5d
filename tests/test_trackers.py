"""train.report_to: the metrics reach TensorBoard and MLflow (read back from their files); a missing tracker
package is one clear line before any work."""

import importlib

import pytest

from conftest import tiny_config
from lorafit.errors import LorafitError


def test_tensorboard_and_mlflow_receive_train_validation_and_test_metrics(tiny_model_dir, tmp_path, monkeypatch):
    from lorafit.train import train

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())  # a local file store, no server
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores behind this switch
    cfg = tiny_config(tiny_model_dir("bert"), tmp_path, pooling="cls", epochs=1, max_train_samples=64,
                      max_eval_samples=40, log_every=2, num_threads=1, report_to=["tensorboard", "mlflow"])
    run = train(cfg)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [p for p in (run.path / "tensorboard").rglob("events.out.tfevents.*")]
    assert events
    scalars = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        scalars.update({tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]})
    assert [e.step for e in scalars["train/loss"]] == [2, 4]  # 4 steps, logged every 2
    assert "train/accuracy" in scalars and "validation/accuracy" in scalars
    assert scalars["test/accuracy"][0].value == pytest.approx(run.test_metrics["accuracy"])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.run_name == run.path.name
    assert runs[0].data.metrics["test/accuracy"] == pytest.approx(run.test_metrics["accuracy"])
    assert runs[0].data.params["train.learning_rate"] == str(cfg.train.learning_rate)
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] == [2, 4]


def test_a_missing_tracker_package_is_one_line_before_any_work(tiny_model_dir, tmp_path, monkeypatch):
    train_module = importlib.import_module("lorafit.train")
    monkeypatch.setitem(train_module.TRACKER_PACKAGES, "wandb", "lorafit_no_such_package")
    cfg = tiny_config(tiny_model_dir("bert"), tmp_path, report_to=["wandb"])
    with pytest.raises(LorafitError, match=r"^train.report_to: wandb is not installed; pip install wandb") as err:
        train_module.train(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()
