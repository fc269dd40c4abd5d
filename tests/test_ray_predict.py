"""The Ray engine of batch prediction on a real Ray cluster: this module starts one on 127.0.0.1 (`ray start --head
--block` in its own process group, 2 CPUs, a 200 MB object store, its own temp dir and ports) and stops it at the
end, also on failure, by ending that process group: never `ray stop`, which would stop every Ray on the machine.

The predictions of two actors over sharded input must equal `lorafit.load(run).predict_proba` row for row, and an
actor killed in the middle of a batch is restarted by Ray and its batch retried: no row lost, none twice."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lorafit
from lorafit.config import InferenceConfig, PredictConfig
from lorafit.errors import LorafitError
from lorafit.ray_predict import BatchPredictor, input_files, predict_with_ray, read_predictions

TESTS = Path(__file__).resolve().parent
KILL_MARKER_ENV = "LORAFIT_TEST_KILL_MARKER"
BATCH = 128  # texts per forward pass, in the actors and in the single-process reference alike (4x faster than 16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """The address of a one-node Ray cluster started for this module; the kill marker lives in `marker_dir`."""
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # a short path: Ray's unix sockets live under it
    marker_dir = tmp_path_factory.mktemp("ray-markers")
    port = _free_port()
    # a loopback cluster of the test alone: no auth token (the driver here has none to present)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           KILL_MARKER_ENV: str(marker_dir),
           # actors import lorafit from this checkout and the killing predictor below from this folder
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    ports = ["--port", str(port), "--ray-client-server-port", str(_free_port()),
             "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
             "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
             "--node-manager-port", str(_free_port()), "--object-manager-port", str(_free_port())]
    log = temp / "head.log"  # a file, not a pipe: nobody need drain it while the tests run
    with log.open("w") as sink:
        head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                                 "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--object-store-memory",
                                 "200000000", "--include-dashboard=false", "--disable-usage-stats", "--temp-dir",
                                 str(temp), *ports], env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():  # --block prints this once the node is up, then waits
            assert head.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield Cluster(f"127.0.0.1:{port}", marker_dir)
    finally:
        _end_group(head)
        shutil.rmtree(temp, ignore_errors=True)


@dataclass
class Cluster:
    address: str
    marker_dir: Path  # where KillOnce leaves its marker


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the head's process group (`ray start --block` then stops its node), SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    try:  # the group outlives its leader while children remain
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class KillOnce(BatchPredictor):
    """Kills its own actor process (SIGKILL, as the OOM killer would) on the batch holding the marked row, the first
    time only: the marker file, made before dying, lets the retried batch through."""

    MARKED = "row-03333"

    def __call__(self, batch):
        if (batch["id"] == self.MARKED).any():
            marker = Path(os.environ[KILL_MARKER_ENV]) / "killed"
            try:
                marker.open("x").close()
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)


def _texts(n: int) -> list[str]:
    """n texts from the bundled AG News sample, repeated with a counter so that no two rows are the same."""
    from lorafit.data import read_table

    base = read_table(Path(lorafit.__file__).parent / "resources" / "ag_news_sample_test.csv.gz")["text"].tolist()
    return [f"{base[i % len(base)]} ({i // len(base)})" for i in range(n)]


def _expected(run, texts: list[str]) -> tuple[np.ndarray, np.ndarray, list]:
    """Labels, probabilities and class names of single-process prediction."""
    clf = lorafit.load(run, batch_size=BATCH)
    probs = clf.predict_proba(texts)
    return clf.classes_[probs.argmax(-1)], probs, list(clf.classes_)


def test_two_actors_over_parquet_shards_equal_single_process_predict(tiny_run, ray_cluster, tmp_path):
    texts = _texts(20_000)
    shards = tmp_path / "in"
    shards.mkdir()
    bounds = [0, 3_000, 9_000, 9_001, 16_500, 20_000]  # uneven shards, one of a single row
    for k, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        pd.DataFrame({"text": texts[lo:hi], "source": "x"}).to_parquet(shards / f"part-{k:02d}.parquet")
    (shards / "_SUCCESS").touch()  # a writer's marker file is not input
    # two actors of half a CPU on the cluster's 2 CPUs leave one to read and write
    cfg = PredictConfig(engine="ray", ray_address=ray_cluster.address, workers=2, chunk_rows=1_000, probabilities=True,
                        cpus_per_worker=0.5)
    result = predict_with_ray(tiny_run, shards, tmp_path / "out", cfg, InferenceConfig(batch_size=BATCH))
    assert result.files and result.input_files == sorted(str(p) for p in shards.glob("*.parquet"))

    got = read_predictions(tmp_path / "out")
    # no id column: the ID is the row's position in the input, files in sorted order, as local predict numbers a file
    assert got["ID"].tolist() == list(range(20_000))
    labels, probs, classes = _expected(tiny_run, texts)
    assert got["Label"].tolist() == labels.tolist()
    assert list(got.columns) == ["ID", "Label", *[f"prob_{c}" for c in classes]]
    np.testing.assert_allclose(got[[f"prob_{c}" for c in classes]].to_numpy(), probs, atol=2e-6)


def test_a_killed_actor_is_restarted_and_no_row_is_lost_or_doubled(tiny_run, ray_cluster, tmp_path):
    texts = _texts(6_000)
    ids = [f"row-{i:05d}" for i in range(6_000)]
    order = np.random.default_rng(0).permutation(6_000)  # IDs not in file order: they travel with their rows
    frame = pd.DataFrame({"id": np.array(ids)[order], "text": np.array(texts, dtype=object)[order]})
    (tmp_path / "in").mkdir()
    for k in range(3):
        frame.iloc[k * 2_000:(k + 1) * 2_000].to_csv(tmp_path / "in" / f"shard-{k}.csv", index=False)
    marker = ray_cluster.marker_dir / "killed"
    marker.unlink(missing_ok=True)
    cfg = PredictConfig(engine="ray", ray_address=ray_cluster.address, workers=2, chunk_rows=500, labels="id",
                        cpus_per_worker=0.5, shard_format="parquet")
    predict_with_ray(tiny_run, tmp_path / "in" / "shard-*.csv", tmp_path / "out", cfg,
                     InferenceConfig(batch_size=BATCH), predictor=KillOnce)
    assert marker.is_file(), "the marked batch was never reached: the test would prove nothing"
    got = read_predictions(tmp_path / "out")
    assert got["ID"].tolist() == sorted(ids)  # every row once
    by_id = dict(zip(frame["id"], frame["text"]))
    labels, _, names = _expected(tiny_run, [by_id[i] for i in got["ID"]])
    assert got["Label"].tolist() == [names.index(n) for n in labels]


def test_a_blank_row_gets_the_local_engines_answer(tiny_run, ray_cluster, tmp_path):
    """The actors run batch_predict.predict_table, the local engine's step: a blank text is predicted, not refused."""
    from lorafit.batch_predict import predict_file

    pd.DataFrame({"id": ["a", "b", "c"], "text": ["Stocks rally", "   ", "Oil falls"]}).to_json(
        tmp_path / "in.jsonl", orient="records", lines=True)
    cfg = PredictConfig(engine="ray", ray_address=ray_cluster.address, workers=1, probabilities=True,
                        cpus_per_worker=0.5)
    predict_with_ray(tiny_run, tmp_path / "in.jsonl", tmp_path / "out", cfg)
    predict_file(lorafit.load(tiny_run), tmp_path / "in.jsonl", tmp_path / "local.csv",
                 cfg.model_copy(update={"engine": "local"}))
    pd.testing.assert_frame_equal(read_predictions(tmp_path / "out"), pd.read_csv(tmp_path / "local.csv"),
                                  check_exact=False, atol=2e-6)


