"""Running a pipeline: check everything first, then run the steps that are not done, in order.

    outcome = reproduce("configs/paper.yaml", "runs/paper")
    outcome = reproduce("configs/paper.yaml", "runs/paper", only=["nih14"], dry_run=True)

Before anything runs:
- every step's argument list is parsed by the `leader` command it calls (a misspelt option in the
  pipeline file fails now, naming the step);
- every missing input is listed at once: dataset roots, teacher weights, configs, checkpoints, and
  (with --only) the outputs of unselected steps the selected ones read. `skip_missing` drops the
  datasets whose roots are absent instead; their steps, and what needs them, are reported "not run".

`only` selects steps by stage (shards, teacher, precompute, train, eval, report), dataset,
evaluation name or step name, and runs exactly those: a cluster user submitting steps one by one
wants the named step, not its inputs again. Their inputs from other steps must be complete.

Each step then runs exactly `step.command()`: ordinary steps through the typer app in this
process (no interpreter start per step), steps that load TensorFlow in a child process (TensorFlow
and torch do not share a process), precompute and train under `torchrun` with gpus > 1, and the
report by this engine. The dry run prints the same commands.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from leader.errors import LeaderError
from leader.io import atomic_write_json
from leader.reproduce.arguments import parse_problem
from leader.reproduce.fingerprints import InputIdentities, fingerprints, outputs_complete, read_marker, write_marker
from leader.reproduce.spec import Pipeline, load_pipeline
from leader.reproduce.steps import STAGES, Command, Plan, Step, plan_steps

PIPELINE_RECORD = "pipeline.json"
CANONICAL_OUT = Path("$OUT")


@dataclass
class Outcome:
    plan: Plan
    selected: list[str]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)          # done earlier with the same inputs
    commands: dict[str, str] = field(default_factory=dict)    # step -> the command it ran (or would run)
    seconds: float = 0.0

    @property
    def report(self) -> Path | None:
        report = self.plan.by_name.get("report")
        return Path(report.done_when[1]) if report is not None else None


class Reporter:
    """What the runner tells the user; the command line shows it in one progress view."""

    def planned(self, steps: list[Step], skipped: list[str]) -> None: ...
    def skip(self, index: int, step: Step) -> None: ...
    def start(self, index: int, step: Step, command: Command, log: Path | None) -> None: ...
    def finish(self, index: int, step: Step, seconds: float) -> None: ...


def reproduce(pipeline: str | Path | Pipeline, out: str | Path, *, profile: str | None = None, only: list[str] = (),
              dry_run: bool = False, gpus: int = 0, skip_missing: bool = False,
              reporter: Reporter | None = None, echo: Callable[[str], None] = print) -> Outcome:
    """Run (or resume, or with dry_run print) the pipeline into `out`."""
    if gpus < 0:
        raise LeaderError(f"--gpus must be 0 or more, got {gpus}")
    pipeline = pipeline if isinstance(pipeline, Pipeline) else load_pipeline(pipeline, profile)
    out = Path(out)
    reporter = reporter or Reporter()
    missing_roots = {d.name: f"root {d.root} not found" for d in pipeline.datasets.values()
                     if d.root is not None and not d.root.exists()}
    plan = plan_steps(pipeline, out, gpus, missing_roots if skip_missing else None)
    # Fingerprints read the steps as planned into a placeholder folder: however OUT is spelt
    # (relative, absolute), the same study has the same fingerprints.
    canonical = plan_steps(pipeline, CANONICAL_OUT, gpus, missing_roots if skip_missing else None)
    selected = select(plan, only)
    state = out / "state"
    identities = InputIdentities(state)
    prints = fingerprints(canonical, identities)
    status = {s.name: step_status(s, prints[s.name], state) for s in plan.steps}
    # The report counts an evaluation that will not have run (skipped by --only, never run) as "not run".
    will_run = {s.name for s in selected}
    absent = {s.name for s in plan.steps if s.name not in will_run and status[s.name] != "done"}
    prints = fingerprints(canonical, identities, not_run=absent)
    status = {s.name: step_status(s, prints[s.name], state) for s in plan.steps}

    problems = argument_problems(selected) + missing_inputs(plan, selected, status)
    outcome = Outcome(plan, [s.name for s in selected])
    if dry_run:
        print_plan(plan, selected, status, problems, echo)
        if any(p.startswith("step ") for p in problems):
            raise LeaderError(_listing("the pipeline has problems", [p for p in problems if p.startswith("step ")]))
        outcome.commands = {s.name: s.command(fresh=status[s.name] == "fresh").display()
                            for s in selected if status[s.name] != "done"}
        return outcome
    if problems:
        raise LeaderError(_listing(f"{len(problems)} problem(s) found before running anything (nothing was run)", problems))
    claim_out_dir(pipeline, out)
    identities.save()

    started = time.perf_counter()
    reporter.planned(selected, [s.name for s in selected if status[s.name] == "done"])
    for index, step in enumerate(selected):
        # The report's status can only be known now: the evaluations before it have just run.
        if step.soft_deps:
            absent = {d for d in step.deps if not _is_done(plan, d, prints, state)}
            prints[step.name] = fingerprints(canonical, identities, not_run=absent)[step.name]
            status[step.name] = step_status(step, prints[step.name], state)
        if status[step.name] == "done":
            outcome.skipped.append(step.name)
            reporter.skip(index, step)
            continue
        fresh = status[step.name] == "fresh"
        if fresh:
            remove_outputs(step, out)
        command = step.command(fresh=fresh)
        log = out / "logs" / f"{step.name}.log" if step.launcher in ("child", "torchrun") else None
        write_marker(state, step, prints[step.name], "started", command.display())
        reporter.start(index, step, command, log)
        t0 = time.perf_counter()
        run_command(step, command, plan, log)
        if not outputs_complete(step):
            raise LeaderError(f"step {step.name} ended before its outputs were complete (stopped by a signal?); "
                              f"rerun the same `leader reproduce` command to resume it")
        seconds = round(time.perf_counter() - t0, 1)
        write_marker(state, step, prints[step.name], "done", command.display(), seconds=seconds)
        outcome.ran.append(step.name)
        outcome.commands[step.name] = command.display()
        reporter.finish(index, step, seconds)
    outcome.seconds = time.perf_counter() - started
    return outcome


# ---------------------------------------------------------------------------------------------
# Selection and checks


def select(plan: Plan, only: list[str]) -> list[Step]:
    if not only:
        return list(plan.steps)
    entries = set(plan.pipeline.teachers) | set(plan.pipeline.students) | {e.name for e in plan.pipeline.evaluations}
    known = set(STAGES) | set(plan.pipeline.datasets) | entries | set(plan.by_name)
    for name in only:
        if name not in known:
            raise LeaderError(f"--only {name!r} names no stage, dataset, teacher, student, evaluation or step of this "
                              f"pipeline; stages: {', '.join(STAGES)}; datasets: {', '.join(plan.pipeline.datasets)}; "
                              "`--dry-run` lists the steps")
    chosen = set(only)

    def wanted(step: Step) -> bool:
        return bool({step.name, step.stage, step.dataset, step.entry} & chosen)

    selected = [s for s in plan.steps if wanted(s)]
    if not selected:
        raise LeaderError(f"--only {' '.join(only)} selects no step" + (
            f" (not run: {', '.join(plan.not_run)})" if plan.not_run else ""))
    return selected


def step_status(step: Step, fingerprint: str, state: Path) -> str:
    """done (skip it), fresh (other inputs made its outputs: remove them, run anew) or run (resume)."""
    marker = read_marker(state, step)
    if marker is None:
        return "run"
    if marker.get("fingerprint") != fingerprint:
        return "fresh"
    if marker.get("status") == "done" and outputs_complete(step):
        return "done"
    return "run"


def _is_done(plan: Plan, name: str, prints: dict[str, str], state: Path) -> bool:
    return step_status(plan.step(name), prints[name], state) == "done"


def argument_problems(steps: list[Step]) -> list[str]:
    problems = []
    for step in steps:
        if step.launcher == "engine":
            continue
        problem = parse_problem(step.command().argv)
        if problem:
            problems.append(f"step {step.name}: `leader {' '.join(step.argv[:2])}` does not accept its arguments: {problem}")
        elif step.stage == "train":
            problem = config_problem(step.argv)
            if problem:
                problems.append(f"step {step.name}: {problem}")
    return problems


def config_problem(argv: tuple[str, ...]) -> str | None:
    """The trainer's config with its --set overrides, read as `leader train` will read it (a wrong key
    fails now, not after the shards and the cache are built)."""
    from leader.train.config import load_config

    values: dict[str, list[str]] = {}
    for flag, value in zip(argv, argv[1:]):
        if flag in ("--config", "--set", "--shards"):
            values.setdefault(flag, []).append(value)
    config = Path(values["--config"][0])
    if not config.is_file():
        return None                                 # reported with the missing inputs
    try:
        load_config(config, values.get("--set", []), shards=values.get("--shards"))
    except LeaderError as e:
        return str(e)
    return None


def missing_inputs(plan: Plan, selected: list[Step], status: dict[str, str]) -> list[str]:
    """Every outside input that is not there, and every step output the selection needs but lacks."""
    problems: list[str] = []
    chosen = {s.name for s in selected}
    for step in selected:
        for item in step.inputs:
            line = f"{item.what} {item.path} not found"
            if not item.path.exists() and line not in problems:
                problems.append(line)
        if step.soft_deps:
            continue
        for dep in step.deps:
            if dep not in chosen and status[dep] != "done":
                line = f"output of step {dep} (needed by {step.name}; not selected by --only) is not complete with these inputs"
                if line not in problems:
                    problems.append(line)
    return problems


def _listing(title: str, lines: list[str]) -> str:
    return title + ":\n" + "\n".join(f"  - {line}" for line in lines)


def print_plan(plan: Plan, selected: list[Step], status: dict[str, str], problems: list[str],
               echo: Callable[[str], None]) -> None:
    """The commands that would run, one per line; `#` lines say what is done, skipped or missing."""
    echo(f"# leader reproduce: pipeline {plan.pipeline.name} ({plan.pipeline.path}), out {plan.out}, "
         f"{len(selected)} of {len(plan.steps)} steps selected")
    for name, why in plan.not_run.items():
        echo(f"# not run: {name} ({why})")
    for line in problems:
        echo(f"# problem: {line}")
    for step in selected:
        if status[step.name] == "done":
            echo(f"# done: {step.name}")
            continue
        if status[step.name] == "fresh":
            echo(f"# {step.name}: its inputs changed; its old outputs are removed first")
        echo(step.command(fresh=status[step.name] == "fresh").display())


def claim_out_dir(pipeline: Pipeline, out: Path) -> None:
    """An output folder holds one pipeline (and profile): a second would mix two studies' steps."""
    record = out / "state" / PIPELINE_RECORD
    mine = {"name": pipeline.name, "profile": pipeline.profile}
    if record.exists():
        import json

        found = json.loads(record.read_text())
        if {k: found.get(k) for k in mine} != mine:
            raise LeaderError(f"{out} holds pipeline {found.get('name')!r} (profile {found.get('profile')!r}); "
                              f"choose another --out for pipeline {pipeline.name!r} (profile {pipeline.profile!r}) "
                              f"or delete {out}")
        return
    atomic_write_json(record, {**mine, "file": str(pipeline.path)})


