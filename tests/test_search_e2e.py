"""lorafit search with real (tiny) training: best.yaml reproduces the best trial, two workers share a SQLite and a
PostgreSQL study, and a worker killed with SIGKILL leaves a failed trial that does not stop the study.

The PostgreSQL server is started by this module (initdb into a temporary directory, pg_ctl on a free port of
127.0.0.1): LORAFIT_PG_BIN's, else the newest Debian one under /usr/lib/postgresql. Without PostgreSQL installed the
test fails: `make test` installs it first (scripts/install-test-services)."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml

import lorafit
from conftest import tiny_config
from lorafit.config import Config
from lorafit.search import open_storage


def _pg_bin() -> Path:
    """LORAFIT_PG_BIN, else the bin folder of the newest PostgreSQL Debian installed (/usr/lib/postgresql/<v>/bin;
    Debian keeps each major version apart and puts none of them on PATH)."""
    if os.environ.get("LORAFIT_PG_BIN"):
        return Path(os.environ["LORAFIT_PG_BIN"])
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    found.sort(key=lambda b: tuple(int(n) for n in re.findall(r"\d+", b.parent.name)))
    return found[-1] if found else Path("/usr/lib/postgresql/VERSION/bin")


PG_BIN = _pg_bin()
SPACE = {"learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
         "lora_r": {"type": "categorical", "choices": [2, 4]}}


def _search_yaml(tiny_model_dir, out: Path, **search) -> Path:
    # lora on the top layer only: trials share the tokenisation and the cached frozen layer 0
    cfg = tiny_config(tiny_model_dir("bert"), out / "runs", max_train_samples=160, max_eval_samples=40, epochs=1,
                      lora_layers=[-1], eval_every=5)
    raw = cfg.model_dump(mode="json")
    raw["search"] = {"space": SPACE, "search_dir": str(out / "searches"), "heartbeat_seconds": 1, **search}
    path = out / "search.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _worker(cfg_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lorafit.cli", "search", str(cfg_path), *args],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, errs = proc.communicate(timeout=600)
    assert proc.returncode == 0, (out + errs)[-3000:]
    return out


def _counted(study) -> list:
    return [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED") and not t.user_attrs.get("over_budget")
            and not t.user_attrs.get("surplus")]  # a worker that found the study full gives its trial up


def _assert_each_trial_ran_once(study, study_dir: Path, n: int) -> None:
    counted = _counted(study)
    assert len(counted) == n, [(t.number, t.state.name) for t in study.trials]
    run_dirs = [t.user_attrs["run_dir"] for t in counted]
    assert len(set(run_dirs)) == n
    for t in counted:
        lines = (study_dir / t.user_attrs["run_dir"] / "metrics.jsonl").read_text().splitlines()
        steps = [(r["type"], r["step"]) for r in map(yaml.safe_load, lines) if r.get("split") != "test"]
        assert len(steps) == len(set(steps)), f"trial {t.number} was trained twice"


def test_best_yaml_reproduces_the_best_trial(tiny_model_dir, tmp_path):
    cfg_path = _search_yaml(tiny_model_dir, tmp_path, n_trials=2, sampler_seed=0)
    result = lorafit.search(cfg_path)
    study_dir = result.path
    assert result.best_value is not None and result.best_test_metrics is not None
    best_trial = result.study.best_trial
    trial_dir = study_dir / best_trial.user_attrs["run_dir"]
    assert not (trial_dir / "checkpoints").exists() and not (trial_dir / "report.html").exists()
    assert (trial_dir / "model").is_dir() and (trial_dir / "test_metrics.json").is_file()
    for t in result.study.trials:  # only the best trial was evaluated on test
        if t.number != best_trial.number:
            assert not (study_dir / t.user_attrs["run_dir"] / "test_metrics.json").exists()

    best = Config.from_yaml(study_dir / "best.yaml")
    assert best.train.learning_rate == best_trial.params["learning_rate"]
    run = lorafit.train(best.with_overrides({"output_dir": str(tmp_path / "again"), "run_name": "best"}))
    assert run.info["best_validation_accuracy"] == pytest.approx(result.best_value, abs=1e-9)
    validation = lambda d: [(r["step"], r["accuracy"], round(r["loss"], 5)) for r in map(yaml.safe_load, (  # noqa: E731
        d / "metrics.jsonl").read_text().splitlines()) if r.get("split") == "validation"]
    assert validation(run.path) == validation(trial_dir)  # the same run, evaluation by evaluation


def test_sigkilled_worker_then_two_workers_finish_the_sqlite_study(tiny_model_dir, tmp_path):
    """One worker is killed with SIGKILL in its second trial; the same command run by two workers at once then
    finishes the study: N counted trials, none trained twice, the killed one FAIL (the heartbeat marked it)."""
    cfg_path = _search_yaml(tiny_model_dir, tmp_path, n_trials=3)
    study_dir = tmp_path / "searches" / "lorafit-search"
    proc = _worker(cfg_path)
    second = study_dir / "trials" / "trial-0001" / "run.json"  # the second trial has started training
    deadline = time.time() + 300
    while not second.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the worker ended before its second trial"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    workers = [_worker(cfg_path), _worker(cfg_path)]
    for w in workers:
        _finish(w)
    study = optuna.load_study(study_name="lorafit-search", storage=f"sqlite:///{study_dir / 'study.db'}")
    assert study.trials[1].state.name == "FAIL"  # not left RUNNING
    _assert_each_trial_ran_once(study, study_dir, 3)
    assert len([t for t in study.trials if not t.user_attrs.get("surplus")]) == 4
    assert (study_dir / "best.yaml").is_file() and (study_dir / "search_report.html").is_file()


# --- PostgreSQL --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1 for the session (as root, run as the postgres user)."""
    initdb = PG_BIN / "initdb"
    assert initdb.is_file(), (f"PostgreSQL is not installed ({initdb} missing): run scripts/install-test-services "
                              "(make test does), or set LORAFIT_PG_BIN to its bin folder")
    as_root = os.geteuid() == 0
    run_as = ["runuser", "-u", "postgres", "--"] if as_root else []
    data = Path(tempfile.mkdtemp(prefix="lorafit-pg-"))
    if as_root:
        shutil.chown(data, "postgres", "postgres")
    port = _free_port()
    user = "postgres" if as_root else os.environ.get("USER", "postgres")

    def run(*cmd):
        done = subprocess.run([*run_as, *map(str, cmd)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{cmd[0]} failed: {done.stdout[-1500:]}{done.stderr[-1500:]}"

    run(initdb, "-D", data / "db", "-A", "trust", "-U", user, "--no-sync")
    run(PG_BIN / "pg_ctl", "-D", data / "db", "-l", data / "log", "-w", "-o",
        f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        run(PG_BIN / "createdb", "-h", "127.0.0.1", "-p", port, "-U", user, "lorafit")
        yield f"postgresql://{user}@127.0.0.1:{port}/lorafit"
    finally:
        subprocess.run([*run_as, str(PG_BIN / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(data, ignore_errors=True)


def test_two_workers_share_a_postgresql_study(tiny_model_dir, tmp_path, postgres_url):
    cfg_path = _search_yaml(tiny_model_dir, tmp_path, n_trials=3, storage=postgres_url, study_name="pg")
    workers = [_worker(cfg_path), _worker(cfg_path)]
    for w in workers:
        _finish(w)
    study = optuna.load_study(study_name="pg", storage=open_storage(postgres_url, 1))
    _assert_each_trial_ran_once(study, tmp_path / "searches" / "pg", 3)


# --- workers started together on a new storage ----------------------------------------------------------------
RACE_WORKERS, RACE_ROUNDS = 4, 3  # rounds per storage


def _start_together(tiny_model_dir, tmp_path, urls: list[str]) -> None:
    """RACE_WORKERS processes, each importing first and then released by a start file once per storage in `urls`,
    open the study as `lorafit search` does and add a trial: all must join the one study of every round (issue 26:
    one exited 2 with 'table studies already exists')."""
    cfg_path = _search_yaml(tiny_model_dir, tmp_path)
    sync = tmp_path / "sync"
    sync.mkdir()
    worker = Path(__file__).with_name("search_race_worker.py")
    procs = [subprocess.Popen([sys.executable, str(worker), str(cfg_path), str(sync), str(i), *urls],
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(RACE_WORKERS)]
    try:
        for round_, url in enumerate(urls):
            deadline = time.time() + 300
            while sum((sync / f"ready-{round_}-{i}").exists() for i in range(RACE_WORKERS)) < RACE_WORKERS:
                assert all(p.poll() is None for p in procs), [p.communicate()[0][-2000:] for p in procs if p.poll()]
                assert time.time() < deadline, "the workers did not all get ready"
                time.sleep(0.01)
            (sync / f"go-{round_}").touch()
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for round_, url in enumerate(urls):
        results = [(sync / f"result-{round_}-{i}").read_text() for i in range(RACE_WORKERS)]
        assert results == ["ok"] * RACE_WORKERS, f"round {round_}: {results}"
        study = optuna.load_study(study_name="bars", storage=open_storage(url, 1))
        assert [t.state.name for t in study.trials] == ["COMPLETE"] * RACE_WORKERS, f"round {round_}"
    assert [p.returncode for p in procs] == [0] * RACE_WORKERS, [o[-2000:] for o in outputs]


def test_workers_started_together_join_one_study(tiny_model_dir, tmp_path, postgres_url):
    """SQLite (one machine) and PostgreSQL (many machines), each a new storage per round; one set of worker processes
    goes through all the rounds, so the test pays for their imports once."""
    import psycopg2

    base, _, _ = postgres_url.rpartition("/")
    names = [f"race_{os.getpid()}_{r}" for r in range(RACE_ROUNDS)]
    conn = psycopg2.connect(postgres_url)
    conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
    with conn.cursor() as cur:
        for name in names:
            cur.execute(f"CREATE DATABASE {name}")
    conn.close()
    _start_together(tiny_model_dir, tmp_path, [f"sqlite:///{tmp_path / f'study-{r}.db'}" for r in range(RACE_ROUNDS)]
                    + [f"{base}/{name}" for name in names])
