"""Hyperparameter search as a lorafit stage, on Optuna: study, sampler, pruner and storage are Optuna's; lorafit
adds the search space as config data, a trainable-parameter budget checked before a trial trains, trials that
are normal (small) run directories sharing one tokenisation and frozen-prefix cache, and the study's outputs.

    <search_dir>/<study_name>/
        study.db            the default storage (SQLite); `lorafit search` again continues the study
        trials/trial-NNNN/  each trial's run directory (no checkpoints, no per-trial report)
        trials.csv          every trial: number, state, value, parameters, trainable parameters, run directory
        best.yaml           the best trial's complete config: `lorafit train best.yaml` trains it again
        best_test_metrics.json  the best trial evaluated on the test split (the only test evaluation)
        search_report.md / search_report.html / plots/   trials table and Optuna's plots
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from .config import DEFAULT_SEARCH_SPACE, SEARCH_FIELDS, Config, ModelConfig, ParamSpec, SearchConfig, as_config
from .errors import LorafitError, describe
from .fileio import atomic_write_json, atomic_write_text
from .rundir import MODEL_DIR, read_config, write_test_metrics

SPACE_ATTR = "lorafit_search_space"  # study user attribute: the space a study was created with
RUN_DIR_ATTR = "run_dir"
PARAMS_ATTR = "trainable_params"
TRIALS_DIR = "trials"
MAX_OVER_BUDGET_FACTOR = 10  # a space that is mostly over budget stops after this many x n_trials proposals


@dataclass
class SearchResult:
    """What `lorafit.search` returns."""

    path: Path  # the study directory
    study: Any  # the optuna.Study
    best_config: Optional[Config]
    best_value: Optional[float]
    best_test_metrics: Optional[dict[str, Any]] = None
    counts: dict[str, int] = field(default_factory=dict)


# --- config and space ------------------------------------------------------------------------------------
def search_config(config: Union[Config, dict, str, Path, None] = None, **overrides) -> Config:
    """The base config with a search section; flat overrides may name train fields or search fields."""
    cfg = as_config(config)
    search_over = {k: overrides.pop(k) for k in list(overrides) if k in SEARCH_FIELDS or k == "space"}
    if overrides:
        cfg = cfg.with_overrides(overrides)
    section = (cfg.search or SearchConfig()).model_dump()
    section.update(search_over)
    try:
        return cfg.model_copy(update={"search": SearchConfig.model_validate(section)})
    except Exception as exc:  # pydantic's ValidationError, one line like every other config error
        from pydantic import ValidationError

        from .config import format_validation_error

        if isinstance(exc, ValidationError):
            raise LorafitError(f"search: {format_validation_error(exc)}") from None
        raise


def _label(value: Any) -> Any:
    """Optuna's categorical choices must be scalars: a list choice is stored as 'a,b', none as 'none'."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return value


def suggest(trial, space: dict[str, ParamSpec]) -> dict[str, Any]:
    """Ask the trial for one value per parameter; return config leaf values (lists restored)."""
    values = {}
    for name, spec in space.items():
        if spec.type == "categorical":
            labels = [_label(c) for c in spec.choices]
            picked = trial.suggest_categorical(name, labels)
            values[name] = spec.choices[labels.index(picked)]
        elif spec.type == "int":
            values[name] = trial.suggest_int(name, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
        else:
            values[name] = trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)
    return values


def space_fingerprint(space: dict[str, ParamSpec]) -> str:
    return json.dumps({k: v.model_dump(mode="json") for k, v in sorted(space.items())}, sort_keys=True)


def _describe_space(space: dict[str, ParamSpec]) -> str:
    parts = []
    for name, spec in space.items():
        if spec.type == "categorical":
            parts.append(f"{name} in {[_label(c) for c in spec.choices]}")
        else:
            parts.append(f"{name} {spec.low:g}..{spec.high:g}{' log' if spec.log else ''}")
    return "; ".join(parts)


