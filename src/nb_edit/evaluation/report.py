"""The run report: ``papermill_runs/<run_id>/report.md``.

It opens with the paper-claims table (``claims.evaluate_claims`` on the run's metrics and per-item
scores: each claim's quantities with their intervals over seeds, the paired effect with its 95%
interval and the three-way verdict), then lists every
metric of the run's ``metrics.json`` (grouped by their first name part, with the seed-study
``.sd``/``.n`` and the bootstrap ``.ci_low``/``.ci_high`` of notebook 08 folded into the mean's
row), then the training curves recorded point by point (``runs.curve_metrics``) as one table per
curve, step by step, and shows every figure the notebooks saved under ``figures/``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from nb_edit.core.runs import CURVE_KEY, Run, read_metrics
from nb_edit.evaluation.claims import claims_markdown, evaluate_run

FOLDED = (".sd", ".n", ".ci_low", ".ci_high")  # suffixes shown in the row of the key they qualify


def _format(value: float) -> str:
    if float(value).is_integer() and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.4g}"


def _cell(metrics: dict[str, float], key: str) -> str:
    cell = _format(metrics[key])
    if f"{key}.sd" in metrics and f"{key}.n" in metrics:
        cell += f" ± {_format(metrics[key + '.sd'])} (n={_format(metrics[key + '.n'])})"
    if f"{key}.ci_low" in metrics and f"{key}.ci_high" in metrics:
        cell += f" [{_format(metrics[key + '.ci_low'])}, {_format(metrics[key + '.ci_high'])}]"
    return cell


def _is_curve(key: str) -> bool:
    return bool(CURVE_KEY.match(key) or key.endswith(FOLDED) and CURVE_KEY.match(key.rsplit(".", 1)[0]))


def curves_table(metrics: dict[str, float]) -> str:
    """The training curves of the metrics (``<prefix>.curve.step<N>.<name>``): a table per prefix,
    a row per step and a column per name, ``mean ± sd (n)`` where a seed study ran; "" if none."""
    curves: dict[str, dict[int, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    names: dict[str, list[str]] = defaultdict(list)
    for key in sorted(metrics):
        match = CURVE_KEY.match(key)
        if match is None:  # (a folded .sd / .n never matches: a name holds no dot)
            continue
        prefix, step, name = match["prefix"], int(match["step"]), match["name"]
        curves[prefix][step][name] = _cell(metrics, key)
        if name not in names[prefix]:
            names[prefix].append(name)
    lines: list[str] = []
    for prefix, points in curves.items():
        cols = names[prefix]
        lines += [f"### {prefix}", "", "| step | " + " | ".join(f"`{c}`" for c in cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {step} | " + " | ".join(points[step].get(c, "") for c in cols) + " |" for step in sorted(points)]
        lines.append("")
    return "\n".join(lines)


def metrics_table(metrics: dict[str, float]) -> str:
    """Markdown tables of the metrics, one per group, ``mean ± sd (n)`` where a seed study ran and
    ``mean [low, high]`` where a bootstrap interval over items was recorded."""
    groups: dict[str, list[str]] = defaultdict(list)
    for key in sorted(metrics):
        if _is_curve(key):
            continue  # curves_table shows them
        if key.endswith(FOLDED):
            base = key.rsplit(".", 1)[0]
            if base in metrics:
                continue
        groups[key.split(".", 1)[0]].append(key)
    lines: list[str] = []
    for group, keys in groups.items():
        lines += [f"### {group}", "", "| metric | value |", "|---|---|"]
        for key in keys:
            lines.append(f"| `{key}` | {_cell(metrics, key)} |")
        lines.append("")
    return "\n".join(lines)


def write_report(run: Run, title: str | None = None, to: Path | None = None) -> Path:
    """Write the run's report: ``report.md`` in its folder, or ``to`` (for example
    ``docs/results.md``), where the figures are listed by name, since they stay in the run folder."""
    metrics = read_metrics(run)
    config_path = run.dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    lines = [f"# {title or 'nb-edit run ' + run.run_id}", ""]
    lines += ["## Paper claims", "", claims_markdown(evaluate_run(run)), ""]
    if config:
        settings = ", ".join(f"{k}={v}" for k, v in sorted(config.get("parameters", {}).items()))
        lines += ["## Run", "", f"Parameters: {settings or '(defaults)'}", ""]
        if "timings_s" in config:
            lines += ["Notebook wall times (s): " + ", ".join(
                f"{name} {sec:.0f}" for name, sec in config["timings_s"].items()), ""]
    lines += ["## Metrics", "", metrics_table(metrics) if metrics else "(no metrics recorded)", ""]
    curves = curves_table(metrics)
    if curves:
        lines += ["## Training curves", "", "Measured during training on a fixed set of held-out edits "
                  "(steps count from the start of training, a warm-up included).", "", curves]
    figures = sorted((run.dir / "figures").glob("*.png")) if (run.dir / "figures").exists() else []
    if figures and to is None:
        lines += ["## Figures", ""]
        for fig in figures:
            lines += [f"### {fig.stem}", "", f"![{fig.stem}](figures/{fig.name})", ""]
    elif figures:
        lines += ["## Figures", "", f"In the run folder `papermill_runs/{run.run_id}/figures/` and in the committed "
                  "notebooks: " + ", ".join(f"`{fig.stem}`" for fig in figures) + ".", ""]
    path = Path(to) if to is not None else run.dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
