"""`leader demo` and `leader demo teacher` (leader/cli.py adds `demo_app` as `leader demo`)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from leader.errors import LeaderError

demo_app = typer.Typer(help="The whole pipeline on the built-in phantom (no downloads, no GPU).",
                       invoke_without_command=True, no_args_is_help=False)


@demo_app.callback(invoke_without_command=True)
def demo(
    ctx: typer.Context,
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for the shards, teachers, students, evaluations "
                                       "and report (default: runs/demo, or runs/demo-seedN with --seed N)."),
    smoke: bool = typer.Option(False, "--smoke", help="A tiny run of every step (CI); its claims may fail at that size."),
    full: bool = typer.Option(False, "--full", help="Add the paper's ablations: single-branch students and the averaging ensemble."),
    seed: int = typer.Option(0, "--seed", help="Replay the demo from other random draws: moves the phantoms', the "
                             "teachers', the cached views', the student's and the evaluations' seeds together "
                             "(0: the pipeline file as written)."),
):
    """The whole pipeline on the built-in phantom: shards, teachers, precompute, train, evaluate, report. Resumes when rerun."""
    if ctx.invoked_subcommand is not None:
        return
    from leader.demo.pipeline import default_out, run_demo, step_seconds
    from leader.progress import console
    from leader.reproduce.commands import ProgressView

    if smoke and full:
        raise LeaderError("--smoke and --full exclude each other: --full adds ablations at the default size")
    profile = "smoke" if smoke else "full" if full else "default"
    out = out or default_out(seed)
    started = time.perf_counter()
    with ProgressView(f"demo ({profile}" + (f", seed {seed})" if seed else ")")) as view:
        outcome = run_demo(out, profile, reporter=view, seed=seed)
    slowest = sorted(step_seconds(out).items(), key=lambda kv: -kv[1])[:5]
    console.print(f"demo ({profile}) finished in {time.perf_counter() - started:.0f} s "
                  f"({len(outcome.ran)} steps run, {len(outcome.skipped)} done earlier); slowest: "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in slowest))
    for line in _claim_lines(outcome.report):
        console.print(line)
    typer.echo(f"report: {outcome.report}")


@demo_app.command("teacher")
def teacher_command(
    kind: str = typer.Argument(..., help="disease (a Keras CNN exported as a CXR Foundation v2 SavedModel) or "
                               "anatomy (a timm CNN saved as an Adam-v2 checkpoint)."),
    shards: Path = typer.Option(..., "--shards", help="The phantom shard set whose train split it learns from."),
    out: Path = typer.Option(..., "--out", help="The SavedModel folder (disease) or checkpoint file (anatomy)."),
    set_: List[str] = typer.Option([], "--set", help="A setting key=value (repeatable), e.g. --set epochs=2."),
):
    """Train one of the demo's teachers; a teacher already trained with the same settings on the same shards is kept."""
    from leader.demo.teachers import (AnatomyTeacherSettings, DiseaseTeacherSettings, settings_from_pairs,
                                      settings_hash, teacher_is_current, train_anatomy_teacher, train_disease_teacher,
                                      train_in_pinned_process)
    from leader.progress import progress

    trainers = {"disease": (DiseaseTeacherSettings, train_disease_teacher),
                "anatomy": (AnatomyTeacherSettings, train_anatomy_teacher)}
    if kind not in trainers:
        raise LeaderError(f"leader demo teacher: {kind!r} is not a demo teacher; use disease or anatomy")
    cls, train = trainers[kind]
    settings = settings_from_pairs(cls, set_)
    if teacher_is_current(out, settings_hash(settings, shards)):
        typer.echo(f"{kind} teacher in {out} is already trained with these settings on these shards")
        return
    with progress() as bar:
        bar.add_task(f"{kind} teacher (in a process of its own, on pinned CPU kernels)", total=None, rate="")
        record = train_in_pinned_process(train, shards, out, settings)
    numbers = ", ".join(f"{k} {record[k]:.3f}" for k in ("final_train_loss", "val_auc", "val_landmark_accuracy")
                        if k in record)
    typer.echo(f"{kind} teacher: {numbers} ({record['seconds']} s) -> {out}")


def _claim_lines(report: Path | None) -> list[str]:
    """The PASS/FAIL lines of the report, as the report states them."""
    if report is None or not report.exists():
        return []
    return [line[2:] for line in report.read_text().splitlines() if line.startswith("- **PASS**") or line.startswith("- **FAIL**")]