# --- the budget: trainable parameters counted before any training -----------------------------------------
class ParamCounter:
    """Trainable parameters of a model config: model.make_trainable (the function prepare_model trains with) applied
    to model.build_base's meta-device skeleton (no weights loaded, no memory), cached per setting that changes the
    count, so the sampler can be told 'over budget' in milliseconds. A trial's own backbone, pooling and layer
    count are the ones counted."""

    def __init__(self, label_names: list[str]):
        self.label_names = label_names
        self._skeletons: dict[tuple, Any] = {}
        self._cache: dict[tuple, int] = {}

    def count(self, cfg: ModelConfig) -> int:
        # what build_base's architecture depends on, then what make_trainable's choice of trained weights does
        arch = (cfg.model, cfg.trust_remote_code, cfg.pooling, cfg.num_layers)
        key = arch + (cfg.method, cfg.lora_r, tuple(cfg.target_modules),
                      None if cfg.lora_layers is None else tuple(cfg.lora_layers), cfg.lora_bias)
        if key not in self._cache:
            import torch

            from .model import build_base, make_trainable

            if arch not in self._skeletons:
                self._skeletons[arch] = build_base(cfg, len(self.label_names), self.label_names, weights=False)
            with torch.device("meta"):  # adapters and head copies on the meta device too
                # make_trainable changes the model it is given; a copy of meta tensors costs nothing
                _, info = make_trainable(cfg, copy.deepcopy(self._skeletons[arch]))
            self._cache[key] = info.trainable
        return self._cache[key]


# --- storage and study -----------------------------------------------------------------------------------
def _redact(url: str) -> str:
    """A storage URL as it may be printed: the password replaced."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse is shown as given
        return url


def _with_installed_driver(url: str) -> str:
    """SQLAlchemy 2.1 reads postgresql:// as psycopg 3; lorafit[search] installs psycopg2 (binary wheels everywhere),
    so a bare postgresql:// URL uses psycopg2 when psycopg 3 is absent. An explicit +driver is kept."""
    import importlib.util

    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme) and importlib.util.find_spec("psycopg") is None \
                and importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url[len(scheme):]
    return url


@contextlib.contextmanager
def _no_experimental_warnings():
    """Heartbeats and metric names are stable in use but flagged experimental by Optuna; not the user's concern."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


SCHEMA_RACE_ATTEMPTS = 8  # opening attempts while other workers create Optuna's tables; 5-8 s of backoff in all


def _schema_race(exc: Exception) -> bool:
    """True for the errors of workers started together on a new storage racing to create Optuna's tables and its
    first rows: the loser's CREATE TABLE finds the table made ('table studies already exists' in SQLite, 'relation
    ... already exists' or a duplicate key in pg_type in PostgreSQL), or its insert of the schema version collides.
    An unreachable server or a wrong URL is none of these and fails at once."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    if isinstance(exc, IntegrityError):
        return True
    return isinstance(exc, (OperationalError, ProgrammingError)) and "already exists" in str(exc)


def open_storage(url: str, heartbeat_seconds: int):
    """Optuna's RDBStorage with a heartbeat: a trial whose worker died (SIGKILL, lost machine) is marked failed.

    Workers started together on a new storage all open it: one creates the tables, the others retry (bounded, with
    a jittered backoff so they do not collide again in step) and find them made."""
    import random

    import optuna

    kwargs: dict[str, Any] = {}
    url = _with_installed_driver(url)
    if url.startswith("sqlite"):
        # two workers on one file wait for the lock instead of failing with 'database is locked'
        kwargs["connect_args"] = {"timeout": 60}
    else:
        kwargs["pool_pre_ping"] = True
    jitter = random.Random()  # its own generator: the process's global random state is the caller's
    try:
        for attempt in range(SCHEMA_RACE_ATTEMPTS):
            try:
                with _no_experimental_warnings():
                    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_seconds,
                                                      grace_period=2 * heartbeat_seconds)
            except Exception as exc:  # noqa: BLE001 - sorted by _schema_race; anything else is reported below
                if attempt == SCHEMA_RACE_ATTEMPTS - 1 or not _schema_race(exc):
                    raise
                time.sleep(min(2.0, 0.05 * 2 ** attempt) * jitter.uniform(0.5, 1.5))
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy/driver errors vary by backend; all mean "cannot open"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise LorafitError(f"--storage {_redact(url)}: cannot open the study storage ({type(exc).__name__}: {first}); "
                           "check the URL, that the server is running and reachable, and its driver "
                           "(PostgreSQL: pip install psycopg2-binary)") from None


def _sampler(s: SearchConfig):
    import optuna

    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.sampler_seed)
    if s.sampler == "gp":
        return optuna.samplers.GPSampler(seed=s.sampler_seed, n_startup_trials=s.startup_trials)
    # constant_liar: workers sharing a study see each other's running trials and do not propose the same ones
    return optuna.samplers.TPESampler(seed=s.sampler_seed, n_startup_trials=s.startup_trials, constant_liar=True)


