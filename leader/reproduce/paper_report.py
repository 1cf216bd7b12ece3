"""The report step: the pipeline's evaluations as one page, laid out as the pipeline file says.

    path = write_pipeline_report(plan)          # OUT/report.md

The page holds, in order:
- the claims (PASS or FAIL, as `leader report --claims` judges them; a claim may name the
  `evaluation` whose numbers it reads, since one protocol can run on several datasets);
- each table of the pipeline file: rows are representations, columns are evaluations (optionally
  one `fraction` and one `metric` of them); a cell whose evaluation did not run says "not run";
- each figure reference (t-SNE, retrieval grid, AUC bars) with links to the figure files;
- what did not run, and why;
- `leader report`'s own sections, one per evaluation dataset (or per evaluation, where two
  evaluations of one dataset share a protocol and a representation), rendered by
  leader.evaluate.report.

Nothing is timed or dated, so an interrupted and resumed run writes the same page as an
uninterrupted one.
"""
from __future__ import annotations

import os
from pathlib import Path

from leader.evaluate.figures import auc_bars
from leader.evaluate.claims import check_claims, judge
from leader.evaluate.report import _cell, combined_auc_figures, render_report
from leader.evaluate.results import METRICS_NAME, load_metrics
from leader.io import atomic_write_text
from leader.reproduce.steps import Layout, Plan

NOT_RUN = "not run"


def write_pipeline_report(plan: Plan) -> Path:
    layout = Layout(plan.out)
    report = layout.report
    report_dir = report.parent.resolve()
    figure_dir = report_dir / "report_figures"
    results = load_results(plan, layout)
    pipeline = plan.pipeline
    lines = [f"# {pipeline.title}: reproduction report", "",
             f"Pipeline `{pipeline.name}`" + (f", profile `{pipeline.profile}`" if pipeline.profile else "")
             + f", run by `leader reproduce`. Every number is read from the metrics.json of its evaluation step "
             f"(`{layout.out}/eval/EVALUATION/REPRESENTATION`).", ""]
    lines += claim_lines(pipeline.report.get("claims") or [], results)
    for table in pipeline.report.get("tables") or []:
        lines += table_lines(table, plan, results)
    figures = pipeline.report.get("figures") or []
    if figures:
        lines += ["## Figures", ""]
        for figure in figures:
            lines += figure_lines(figure, plan, results, report_dir, figure_dir)
    if plan.not_run:
        lines += ["## Not run", ""] + [f"- `{name}`: {why}" for name, why in plan.not_run.items()] + [""]
    lines += made_teacher_lines(plan, layout)
    for note in pipeline.report.get("notes") or []:
        lines += [note, ""]
    lines += evaluation_sections(plan, results, report_dir, figure_dir)
    atomic_write_text(report, "\n".join(lines).rstrip() + "\n")
    return report


def load_results(plan: Plan, layout: Layout) -> dict[tuple[str, str], dict]:
    """(evaluation, representation label) -> its metrics, for every evaluation step that finished."""
    results = {}
    for e in plan.pipeline.evaluations:
        for rep in e.representations:
            path = layout.evaluation(e.name, rep.label) / METRICS_NAME
            if path.exists() and f"eval-{e.name}-{rep.label}" in plan.by_name:
                results[(e.name, rep.label)] = {**load_metrics(path), "_evaluation": e.name, "_label": rep.label}
    return results


def claim_lines(claims: list[dict], results: dict) -> list[str]:
    if not claims:
        return []
    verdicts = []
    for claim in claims:
        plain = {k: v for k, v in claim.items() if k != "evaluation"}
        check_claims([plain], "pipeline report.claims")
        metrics = [m for (e, _), m in results.items() if claim.get("evaluation") in (None, e)]
        verdicts.append(judge(plain, metrics))
    passed = sum(v.passed for v in verdicts)
    return ([f"## Claims: {passed} of {len(verdicts)} pass", ""]
            + [f"- **{'PASS' if v.passed else 'FAIL'}** {v.name}: {v.detail}" for v in verdicts] + [""])


def table_lines(table: dict, plan: Plan, results: dict) -> list[str]:
    pipeline = plan.pipeline
    columns = table["columns"]
    rows = table.get("rows") or list(dict.fromkeys(
        r.label for c in columns for r in pipeline.evaluation(c["evaluation"]).representations))
    headers = ["representation"] + [c.get("title") or _column_title(c) for c in columns]
    lines = [f"## {table.get('title') or 'Table'}", ""]
    if table.get("note"):
        lines += [str(table["note"]), ""]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [cell(plan, results, c, row) for c in columns]
        lines.append(f"| `{row}` | " + " | ".join(cells) + " |")
    return lines + [""]