def remove_outputs(step: Step, out: Path) -> None:
    """A step starting over with other inputs: its old outputs go (only ever under OUT)."""
    root = out.resolve()
    for path in step.outputs:
        path = Path(path)
        if not path.resolve().is_relative_to(root):
            raise LeaderError(f"step {step.name}: refusing to remove {path}, which is outside {out}")
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# ---------------------------------------------------------------------------------------------
# Running one command


def run_command(step: Step, command: Command, plan: Plan, log: Path | None) -> None:
    if command.launcher == "engine":
        from leader.reproduce.paper_report import write_pipeline_report

        write_pipeline_report(plan)
    elif command.launcher == "inline":
        run_inline(step, command.argv)
    elif command.launcher == "child":
        run_child(step, [sys.executable, "-m", "leader.cli", *command.argv], log)
    elif command.launcher == "torchrun":
        run_child(step, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(command.gpus),
                         "-m", "leader.cli", *command.argv], log)
    else:
        raise ValueError(f"unknown launcher {command.launcher!r}")


def run_inline(step: Step, argv: tuple[str, ...]) -> None:
    """`leader ARGV` through the typer app in this process, as the console script would run it."""
    import typer

    from leader.reproduce.arguments import root_command

    try:
        code = root_command().main(args=list(argv), prog_name="leader", standalone_mode=False)
    except LeaderError as e:
        raise LeaderError(f"step {step.name} failed: {e}") from e
    except typer.TyperException as e:
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        raise LeaderError(f"step {step.name} failed: {message}") from e
    if code not in (None, 0):
        raise LeaderError(f"step {step.name} failed with exit status {code}")


def run_child(step: Step, args: list[str], log: Path) -> None:
    """A child process; its output goes to `log`, and a failure quotes the log's last line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LEADER_PROGRESS": "0", "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")}
    with open(log, "w") as sink:
        code = subprocess.run(args, stdout=sink, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        last = lines[-1] if lines else "no output"
        raise LeaderError(f"step {step.name} failed (exit {code}): {last} (full log: {log})")