def make_pruner(s: SearchConfig):
    import optuna

    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=max(1, min(s.startup_trials, 5)),
                                           n_warmup_steps=s.pruner_warmup_steps)
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, s.pruner_warmup_steps))
    return optuna.pruners.NopPruner()


def open_study(cfg: Config, study_dir: Path):
    """Create the study or load it; a study created with another search space is refused."""
    import optuna

    s = cfg.search
    url = s.storage or f"sqlite:///{(study_dir / 'study.db').resolve()}"
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    storage = open_storage(url, s.heartbeat_seconds)
    direction = "minimize" if cfg.train.metric_for_best == "loss" else "maximize"
    study = optuna.create_study(study_name=s.study_name, storage=storage, sampler=_sampler(s), pruner=make_pruner(s),
                                direction=direction, load_if_exists=True)
    wanted = space_fingerprint(s.space)
    stored = study.user_attrs.get(SPACE_ATTR)
    if stored is None:
        study.set_user_attr(SPACE_ATTR, wanted)
        study.set_user_attr("metric", cfg.train.metric_for_best)
        with _no_experimental_warnings():
            study.set_metric_names([f"validation_{cfg.train.metric_for_best}"])
    elif stored != wanted:
        old = {k: ParamSpec(**v) for k, v in json.loads(stored).items()}
        raise LorafitError(f"study '{s.study_name}' in {_redact(url)} exists with another search space "
                           f"({_describe_space(old)}); use another --study-name or the same space")
    elif study.direction.name.lower() != direction:
        raise LorafitError(f"study '{s.study_name}' in {_redact(url)} was created to {study.direction.name.lower()} "
                           f"its metric; --metric-for-best {cfg.train.metric_for_best} needs a new --study-name")
    return study, url


def _finished(study, running: bool = False) -> list:
    """Trials that count towards n_trials: trained to the end or pruned by the pruner (over-budget trials cost
    nothing and do not count); with `running`, also those being trained now by any worker."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED) + ((TrialState.RUNNING,) if running else ())
    return [t for t in study.get_trials(deepcopy=False, states=states)
            if not t.user_attrs.get("over_budget") and not t.user_attrs.get("surplus")]


def _over_budget(study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get("over_budget"))


# --- one trial -----------------------------------------------------------------------------------------------
class _ReportToOptuna:
    """Recipe callback: report each validation evaluation to the trial and stop it when the pruner says so."""

    def __init__(self, trial, metric: str, maximize: bool):
        self.trial, self.metric, self.maximize = trial, metric, maximize
        self.best: Optional[float] = None

    def on_evaluate(self, recipe, split, step, metrics) -> None:
        import optuna

        if split != "validation":
            return
        value = float(metrics[self.metric])
        if self.best is None or (value > self.best if self.maximize else value < self.best):
            self.best = value
        self.trial.report(value, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: validation {self.metric} {value:.4f}")


def trial_config(cfg: Config, params: dict[str, Any], trials_dir: Path, number: int) -> Config:
    """The base config with the trial's values and a small run directory: no checkpoints kept."""
    values = dict(params, output_dir=str(trials_dir), run_name=f"trial-{number:04d}", overwrite=True,
                  checkpoint_every=None, keep_checkpoints=1)
    return cfg.model_copy(update={"search": None}).with_overrides(values, source=f"trial {number}")


