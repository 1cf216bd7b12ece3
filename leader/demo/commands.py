"""`leader demo`: the typer command (leader/cli.py registers it as `app.command("demo")(demo)`)."""
from __future__ import annotations

import time
from pathlib import Path

import typer

from leader.errors import LeaderError


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Directory for the shards, teachers, students, evaluations and report."),
    smoke: bool = typer.Option(False, "--smoke", help="A tiny run of every step (CI); its claims may fail at that size."),
    full: bool = typer.Option(False, "--full", help="Add the paper's ablations: single-branch students and the averaging ensemble."),
):
    """The whole pipeline on the built-in phantom: shards, teachers, precompute, train, evaluate, report. Resumes when rerun."""
    from leader.demo.pipeline import run_demo, step_seconds
    from leader.progress import console, progress, rate_text

    if smoke and full:
        raise LeaderError("--smoke and --full exclude each other: --full adds ablations at the default size")
    profile = "smoke" if smoke else "full" if full else "default"
    started = time.perf_counter()
    with progress("steps") as bar:
        overall = bar.add_task(f"demo ({profile})", total=None, rate="")
        current = {"task": None, "t0": 0.0}

        def on_step(index: int, total: int, step, skipped: bool) -> None:
            bar.update(overall, completed=index, total=total)
            if current["task"] is not None:
                bar.remove_task(current["task"])
                current["task"] = None
            if skipped:
                console.print(f"[dim]{index + 1}/{total} {step.title}: done earlier, skipped[/]")
                return
            current["task"] = bar.add_task(f"  {step.title}", total=None, rate="")
            current["t0"] = time.perf_counter()

        def on_progress(done: int, total: int) -> None:
            if current["task"] is not None:
                bar.update(current["task"], completed=done, total=total,
                           rate=rate_text(done, time.perf_counter() - current["t0"], "it"))

        result = run_demo(out, profile, on_step=on_step, on_progress=on_progress)
        if current["task"] is not None:
            bar.remove_task(current["task"])
        bar.update(overall, completed=len(result.ran) + len(result.skipped))
    seconds = step_seconds(out)
    slowest = sorted(seconds.items(), key=lambda kv: -kv[1])[:5]
    console.print(f"demo ({profile}) finished in {time.perf_counter() - started:.0f} s "
                  f"({len(result.ran)} steps run, {len(result.skipped)} done earlier); slowest: "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in slowest))
    for line in _claim_lines(result.report):
        console.print(line)
    typer.echo(f"report: {result.report}")


def _claim_lines(report: Path) -> list[str]:
    """The PASS/FAIL lines of the report, as the report states them."""
    if not report.exists():
        return []
    return [line[2:] for line in report.read_text().splitlines() if line.startswith("- **PASS**") or line.startswith("- **FAIL**")]
