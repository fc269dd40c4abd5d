"""Bad input: one clear error line naming the file, row or field, exit code 2, nothing half-written."""

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import tiny_config
from lorafit.cli import app

GOOD = pd.DataFrame({"text": [f"{w} story {i}" for i in range(12) for w in ("market", "match")],
                     "label": [l for i in range(12) for l in (0, 1)]})


def run_cli(args, tmp_path):
    """Invoke `lorafit train` with a tiny config; return (exit code, output)."""
    result = CliRunner().invoke(app, ["train", *map(str, args), "--output-dir", str(tmp_path / "runs")])
    return result.exit_code, result.output


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, pd.DataFrame):
        content.to_csv(path, index=False)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def assert_clean_error(code, output, *needles, tmp_path=None):
    assert code == 2, output
    assert "Traceback" not in output
    text = " ".join(output.split())  # the console wraps long lines
    for needle in needles:
        assert needle in text, (needle, output)
    if tmp_path is not None:  # nothing half-written: no run directory was created
        runs = tmp_path / "runs"
        assert not runs.exists() or not any(runs.iterdir())


CASES = {
    "missing file": (lambda p: ["--train-file", p / "nope.csv", "--test-file", p / "nope.csv"], ["nope.csv", "file not found"]),
    "empty file": (lambda p: ["--train-file", write(p, "e.csv", ""), "--test-file", write(p, "e.csv", "")], ["e.csv", "file is empty"]),
    "header only": (lambda p: ["--train-file", write(p, "h.csv", "text,label\n"), "--test-file", p / "h.csv"], ["h.csv", "no rows"]),
    "missing text column": (lambda p: ["--train-file", write(p, "t.csv", GOOD.rename(columns={"text": "body"})),
                                       "--test-file", p / "t.csv"], ["t.csv", "no column 'text'", "--text-column"]),
    "missing label column": (lambda p: ["--train-file", write(p, "l.csv", GOOD.rename(columns={"label": "y"})),
                                        "--test-file", p / "l.csv"], ["l.csv", "no label column 'label'"]),
    "bad encoding": (lambda p: ["--train-file", write(p, "b.csv", "text,label\ncaf\xe9 news,0\nsport,1\n".encode("latin-1")),
                                "--test-file", p / "b.csv"], ["b.csv", "UTF-8"]),
    "ragged csv": (lambda p: ["--train-file", write(p, "r.csv", "text,label\na,0\nb,1,extra\n"),
                              "--test-file", p / "r.csv"], ["r.csv", "line 3"]),
    "broken jsonl": (lambda p: ["--train-file", write(p, "j.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "lab\n'),
                                "--test-file", p / "j.jsonl"], ["j.jsonl", "could not be read"]),
    "empty text": (lambda p: ["--train-file", write(p, "w.csv", "text,label\nmarket news,0\n   ,1\n"),
                              "--test-file", p / "w.csv"], ["w.csv: line 3", "empty"]),
    "missing label": (lambda p: ["--train-file", write(p, "n.csv", "text,label\nmarket news,0\nsport news,\n"),
                                 "--test-file", p / "n.csv"], ["n.csv: line 3", "label is missing"]),
    "unknown label": (lambda p: ["--train-file", write(p, "u.csv", "text,label\nmarket,Business\nmatch,Sportz\n"),
                                 "--test-file", p / "u.csv", "--label-names", "Business,Sports"],
                      ["u.csv: line 3", "unknown label 'Sportz'"]),
    "fractional label": (lambda p: ["--train-file", write(p, "f.csv", "text,label\nmarket,0\nmatch,1.5\n"),
                                    "--test-file", p / "f.csv", "--label-names", "a,b"], ["f.csv: line 3", "'1.5' is not a whole number"]),
    "label out of range": (lambda p: ["--train-file", write(p, "o.csv", "text,label\nmarket,0\nmatch,7\n"),
                                      "--test-file", p / "o.csv", "--label-names", "a,b"], ["o.csv: line 3", "outside 0..1"]),
    "one class": (lambda p: ["--train-file", write(p, "one.csv", GOOD.assign(label=0)), "--test-file", p / "one.csv"],
                  ["one.csv", "same label"]),
    "unseen test label": (lambda p: ["--train-file", write(p, "tr.csv", GOOD.assign(label=GOOD.label.map({0: "a", 1: "b"}))),
                                     "--test-file", write(p, "te.csv", "text,label\nx,a\ny,c\n"), "--label-names", "a,b,c"],
                          ["never seen in training: c"]),
    "extremely long text": (lambda p: ["--train-file", write(p, "big.csv", pd.concat(
        [GOOD, pd.DataFrame({"text": ["word " * 250_000], "label": [0]})])), "--test-file", p / "big.csv"],
        ["big.csv: line 26", "1,250,000 characters"]),
    "validation too large": (lambda p: ["--train-file", write(p, "v.csv", GOOD), "--test-file", p / "v.csv",
                                        "--validation-size", "5000"], ["validation_size", "make it smaller"]),
    "pickle without flag": (lambda p: ["--train-file", _pickle(p), "--test-file", p / "d.pkl"], ["d.pkl", "--allow-pickle"]),
    "negative lr": (lambda p: ["--learning-rate", "-1"], ["learning_rate", "greater than 0"]),
    "rank zero": (lambda p: ["--lora-r", "0"], ["lora_r"]),
    "unknown choice": (lambda p: ["--method", "qlora"], ["method"]),
    "missing config file": (lambda p: [p / "none.yaml"], ["none.yaml", "config file not found"]),
}


def _pickle(p):
    GOOD.to_pickle(p / "d.pkl")
    return p / "d.pkl"


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_line(case, tmp_path):
    make_args, needles = CASES[case]
    code, output = run_cli(make_args(tmp_path), tmp_path)
    assert_clean_error(code, output, *needles, tmp_path=tmp_path)


def test_budget_exceeded_and_unknown_module(tiny_model_dir, tmp_path):
    model = tiny_model_dir("bert")
    code, out = run_cli(["--model", model, "--param-budget", "100"], tmp_path)
    assert_clean_error(code, out, "exceed the budget of 100", "--param-budget none", tmp_path=tmp_path)
    code, out = run_cli(["--model", model, "--target-modules", "qkv_proj"], tmp_path)
    assert_clean_error(code, out, "no module named 'qkv_proj'", "known:", tmp_path=tmp_path)
    code, out = run_cli(["--model", model, "--lora-layers", "7"], tmp_path)
    assert_clean_error(code, out, "lora_layers", tmp_path=tmp_path)


def test_hub_ids_offline_say_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out = run_cli(["--model", "some-org/some-model"], tmp_path)
    assert_clean_error(code, out, "some-org/some-model", "offline", "embedded:all-MiniLM-L6-v2", tmp_path=tmp_path)
    code, out = run_cli(["--dataset", "some-org/some-dataset"], tmp_path)
    assert_clean_error(code, out, "some-org/some-dataset", "offline", "--train-file", tmp_path=tmp_path)


def test_nan_loss_stops_and_marks_the_run_failed(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir("bert"), tmp_path / "runs", learning_rate=1e8, head_learning_rate=1e8,
                      max_grad_norm=None, epochs=1, checkpoint_every=2, log_every=2)
    cfg.to_yaml(tmp_path / "c.yaml")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml")])
    assert_clean_error(result.exit_code, result.output, "training loss became", "last good checkpoint")
    info = json.loads((tmp_path / "runs" / "run" / "run.json").read_text())
    assert info["status"] == "failed" and "loss became" in info["error"]
    assert not (tmp_path / "runs" / "run" / "model").exists()


def test_weights_are_safetensors_only(tiny_run):
    for path in (tiny_run / "model").rglob("*"):
        assert path.suffix not in (".bin", ".pt", ".pth", ".pkl", ".pickle"), path
    assert (tiny_run / "model" / "adapter_model.safetensors").is_file()


def test_remote_code_is_off_unless_asked():
    from lorafit.config import Config

    assert Config().model.trust_remote_code is False