def _slim(run_dir: Path) -> None:
    """A trial keeps its results and weights; checkpoints and the per-trial report are dropped (the study
    report covers the trials)."""
    for name in ("checkpoints", "plots"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in ("report.html", "report.md"):
        (run_dir / name).unlink(missing_ok=True)


class Objective:
    """The function Optuna calls per trial. Over-budget trials are pruned before anything is built."""

    def __init__(self, cfg: Config, study_dir: Path, counter: ParamCounter, recipe_factory: Callable, console):
        self.cfg, self.study_dir, self.counter = cfg, study_dir, counter
        self.recipe_factory, self.console = recipe_factory, console
        self.metric = cfg.train.metric_for_best
        self.maximize = self.metric != "loss"
        self.budget = cfg.model.param_budget
        # owned here, handed to every trial: tokenisation and frozen-prefix states are shared (see recipe.TrainingRecipe)
        self.reuse: dict = {}

    def __call__(self, trial) -> float:
        import optuna

        # two workers finishing at once may both start a trial past n_trials; trial numbers are unique, so the
        # later one sees the earlier and gives way before training
        earlier = [t for t in _finished(trial.study, running=True) if t.number < trial.number]
        if len(earlier) >= self.cfg.search.n_trials:
            trial.set_user_attr("surplus", True)
            trial.study.stop()
            raise optuna.TrialPruned(f"the study already has its {self.cfg.search.n_trials} trials")
        params = suggest(trial, self.cfg.search.space)
        cfg = trial_config(self.cfg, params, self.study_dir / TRIALS_DIR, trial.number)
        trainable = self.counter.count(cfg.model)
        trial.set_user_attr(PARAMS_ATTR, trainable)
        if self.budget is not None:
            # the sampler (TPE, GP) treats a positive constraint as infeasible and learns the boundary
            trial.set_constraint("trainable_params_over_budget", trainable - self.budget)
            if trainable > self.budget:
                trial.set_user_attr("over_budget", True)
                raise optuna.TrialPruned(f"{trainable:,} trainable parameters exceed the budget of {self.budget:,}")
        reporter = _ReportToOptuna(trial, self.metric, self.maximize)
        # the test split is never used to choose: trials neither evaluate it nor cache its frozen prefix
        recipe = self.recipe_factory(cfg, console=self.console, callbacks=(reporter,), reuse=self.reuse,
                                     evaluate_test=False)
        run_dir = Path(cfg.output.output_dir) / cfg.output.run_name
        trial.set_user_attr(RUN_DIR_ATTR, str(run_dir.relative_to(self.study_dir)))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # who trained it, across machines
        try:
            recipe.setup()
            while recipe.train_epoch():
                pass
            run = recipe.finish()  # no test evaluation, hence no per-trial report either
        finally:
            _slim(run_dir)
        info = getattr(run, "info", None) or {}
        value = info.get(f"best_validation_{self.metric}", reporter.best)
        if value is None:
            value = recipe.evaluate("validation")[self.metric]
        return float(value)


# --- the study -------------------------------------------------------------------------------------------------
def search(config: Union[Config, dict, str, Path, None] = None, *, console=None,
           recipe_factory: Optional[Callable] = None, **overrides) -> SearchResult:
    """Run (or continue) an Optuna study over `config.search.space`; the rest of `config` is fixed.

    `config` is a Config, a dict or a YAML path (with an optional `search:` section); overrides are flat leaf
    names of any section, e.g. `n_trials=10, study_name="r-sweep", epochs=2`. Workers sharing a storage and a
    study name split the trials between them."""
    import optuna
    from rich.console import Console

    cfg = search_config(config, **overrides)
    s = cfg.search
    console = console or Console()
    study_dir = Path(s.search_dir) / s.study_name
    study, url = open_study(cfg, study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(study_dir / "search.yaml")

    from .data import load_data

    label_names = load_data(cfg.data, cfg.data_seed).label_names
    counter = ParamCounter(label_names)
    if recipe_factory is None:
        from .train import recipe_for as recipe_factory

    quiet = Console(quiet=True)  # one live display at a time: trials train silently under the study's bar
    objective = Objective(cfg, study_dir, counter, recipe_factory, quiet)

    with _no_experimental_warnings():
        optuna.storages.fail_stale_trials(study)  # trials of a killed worker, before counting what is left
    remaining = s.n_trials - len(_finished(study))
    console.print(f"[bold]lorafit search[/] study '{s.study_name}' ({_redact(url)}): {len(_finished(study))} of "
                  f"{s.n_trials} trials done; metric validation {cfg.train.metric_for_best}; space: "
                  f"{_describe_space(s.space)}", highlight=False, soft_wrap=True)
    if remaining > 0:
        with _StudyProgress(console, s.n_trials) as progress:
            progress.update(study)

            def after_trial(study_, trial) -> None:
                progress.trial_done(study_, trial)
                # counts every worker's finished and running trials, so no worker starts one past n_trials
                if len(_finished(study_, running=True)) >= s.n_trials:
                    study_.stop()
                elif _over_budget(study_) >= MAX_OVER_BUDGET_FACTOR * s.n_trials:
                    console.print(f"[yellow]stopping: {_over_budget(study_)} proposals were over the parameter "
                                  "budget; narrow the space (lora_r, target_modules, lora_layers)[/]")
                    study_.stop()

            study.optimize(objective, n_trials=None,
                           timeout=s.timeout_minutes * 60 if s.timeout_minutes else None,
                           callbacks=[after_trial], gc_after_trial=True)
    return write_outputs(cfg, study, study_dir, console)


class _StudyProgress:
    """Rich progress bar over the study: trials finished (all workers), best so far, time left."""

    def __init__(self, console, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]search[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("left"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=console, transient=False)
        self.task = self.progress.add_task("search", total=total, info="")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, study) -> None:
        info = ""
        with contextlib.suppress(ValueError):  # no completed trial yet
            info = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
        self.progress.update(self.task, completed=len(_finished(study)), info=info)

    def trial_done(self, study, trial) -> None:
        # Optuna itself logs each trial's result (value, pruned with the reason, failed); the bar counts them
        self.update(study)


# --- outputs ---------------------------------------------------------------------------------------------------
def best_config(cfg: Config, study) -> Optional[Config]:
    """The best trial's complete config as `lorafit train` takes it: trial values, the base's output settings."""
    with contextlib.suppress(ValueError):
        best = study.best_trial
        base = cfg.model_copy(update={"search": None})
        values = {}
        for name, spec in cfg.search.space.items():
            raw = best.params[name]
            values[name] = spec.choices[[_label(c) for c in spec.choices].index(raw)] if spec.type == "categorical" else raw
        return base.with_overrides(values, source=f"trial {best.number}")
    return None


def write_outputs(cfg: Config, study, study_dir: Path, console=None) -> SearchResult:
    """trials.csv, best.yaml, the best trial's test metrics and the report; any worker may write them (atomic)."""
    from optuna.trial import TrialState

    atomic_write_text(study_dir / "trials.csv", _trials_csv(study))
    best = best_config(cfg, study)
    best_value = test_metrics = None
    if best is not None:
        best.to_yaml(study_dir / "best.yaml")
        best_value = study.best_value
        test_metrics = evaluate_best_on_test(study, study_dir)
    counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,))) for state in TrialState}
    from .search_report import write_search_report

    try:
        report = write_search_report(study, study_dir, cfg, test_metrics)
    except Exception as exc:  # noqa: BLE001 - drawing is a bonus; the study's results are intact
        report = None
        if console is not None:
            from rich.markup import escape

            console.print(f"[yellow]warning: the search report could not be written ({escape(describe(exc))})[/]")
    if console is not None:
        if best is not None:
            test = f"; test accuracy {test_metrics['accuracy']:.4f}" if test_metrics else ""
            console.print(f"[bold green]best trial {study.best_trial.number}: validation {cfg.train.metric_for_best} "
                          f"{best_value:.4f}[/]{test}  -> {study_dir / 'best.yaml'}"
                          + (f", {report}" if report else ""), highlight=False, soft_wrap=True)
        else:
            console.print(f"no completed trial yet in {study_dir}", highlight=False)
    return SearchResult(study_dir, study, best, best_value, test_metrics, counts)


