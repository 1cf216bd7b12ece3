"""`leader report`: every metrics.json under some directories, as one markdown page.

    text, verdicts = write_report(["runs/demo/eval"], "runs/demo/report.md", claims=load_claims("claims.yaml"))
    # load_claims: leader/evaluate/claims.py

The page holds:
- a summary table, representations as rows and protocols as columns (primary metric with its
  95% CI, or mean ± std over seeds/folds/queries);
- one section per protocol: the secondary numbers, and a t-test (`compare`) of the best
  representation against each other one, saying which differences are significant;
- the figures, linked by paths relative to the report: per AUC protocol one grouped bar chart
  of every representation (written to `<report>_figures/`), the t-SNE plots and retrieval grids;
- when claims are given, each claim with PASS or FAIL and the numbers behind it. A claim whose
  numbers are missing is a FAIL that says what is missing: nothing is left out quietly.

Claims are the declarative list `leader/evaluate/claims.py` describes.
"""
from __future__ import annotations

import os
from pathlib import Path

from leader.errors import LeaderError
from leader.evaluate.claims import Verdict, judge
from leader.evaluate.compare import compare_metrics
from leader.evaluate.figures import auc_bars
from leader.evaluate.protocols import protocols
from leader.evaluate.results import METRICS_NAME, load_metrics
from leader.io import atomic_write_text

def collect_metrics(paths: list[str | Path]) -> list[dict]:
    """Every metrics.json named, or found below the named directories, in a stable order."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(p.rglob(METRICS_NAME)))
        else:
            raise LeaderError(f"report: {p} does not exist")
    if not found:
        raise LeaderError(f"report: no {METRICS_NAME} under {', '.join(map(str, paths))}; run `leader eval ...` first")
    metrics = [load_metrics(p) for p in found]
    seen: dict[tuple[str, str], str] = {}
    for m in metrics:
        cell = (m["protocol"], m["representation"])
        if cell in seen:
            raise LeaderError(f"report: {seen[cell]} and {m['_path']} both hold {cell[0]} for {cell[1]}; "
                              "report one evaluation per cell")
        seen[cell] = m["_path"]
    return metrics


def _cell(m: dict) -> str:
    primary = m["primary"]
    value = m[primary]
    ci_key = primary.replace("_mean", "") + "_ci95"
    if ci_key in m:
        lo, hi = m[ci_key]
        return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"
    std = m.get(primary.replace("_mean", "") + "_std", m.get(primary + "_std"))
    return f"{value:.3f} ± {std:.3f}" if std is not None else f"{value:.3f}"


def _protocols(metrics: list[dict]) -> list[str]:
    """The protocols present, in the registry's order; any unregistered ones after, by name."""
    present = {m["protocol"] for m in metrics}
    order = [p.name for p in protocols()]
    return [p for p in order if p in present] + sorted(present - set(order))


def combined_auc_figures(metrics: list[dict], figure_dir: Path) -> dict[str, Path]:
    """One grouped AUC-per-class bar chart per AUC protocol, all its representations side by side."""
    figures = {}
    for protocol in _protocols(metrics):
        group = [m for m in metrics if m["protocol"] == protocol and "auc_per_class" in m]
        if group:
            figures[protocol] = auc_bars({m["representation"]: m["auc_per_class"] for m in group},
                                         figure_dir / f"{protocol}_auc_per_class.png", title=f"{protocol}: AUC per class")
    return figures


def render_report(metrics: list[dict], report_dir: Path, claims: list[dict] | None = None,
                  combined: dict[str, Path] | None = None) -> tuple[str, list[Verdict]]:
    protocols = _protocols(metrics)
    combined = combined or {}
    reps = list(dict.fromkeys(m["representation"] for m in metrics))
    by_cell = {(m["protocol"], m["representation"]): m for m in metrics}
    lines = ["# Evaluation report", ""]
    verdicts = [judge(c, metrics) for c in claims or []]
    if verdicts:
        n_pass = sum(v.passed for v in verdicts)
        lines += [f"## Claims: {n_pass} of {len(verdicts)} pass", ""]
        lines += [f"- **{'PASS' if v.passed else 'FAIL'}** {v.name}: {v.detail}" for v in verdicts]
        lines.append("")
    lines += ["## Summary", "",
              "Primary metric per protocol with its 95% bootstrap CI [lo, hi], or mean ± std over seeds, folds or queries.", ""]
    headers = ["representation"] + [f"{p} ({_primary(metrics, p)})" for p in protocols]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for rep in reps:
        cells = [_cell(by_cell[(p, rep)]) if (p, rep) in by_cell else "-" for p in protocols]
        lines.append(f"| `{rep}` | " + " | ".join(cells) + " |")
    lines.append("")
    for protocol in protocols:
        lines += _protocol_section(protocol, [m for m in metrics if m["protocol"] == protocol], report_dir,
                                   combined.get(protocol))
    return "\n".join(lines) + "\n", verdicts


def _primary(metrics: list[dict], protocol: str) -> str:
    return next(m["primary"] for m in metrics if m["protocol"] == protocol)


def _protocol_section(protocol: str, group: list[dict], report_dir: Path, combined: Path | None) -> list[str]:
    primary = group[0]["primary"]
    ranked = sorted(group, key=lambda m: -m[primary])
    best = ranked[0]
    secondary = {p.name: p.secondary for p in protocols()}.get(protocol, ())
    extra = [k for k in secondary if any(k in m for m in group)]
    lines = [f"## {protocol}", "", f"Samples for the t-test: {best['samples']['over']}. "
             f"Each row is compared with the best, `{best['representation']}` (scipy `ttest_ind`, alpha 0.05).", ""]
    headers = ["representation", primary, *extra, "vs best"]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for m in ranked:
        if m is best:
            verdict = "best"
        else:
            c = compare_metrics(best, m)
            if c.p is not None:
                verdict = f"p = {c.p:.3g}, {'significant' if c.significant else 'not significant'}"
            else:
                ci = "" if c.ci_overlap is None else f"; 95% CIs {'overlap' if c.ci_overlap else 'do not overlap'}"
                verdict = f"no t-test: {c.note}{ci}"
        values = [_fmt(m.get(k)) for k in extra]
        lines.append(f"| `{m['representation']}` | {_cell(m)} | " + " | ".join(values) + (" | " if values else "")
                     + f"{verdict} |")
    lines.append("")
    if combined is not None:
        lines += [f"![{protocol}: AUC per class, all representations]({os.path.relpath(combined, report_dir)})", ""]
    for m in ranked:
        for name, rel in m.get("figures", {}).items():
            if combined is not None and name == "auc_per_class":
                continue                                 # already in the combined chart
            figure = Path(m["_path"]).parent / rel
            link = os.path.relpath(figure, report_dir)
            lines += [f"![{protocol} {name}: {m['representation']}]({link})", ""]
    return lines


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def write_report(paths: list[str | Path], out: str | Path, claims: list[dict] | None = None) -> tuple[str, list[Verdict]]:
    out = Path(out)
    metrics = collect_metrics(paths)
    report_dir = out.parent.resolve()
    combined = combined_auc_figures(metrics, report_dir / f"{out.stem}_figures")
    text, verdicts = render_report(metrics, report_dir, claims, combined)
    atomic_write_text(out, text)
    return text, verdicts
