"""train.report_to: the metrics reach TensorBoard and MLflow (read back from their files); a missing tracker
package is one clear line before any work; W&B's mode (online with credentials, else offline), project and entity."""

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
    from lorafit.train import train

    trackers = importlib.import_module("lorafit.trackers")
    monkeypatch.setitem(trackers.TRACKER_PACKAGES, "wandb", "lorafit_no_such_package")
    cfg = tiny_config(tiny_model_dir("bert"), tmp_path, report_to=["wandb"])
    with pytest.raises(LorafitError, match=r"^train.report_to: wandb is not installed; pip install wandb") as err:
        train(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


# --- W&B: online with credentials, offline without; project and entity (no wandb run is made) -------------
@pytest.mark.parametrize("env, netrc_text, mode", [
    ({"WANDB_API_KEY": "k" * 40}, None, "online"),
    ({}, "machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n", "online"),  # what `wandb login` writes
    ({}, "machine example.org login user password secret\n", "offline"),  # another host's entry
    ({}, None, "offline"),
    ({"WANDB_BASE_URL": "http://wandb.local:8080"}, "machine wandb.local login user password secret\n", "online"),
    ({"WANDB_BASE_URL": "http://wandb.local:8080"}, "machine api.wandb.ai login user password secret\n", "offline"),
    ({"WANDB_MODE": "offline", "WANDB_API_KEY": "k" * 40}, None, "offline"),  # WANDB_MODE wins
    ({"WANDB_MODE": "disabled"}, "machine api.wandb.ai login user password secret\n", "disabled"),
    ({}, "machine api.wandb.ai login\n", "offline"),  # an entry without a password
    ({}, "machine api.wandb.ai login user password secret\nbogus\n", "offline"),  # a file netrc cannot parse
])
def test_wandb_mode(tmp_path, env, netrc_text, mode):
    from lorafit.trackers import wandb_mode

    netrc = tmp_path / "netrc"
    if netrc_text is not None:
        netrc.write_text(netrc_text)
    assert wandb_mode(env, netrc) == mode


def test_wandb_mode_reads_netrc_from_NETRC_then_home(tmp_path):
    from lorafit.trackers import wandb_mode

    (tmp_path / "a").write_text("machine api.wandb.ai login user password secret\n")
    assert wandb_mode({"NETRC": str(tmp_path / "a"), "HOME": str(tmp_path / "nowhere")}) == "online"
    assert wandb_mode({"HOME": str(tmp_path / "nowhere")}) == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password secret\n")
    assert wandb_mode({"HOME": str(tmp_path)}) == "online"


def test_wandb_project_and_entity_reach_init_trackers(tiny_model_dir, tmp_path, monkeypatch):
    """Through a real train() up to Accelerate's init_trackers, which records its arguments and stops the run."""
    from accelerate import Accelerator

    from lorafit.train import train

    seen = []

    class Stop(Exception):
        pass

    def init_trackers(self, project_name, config=None, init_kwargs=None):
        seen.append((project_name, init_kwargs))
        raise Stop

    monkeypatch.setattr(Accelerator, "init_trackers", init_trackers)
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    base = dict(max_train_samples=64, max_eval_samples=40, num_threads=1, report_to=["wandb"])
    with pytest.raises(Stop):
        train(tiny_config(tiny_model_dir("bert"), tmp_path / "a", wandb_project="ag-news", wandb_entity="team",
                          **base))
    project, init = seen[-1]
    assert project == "ag-news"
    assert init["wandb"]["entity"] == "team" and init["wandb"]["mode"] == "offline"

    monkeypatch.setenv("WANDB_PROJECT", "from-env")  # unset field: wandb's own variable, not Accelerate's default
    with pytest.raises(Stop):
        train(tiny_config(tiny_model_dir("bert"), tmp_path / "b", **base))
    project, init = seen[-1]
    assert project == "from-env" and "entity" not in init["wandb"]