def evaluate_best_on_test(study, study_dir: Path) -> Optional[dict[str, Any]]:
    """The only test evaluation of a study: the best trial's saved model on its test split, once."""
    out = study_dir / "best_test_metrics.json"
    best = study.best_trial
    if out.is_file():
        stored = json.loads(out.read_text(encoding="utf-8"))
        if stored.get("trial") == best.number:
            return stored
    rel = best.user_attrs.get(RUN_DIR_ATTR)
    run_dir = study_dir / rel if rel else None
    if run_dir is None or not (run_dir / MODEL_DIR).is_dir():
        return None  # trained on another machine: its run directory is there
    from .data import load_data
    from .evaluate import compute_metrics
    from .predict import load

    clf = load(run_dir)
    run_cfg = read_config(run_dir)
    test = load_data(run_cfg.data, run_cfg.data_seed).test
    names = [str(n) for n in clf.classes_]
    metrics = compute_metrics(test.labels, clf.decision_function(test.texts), names)
    metrics.pop("_logits", None)
    write_test_metrics(run_dir, metrics)
    result = {"trial": best.number, "run_dir": rel, **metrics}
    atomic_write_json(out, result)
    return result


def _trials_csv(study) -> str:
    frame = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params", "user_attrs"))
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    return buf.getvalue()


__all__ = ["DEFAULT_SEARCH_SPACE", "ParamCounter", "SearchResult", "search", "suggest", "write_outputs"]
