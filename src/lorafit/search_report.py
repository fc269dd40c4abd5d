"""The study report: trials table and Optuna's own matplotlib visualisations (optimisation history, parameter
importances, each parameter against the metric), as search_report.md + plots/ and a self-contained
search_report.html. Drawn from the study storage alone, so any worker (or a later `lorafit search`) can redraw it."""

from __future__ import annotations

import html
import io
import warnings
from pathlib import Path
from typing import Any, Optional

from .fileio import atomic_write_bytes, atomic_write_text
from .report import figure_html

PLOTS_DIR = "plots"


def _figure_png(draw) -> bytes:
    """PNG of the figure Optuna draws. Optuna's matplotlib functions call plt.style.use('ggplot'); rc_context
    undoes that on exit, so the caller's matplotlib settings are left as they were."""
    import matplotlib
    import matplotlib.pyplot as plt

    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        ax = draw()
        axes = ax.ravel() if hasattr(ax, "ravel") else [ax]
        fig = axes[0].figure
        try:
            fig.set_size_inches(max(6.4, 4.0 * len(axes)), 4.2)
            if len(axes) == 1:  # a multi-panel slice plot has a colorbar that tight_layout would overlap
                fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100)
            return buf.getvalue()
        finally:
            plt.close(fig)


def draw_plots(study, out_dir: Path, metric: str) -> tuple[list[tuple[str, str]], list[str]]:
    from optuna.visualization import matplotlib as ovm

    target_name = f"validation {metric}"
    plots = {
        "optimization_history.png": ("Optimisation history: each trial's validation metric and the best so far",
                                     lambda: ovm.plot_optimization_history(study, target_name=target_name)),
        "param_importances.png": ("Parameter importances (fANOVA over the completed trials)",
                                  lambda: ovm.plot_param_importances(study, target_name=target_name)),
        "intermediate_values.png": ("Validation metric at each evaluation (pruned trials stop early)",
                                    lambda: ovm.plot_intermediate_values(study)),
    }
    # each parameter against the metric, three to a figure so the panels stay readable
    names = sorted({k for t in study.trials for k in t.params})
    for i in range(0, len(names), 3):
        group = names[i:i + 3]
        plots[f"params_vs_metric_{i // 3 + 1}.png"] = (
            f"Validation metric against {', '.join(group)} (colour: trial number)",
            lambda group=group: ovm.plot_slice(study, params=group, target_name=target_name))
    drawn, problems = [], []
    for name, (caption, draw) in plots.items():
        try:
            atomic_write_bytes(out_dir / name, _figure_png(draw))
            drawn.append((name, caption))
        except Exception as exc:  # noqa: BLE001 - e.g. importances need two completed trials; others still draw
            problems.append(f"{name}: {type(exc).__name__}: {str(exc)[:200]}")
    return drawn, problems


def trials_table(study) -> list[list[Any]]:
    names = list(dict.fromkeys(k for t in study.trials for k in t.params))
    rows = [["trial", "state", "value", "trainable params", "seconds", *names, "run"]]
    for t in study.trials:
        state = ("over budget" if t.user_attrs.get("over_budget") else "not needed" if t.user_attrs.get("surplus")
                 else t.state.name.lower())
        seconds = f"{t.duration.total_seconds():.0f}" if t.duration else ""
        value = f"{t.value:.4f}" if t.value is not None else ""
        params = [_fmt(t.params.get(k, "")) for k in names]
        trainable = t.user_attrs.get("trainable_params")
        rows.append([t.number, state, value, f"{trainable:,}" if trainable is not None else "", seconds, *params,
                     t.user_attrs.get("run_dir", "")])
    return rows


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write_search_report(study, study_dir: Path, cfg, test_metrics: Optional[dict]) -> Path:
    """Write plots/, search_report.md and search_report.html into the study directory; return the HTML path."""
    metric = cfg.train.metric_for_best
    plots_dir = study_dir / PLOTS_DIR
    plots_dir.mkdir(parents=True, exist_ok=True)
    drawn, problems = draw_plots(study, plots_dir, metric)
    table = trials_table(study)
    summary = [("study", study.study_name), ("trials", str(len(study.trials)))]
    try:
        summary += [(f"best validation {metric}", f"{study.best_value:.4f}"), ("best trial", str(study.best_trial.number))]
    except ValueError:
        pass
    if test_metrics:
        summary.append(("best trial's test accuracy", f"{test_metrics['accuracy']:.4f}"))
    title = f"lorafit search: {study.study_name}"

    md = [f"# {title}", ""] + [f"- **{k}**: {v}" for k, v in summary] + [""]
    md += ["Trials are chosen on the validation split; the test split is evaluated for the best trial only.", "",
           "## Trials", "", _md_table(table), "## Plots", ""]
    md += [f"![{caption}]({PLOTS_DIR}/{name})\n\n*{caption}*\n" for name, caption in drawn]
    if problems:
        md += ["## Plots not drawn", ""] + [f"- {p}" for p in problems] + [""]
    md += ["Reproduce the best trial: `lorafit train best.yaml`.", ""]
    atomic_write_text(study_dir / "search_report.md", "\n".join(md))

    e = html.escape
    body = [f"<h1>{e(title)}</h1><ul>" + "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in summary) + "</ul>",
            "<p>Trials are chosen on the validation split; the test split is evaluated for the best trial only.</p>",
            "<h2>Trials</h2><table><tr>" + "".join(f"<th>{e(str(c))}</th>" for c in table[0]) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in table[1:])
            + "</table><h2>Plots</h2>"]
    body += [figure_html(plots_dir / name, caption) for name, caption in drawn]
    if problems:
        body.append("<h2>Plots not drawn</h2><ul>" + "".join(f"<li>{e(p)}</li>" for p in problems) + "</ul>")
    body.append("<p>Reproduce the best trial: <code>lorafit train best.yaml</code>.</p>")
    css = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2rem auto;padding:0 1rem}table{border-collapse:"
           "collapse}td,th{border:1px solid #d0d7de;padding:.25rem .5rem;text-align:left}th{background:#f6f8fa}"
           "figure{margin:1rem 0}img{max-width:100%;border:1px solid #d0d7de}figcaption{color:#57606a}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{css}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")
    out = study_dir / "search_report.html"
    atomic_write_text(out, page)
    return out


def _md_table(rows: list[list[Any]]) -> str:
    cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(cell, rows[0])) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows[1:]]
    return "\n".join(lines) + "\n"