def cell(plan: Plan, results: dict, column: dict, label: str) -> str:
    evaluation = plan.pipeline.evaluation(column["evaluation"])
    if label not in {r.label for r in evaluation.representations}:
        return "-"
    metrics = results.get((evaluation.name, label))
    if metrics is None:
        return NOT_RUN
    values = metrics
    if column.get("fraction") is not None:
        values = metrics.get("fractions", {}).get(f"{float(column['fraction']):g}")
        if values is None:
            return f"no fraction {column['fraction']:g}"
    metric = column.get("metric") or metrics["primary"]
    if metric not in values:
        return f"no {metric}"
    return _cell({**values, "primary": metric})


def _column_title(column: dict) -> str:
    title = column["evaluation"]
    if column.get("fraction") is not None:
        title += f" {100 * float(column['fraction']):g}%"
    return title + (f" ({column['metric']})" if column.get("metric") else "")


def figure_lines(figure: dict, plan: Plan, results: dict, report_dir: Path, figure_dir: Path) -> list[str]:
    evaluation = plan.pipeline.evaluation(figure["evaluation"])
    labels = figure.get("representations") or [r.label for r in evaluation.representations]
    name = figure["figure"]
    lines = [f"### {figure['title']}", ""]
    found = {label: results[(evaluation.name, label)] for label in labels if (evaluation.name, label) in results}
    if name == "auc_per_class" and len(found) > 1:
        # One chart of every representation side by side, as the paper draws its AUC bars.
        path = auc_bars({label: m["auc_per_class"] for label, m in found.items() if "auc_per_class" in m},
                        figure_dir / f"{evaluation.name}-auc_per_class.png", title=figure["title"])
        lines += [f"![{figure['title']}]({os.path.relpath(path, report_dir)})", ""]
    else:
        for label, metrics in found.items():
            rel = metrics.get("figures", {}).get(name)
            if rel is None:
                lines.append(f"- `{label}`: its evaluation made no {name} figure")
                continue
            path = Path(metrics["_path"]).parent / rel
            lines += [f"![{figure['title']}: {label}]({os.path.relpath(path, report_dir)})", ""]
    for label in labels:
        if label not in found:
            lines.append(f"- `{label}`: {NOT_RUN}")
    return lines + [""]


def made_teacher_lines(plan: Plan, layout: Layout) -> list[str]:
    """Teachers this pipeline made: the scalar fields of the record a make command may leave beside
    the weights (`<output name up to its first dot>.json`, e.g. teachers/anatomy.json)."""
    import json

    lines = []
    for teacher in plan.pipeline.teachers.values():
        if teacher.make is None:
            continue
        record = layout.teacher(teacher.make.output.split(".")[0] + ".json")
        if not record.exists():
            continue
        fields = json.loads(record.read_text())
        shown = "; ".join(f"{k} {_fmt(v)}" for k, v in fields.items()
                          if isinstance(v, (str, int, float)) and not isinstance(v, bool) and k not in ("path", "teacher")
                          and not k.endswith("sha256"))
        lines.append(f"- `{teacher.name}` (made by `leader {' '.join(teacher.make.command)}`): {shown}")
    return (["## Teachers made by this pipeline", ""] + lines + [""]) if lines else []


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def evaluation_sections(plan: Plan, results: dict, report_dir: Path, figure_dir: Path) -> list[str]:
    """`leader report`'s tables and sections for each group of evaluations that fits one report."""
    lines = []
    for title, slug, group in _groups(plan, results):
        combined = combined_auc_figures(group, figure_dir / slug)
        text, _ = render_report(group, report_dir, None, combined)
        body = text.splitlines()[1:]                              # its own "# Evaluation report" title
        while body and not body[0].strip():
            body.pop(0)
        lines += [f"## {title}", ""] + [("#" + line) if line.startswith("## ") else line for line in body]
    return lines


def _groups(plan: Plan, results: dict) -> list[tuple[str, str, list[dict]]]:
    """One group per dataset, unless two of its evaluations share a protocol and a representation:
    then one group per evaluation (leader report holds one value per cell)."""
    groups = []
    for dataset in plan.pipeline.datasets:
        metrics = [m for (e, _), m in results.items() if plan.pipeline.evaluation(e).dataset == dataset]
        if not metrics:
            continue
        cells = [(m["protocol"], m["representation"]) for m in metrics]
        if len(set(cells)) == len(cells):
            groups.append((f"Evaluations on {dataset}", dataset, metrics))
            continue
        for e in plan.pipeline.evaluations:
            own = [m for m in metrics if m["_evaluation"] == e.name]
            if own:
                groups.append((f"Evaluation {e.name} ({dataset})", e.name, own))
    return groups
