"""lorafit search: the space as data, the budget check before training, pruning, the study guard and the outputs.

Most tests here drive the Optuna study with a stand-in recipe (the TrainingRecipe interface: setup, train_epoch,
evaluate, finish, callbacks) so they take a second; test_search_e2e.py trains real tiny models."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_config
from lorafit.cli import app
from lorafit.config import Config, ModelConfig, SearchConfig
from lorafit.errors import LorafitError
from lorafit.search import ParamCounter, search, search_config

SPACE = {
    "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "lora_r": {"type": "categorical", "choices": [2, 4]},
}


class FakeRecipe:
    """Stands in for train.TrainingRecipe: the validation accuracy is a function of the trial's lr, reported at
    each of 4 epochs; every call is recorded so a test can see what was (not) trained."""

    calls: list = []

    def __init__(self, cfg, console=None, callbacks=(), reuse=None, evaluate_test=True):
        assert not evaluate_test, "a trial must never evaluate the test split"
        self.cfg, self.callbacks, self.epoch = cfg, callbacks, 0
        self.path = Path(cfg.output.output_dir) / cfg.output.run_name

    def setup(self, run_dir=None, resume_from=None):
        FakeRecipe.calls.append(("setup", self.cfg.model.lora_r, self.cfg.train.learning_rate))
        self.path.mkdir(parents=True)
        (self.path / "checkpoints").mkdir()
        (self.path / "report.html").write_text("<html></html>")

    def accuracy(self):
        return 1.0 - abs(self.cfg.train.learning_rate - 3e-3) * 50 + 0.01 * self.epoch

    def train_epoch(self):
        self.epoch += 1
        FakeRecipe.calls.append(("epoch", self.epoch))
        for cb in self.callbacks:
            cb.on_evaluate(self, "validation", self.epoch * 10, {"accuracy": self.accuracy()})
        return self.epoch < 4

    def evaluate(self, split):
        assert split == "validation"
        return {"accuracy": self.accuracy()}

    def finish(self, evaluate_test=None):
        assert not evaluate_test  # trials never look at the test split
        return SimpleNamespace(path=self.path, info={"best_validation_accuracy": self.accuracy()})


@pytest.fixture
def base(tiny_model_dir, tmp_path):
    FakeRecipe.calls = []
    cfg = tiny_config(tiny_model_dir("bert"), tmp_path / "runs", param_budget=None)
    return cfg.model_copy(update={"search": SearchConfig(space=SPACE, search_dir=str(tmp_path / "searches"),
                                                         sampler_seed=0, startup_trials=2)})


def _states(study):
    return [t.state.name for t in study.trials]


def test_space_parsed_from_yaml_and_shown_by_print_config(tmp_path):
    (tmp_path / "s.yaml").write_text(
        "model:\n  lora_r: 4\nsearch:\n  n_trials: 7\n  space:\n"
        "    learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}\n"
        "    target_modules: {type: categorical, choices: [[query, value], [all-linear]]}\n"
        "    lora_layers: {type: categorical, choices: [[-1], null]}\n")
    cfg = Config.from_yaml(tmp_path / "s.yaml")
    assert cfg.search.n_trials == 7 and list(cfg.search.space) == ["learning_rate", "target_modules", "lora_layers"]
    assert cfg.search.space["learning_rate"].log and cfg.search.space["lora_layers"].choices == [[-1], None]
    result = CliRunner().invoke(app, ["search", str(tmp_path / "s.yaml"), "--n-trials", "3", "--lora-alpha", "32",
                                      "-o", str(tmp_path / "x"), "--time-budget-minutes", "5", "--print-config"])
    assert result.exit_code == 0, result.output
    shown = Config.model_validate(yaml.safe_load(result.output))
    assert shown.search.n_trials == 3 and shown.search.search_dir == str(tmp_path / "x")
    # in a search, --time-budget-minutes bounds the study, not each trial
    assert shown.search.timeout_minutes == 5 and shown.train.time_budget_minutes is None
    assert shown.model.lora_alpha == 32 and shown.search.space == cfg.search.space
    # the default space is the seed's: lr on a log scale, batch, accumulation, decay, r, alpha, dropout, where
    assert set(search_config().search.space) == {"learning_rate", "batch_size", "grad_accum_steps", "weight_decay",
                                                 "lora_r", "lora_alpha", "lora_dropout", "target_modules", "lora_layers"}
    # a plain run config is unchanged by the optional section
    assert "search" not in Config().to_yaml()


@pytest.mark.parametrize("space, expected", [
    ("    lora_rank: {type: int, low: 2, high: 8}\n", "unknown parameter 'lora_rank'"),
    ("    lora_r: {type: int, low: 8, high: 2}\n", "empty range"),
    ("    lora_alpha: {type: categorical, choices: []}\n", "non-empty 'choices'"),
    ("    tfidf_weight: {type: float, low: 0, high: 0.5}\n", "'tfidf_weight' cannot be searched"),
])
def test_bad_space_is_one_line_exit_2(tmp_path, space, expected):
    (tmp_path / "s.yaml").write_text("search:\n  space:\n" + space)
    result = CliRunner().invoke(app, ["search", str(tmp_path / "s.yaml"), "-o", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_unreachable_storage_is_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["search", "--storage", "postgresql://lorafit:secret@127.0.0.1:1/nowhere",
                                      "-o", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    assert "cannot open the study storage" in result.output and "secret" not in result.output


# search's count and the model prepare_model trains come from one function (model.make_trainable); these fail
# if a second rule for what trains (LoRA targets, the head, freezing) ever creeps back into the counter
AGREEMENT_CASES = [
    ("bert", dict(lora_r=4, target_modules=["query", "value"], lora_layers=[-1])),
    ("bert", dict(lora_r=8, target_modules=["all-linear"], lora_layers=None, lora_bias="all")),
    ("bert", dict(lora_r=2, target_modules=["query", "value"], lora_layers=None, pooling="cls")),
    ("bert", dict(lora_r=16, target_modules=["all-linear"], lora_layers=[0], num_layers=1)),
    ("bert", dict(method="head", pooling="cls")),
    ("bert", dict(method="head")),
    ("bert", dict(method="full")),
    ("bert", dict(method="full", num_layers=1)),
    ("distilbert", dict(lora_r=4, target_modules=["q_lin", "v_lin"], lora_layers=[-2, -1], pooling="cls")),
    ("distilbert", dict(method="head", pooling="cls")),  # pre_classifier + classifier
    ("roberta", dict(lora_r=4, target_modules=["query", "value"], lora_bias="lora_only", pooling="cls")),
]


@pytest.mark.parametrize("family,overrides", AGREEMENT_CASES, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={v[k]}" for k in v))
def test_budget_count_on_meta_skeleton_matches_the_built_model(tiny_model_dir, family, overrides):
    from lorafit.model import prepare_model

    cfg = ModelConfig(model=str(tiny_model_dir(family)), param_budget=None, **overrides)
    _, info = prepare_model(cfg, 4, ["a", "b", "c", "d"])
    assert ParamCounter(["a", "b", "c", "d"]).count(cfg) == info.trainable


def test_budget_count_follows_the_trials_architecture_not_the_base_configs(tiny_model_dir):
    """pooling and num_layers may be searched: one counter (made from the study's label names) counts each trial's
    own architecture, as prepare_model would build it."""
    from lorafit.model import prepare_model

    labels = ["a", "b", "c", "d"]
    base = ModelConfig(model=str(tiny_model_dir("distilbert")), param_budget=None, method="head")
    counter = ParamCounter(labels)
    assert counter.count(base) == prepare_model(base, 4, labels)[1].trainable
    for update in (dict(pooling="cls"), dict(method="full", num_layers=1), dict(method="full")):
        trial = base.model_copy(update=update)
        assert counter.count(trial) == prepare_model(trial, 4, labels)[1].trainable, update


def test_over_budget_trials_are_never_trained(base, tmp_path):
    counter = ParamCounter(["World", "Sports", "Business", "Sci/Tech"])
    at_r2 = counter.count(base.model.model_copy(update={"lora_r": 2}))
    cfg = base.model_copy(update={"model": base.model.model_copy(update={"param_budget": at_r2})})
    result = search(cfg, n_trials=3, recipe_factory=FakeRecipe)
    study = result.study
    over = [t for t in study.trials if t.user_attrs.get("over_budget")]
    assert over, "the space has r=4, over a budget set at r=2's count: some proposals must exceed it"
    for t in over:
        assert t.state.name == "PRUNED" and t.params["lora_r"] == 4 and t.user_attrs["trainable_params"] > at_r2
        assert t.constraints["trainable_params_over_budget"] > 0  # the sampler learns the boundary
        assert "run_dir" not in t.user_attrs
        assert not (result.path / "trials" / f"trial-{t.number:04d}").exists()
    assert all(r == 2 for what, r, *_ in FakeRecipe.calls if what == "setup")
    assert sum(1 for t in study.trials if not t.user_attrs.get("over_budget")) == 3  # n_trials counts trained ones


def test_pruner_stops_a_bad_trial_early(base):
    space = {"learning_rate": {"type": "categorical", "choices": [3e-3, 1e-2]}}
    cfg = base.model_copy(update={"search": base.search.model_copy(update={
        "space": SearchConfig(space=space).space, "startup_trials": 0})})
    for lr in (3e-3, 3e-3, 1e-2):  # a fixed order through Optuna's queue: two good trials, then a bad one
        _enqueue(cfg, {"learning_rate": lr})
    result = search(cfg, n_trials=3, recipe_factory=FakeRecipe)
    bad = [t for t in result.study.trials if t.params["learning_rate"] == 1e-2]
    assert bad and bad[0].state.name == "PRUNED"
    assert max(bad[0].intermediate_values) < 40  # stopped before its 4th evaluation
    good = [t for t in result.study.trials if t.state.name == "COMPLETE"]
    assert len(good) == 2 and all(len(t.intermediate_values) == 4 for t in good)
    run = result.path / bad[0].user_attrs["run_dir"]
    assert not (run / "checkpoints").exists() and not (run / "report.html").exists()


def _enqueue(cfg, params):
    from lorafit.search import open_study

    study, _ = open_study(cfg, Path(cfg.search.search_dir) / cfg.search.study_name)
    study.enqueue_trial(params)
    return study


def test_outputs_and_resume_continue_the_same_study(base):
    first = search(base, n_trials=2, recipe_factory=FakeRecipe)
    assert len(first.study.trials) == 2
    again = search(base, n_trials=4, recipe_factory=FakeRecipe)  # the same command with more trials continues
    assert [t.number for t in again.study.trials] == [0, 1, 2, 3]
    d = again.path
    for name in ("trials.csv", "best.yaml", "search.yaml", "search_report.md", "search_report.html", "study.db"):
        assert (d / name).is_file(), name
    best = Config.from_yaml(d / "best.yaml")
    assert best.search is None and best.output.output_dir == base.output.output_dir
    assert best.train.learning_rate == pytest.approx(again.study.best_params["learning_rate"])
    assert best.model.lora_r == again.study.best_params["lora_r"]
    csv = (d / "trials.csv").read_text()
    assert csv.count("\n") == 5 and "user_attrs_trainable_params" in csv
    html = (d / "search_report.html").read_text()
    assert "data:image/png;base64," in html and "src='plots/" not in html  # self-contained
    md = (d / "search_report.md").read_text()
    assert "optimization_history.png" in md and "params_vs_metric_1.png" in md


def test_a_study_with_another_space_is_refused(base):
    search(base, n_trials=1, recipe_factory=FakeRecipe)
    (Path(base.search.search_dir) / "other.yaml").write_text(yaml.safe_dump(
        {"model": {"model": base.model.model}, "search": {"space": {"lora_r": {"type": "int", "low": 2, "high": 4}}}}))
    result = CliRunner().invoke(app, ["search", str(Path(base.search.search_dir) / "other.yaml"),
                                      "-o", base.search.search_dir])
    assert result.exit_code == 2, result.output
    assert "exists with another search space" in result.output and "--study-name" in result.output
    with pytest.raises(LorafitError, match="another search space"):
        search(base.model_copy(update={"search": base.search.model_copy(update={
            "space": SearchConfig(space={"lora_r": {"type": "int", "low": 2, "high": 4}}).space})}),
            recipe_factory=FakeRecipe)