def test_a_missing_text_column_is_the_local_engines_line(tiny_run, ray_cluster, tmp_path):
    from lorafit.batch_predict import predict_file

    pd.DataFrame({"sentence": ["Stocks rally"]}).to_csv(tmp_path / "in.csv", index=False)
    cfg = PredictConfig(engine="ray", ray_address=ray_cluster.address, workers=1, cpus_per_worker=0.5)
    with pytest.raises(LorafitError) as on_ray:
        predict_with_ray(tiny_run, tmp_path / "in.csv", tmp_path / "out", cfg)
    with pytest.raises(LorafitError) as local:
        predict_file(lorafit.load(tiny_run), tmp_path / "in.csv", tmp_path / "local.csv",
                     cfg.model_copy(update={"engine": "local"}))
    line = "no column 'text' (columns: sentence); set --text-column or --text-columns"
    assert str(on_ray.value) == f"--input {tmp_path / 'in.csv'}: {line}"
    assert str(local.value) == f"{tmp_path / 'in.csv'}: {line}"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_input_and_output_checks_are_one_line(tiny_run, tmp_path):
    with pytest.raises(LorafitError, match="no such file or folder"):
        input_files(tmp_path / "missing")
    (tmp_path / "a.csv").write_text("text\nx\n")
    (tmp_path / "b.parquet").write_bytes(b"")
    with pytest.raises(LorafitError, match="mixes .csv and .parquet"):
        input_files(tmp_path / "*")
    (tmp_path / "c.txt").write_text("x\n")
    with pytest.raises(LorafitError, match="reads .parquet, .csv"):
        input_files(tmp_path / "c.txt")
    assert input_files(tmp_path / "a.csv") == ([str(tmp_path / "a.csv")], "csv")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.csv").write_text("ID,Label\n")
    with pytest.raises(LorafitError, match="not an empty folder"):
        predict_with_ray(tiny_run, tmp_path / "a.csv", tmp_path / "out")


def test_without_ray_the_engine_names_its_extra(tiny_run, tmp_path, monkeypatch):
    (tmp_path / "a.csv").write_text("text\nx\n")
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where the extra is not installed
    with pytest.raises(LorafitError, match=r"^the ray engine needs Ray Data: pip install 'lorafit\[ray\]'$"):
        predict_with_ray(tiny_run, tmp_path / "a.csv", tmp_path / "out")
