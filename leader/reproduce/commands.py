"""`leader reproduce`: the typer command (leader/cli.py registers it as `app.command("reproduce")`)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer


def reproduce_command(
    pipeline: Path = typer.Argument(..., help="The pipeline file (YAML), e.g. configs/paper.yaml."),
    out: Path = typer.Option(..., "--out", help="Folder for every step's outputs, the markers and the report."),
    only: List[str] = typer.Option([], "--only", help="Run only these steps: a stage (shards, teacher, precompute, "
                                   "train, eval, report), a dataset, a teacher, student or evaluation name, or a step "
                                   "name (repeatable). Their inputs from other steps must be complete."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print each step's exact command instead of running it."),
    gpus: int = typer.Option(0, "--gpus", help="GPUs of this machine: precompute and train run under torchrun when "
                             "more than 1; precompute and evaluations use --device cuda from 1."),
    skip_missing: bool = typer.Option(False, "--skip-missing", help="Leave out the datasets whose roots are missing; "
                                      "the report marks their cells 'not run'."),
    profile: Optional[str] = typer.Option(None, "--profile", help="A profile of the pipeline file, merged over it."),
):
    """Run a whole study from a pipeline file: shards, teachers, cache, students, evaluations, report. Resumes when rerun."""
    from leader.reproduce.runner import reproduce

    if dry_run:
        reproduce(pipeline, out, profile=profile, only=only, dry_run=True, gpus=gpus, skip_missing=skip_missing,
                  echo=typer.echo)
        return
    started = time.perf_counter()
    with ProgressView(f"reproduce {pipeline.stem}") as view:
        outcome = reproduce(pipeline, out, profile=profile, only=only, gpus=gpus, skip_missing=skip_missing,
                            reporter=view)
    from leader.progress import console

    console.print(f"reproduce {outcome.plan.pipeline.name}: {len(outcome.ran)} steps run, {len(outcome.skipped)} done "
                  f"earlier, in {time.perf_counter() - started:.0f} s")
    for name, why in outcome.plan.not_run.items():
        console.print(f"[yellow]not run[/]: {name} ({why})")
    report = outcome.report
    if report is not None and "report" in outcome.selected:
        typer.echo(f"report: {report}")


class ProgressView:
    """One progress view: the pipeline's steps as one bar; each step's own bars appear below it."""

    def __init__(self, title: str):
        self.title = title

    def __enter__(self):
        from leader.progress import progress

        self._context = progress("steps")
        self.bar = self._context.__enter__()
        self.task = self.bar.add_task(self.title, total=None, rate="")
        self.current = None
        return self

    def __exit__(self, *exc):
        self._close_current()
        return self._context.__exit__(*exc)

    def planned(self, steps, skipped) -> None:
        self.total = len(steps)
        self.bar.update(self.task, total=len(steps), completed=0)

    def skip(self, index, step) -> None:
        from leader.progress import console

        console.print(f"[dim]{index + 1}/{self.total} {step.name}: done earlier, skipped[/]")
        self.bar.update(self.task, completed=index + 1)

    def start(self, index, step, command, log) -> None:
        from leader.progress import console

        self._close_current()
        console.print(f"{index + 1}/{self.total} {step.name}: {command.display()}")
        self.bar.update(self.task, description=f"{self.title}: {step.name}", completed=index)
        if log is not None:
            self.current = self.bar.add_task(f"  {step.name} in its own process (log: {log})", total=None, rate="")

    def finish(self, index, step, seconds) -> None:
        self._close_current()
        self.bar.update(self.task, completed=index + 1)

    def _close_current(self) -> None:
        if self.current is not None:
            self.bar.remove_task(self.current)
            self.current = None
