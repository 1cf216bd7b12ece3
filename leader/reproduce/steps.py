"""A pipeline expanded into steps: each one `leader ...` argument list, with what it reads and writes.

    plan = plan_steps(pipeline, Path("runs/paper"), gpus=0)
    for step in plan.steps:
        print(step.name, step.command(gpus=0).display())

The steps, in the order they run (each after every step it reads from):

    shards-DATASET                      leader shards build ADAPTER --root ROOT --out OUT/shards/DATASET ...
    teacher-NAME          (make only)   leader <make command> --out OUT/teachers/OUTPUT [--shards ...]
    precompute-TEACHER-DATASET          leader precompute --teacher TEACHER --shards OUT/shards/DATASET ...
    train-STUDENT                       leader train --config C --out OUT/students/STUDENT --shards ... [--resume]
    eval-EVALUATION-LABEL               leader eval PROTOCOL --shards OUT/shards/DATASET --repr R --out OUT/eval/EVALUATION/LABEL ...
    report                              leader reproduce PIPELINE --out OUT --only report

A teacher is precomputed over every dataset a student distils from and every dataset an
evaluation reads it on (`teacher:NAME`, alone or inside `concat:`/`average:`). Representations
name students by their pipeline name (`student`, `student:disease` for a head); they become
`run:OUT/students/NAME[:HEAD]`. `average:A+B` becomes `--repr A --repr B --ensemble average`; any
other representation (`teacher:`, `concat:`, `run:PATH`, `timm:ARCH[:CKPT]`, kinds added later)
is passed to `--repr` as written, so a new protocol or representation needs no change here.

Flags that change only how a step runs, not what it makes (`--device`, `--workers`,
`--decode-threads`), are kept apart (`run_flags`) so that moving to a GPU reruns nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from leader.errors import LeaderError
from leader.reproduce.spec import Evaluation, Pipeline, Representation, flag_value, option_value, split_group

STAGES = ("shards", "teacher", "precompute", "train", "eval", "report")
# Flags that do not change a step's result (the shard builder's output is identical for any
# --workers; the device and decode threads change speed, not what is computed).
EXECUTION_FLAGS = {"workers", "device", "decode_threads"}
LAUNCHERS = ("inline", "child", "torchrun", "engine")


@dataclass(frozen=True)
class Input:
    """A file or folder from outside OUT that a step reads."""

    kind: str                       # "dataset" (a root), "weights" (file or folder), "config" (file), "run" (folder)
    path: Path
    what: str                       # for the missing-input list: "dataset nih14: root"


@dataclass(frozen=True)
class Command:
    """Exactly what runs: the launcher and the argument list after `leader`."""

    launcher: str
    argv: tuple[str, ...]
    gpus: int = 0

    def display(self) -> str:
        import shlex

        prefix = ["torchrun", "--nproc_per_node", str(self.gpus), "-m", "leader.cli"] if self.launcher == "torchrun" else ["leader"]
        return shlex.join(prefix + list(self.argv))


@dataclass(frozen=True)
class Step:
    name: str
    stage: str
    dataset: str | None             # the dataset it works on (for --only DATASET)
    argv: tuple[str, ...]           # what defines its result (fingerprinted)
    deps: tuple[str, ...]           # the steps whose outputs it reads
    inputs: tuple[Input, ...] = ()  # what it reads from outside OUT
    outputs: tuple[Path, ...] = ()  # removed when it must start over with other inputs
    done_when: tuple = ()           # ("file", path) | ("cache", store, teacher) | ("run", folder)
    launcher: str = "inline"        # inline | child (TensorFlow) | torchrun (multi-GPU) | engine (the report)
    run_flags: tuple[str, ...] = () # how it runs (not fingerprinted)
    resume: tuple | None = None     # (path, flag): add flag when path exists (train --resume)
    identity: dict = field(default_factory=dict)   # more of what its result depends on (the report's layout)
    soft_deps: bool = False         # runs even when deps have not (the report marks their cells "not run")
    gpus: int = 0
    entry: str | None = None        # the pipeline entry it comes from: teacher, student or evaluation name

    def command(self, fresh: bool = False) -> Command:
        """What runs now; `fresh`: its old outputs are (or will be) removed first, so nothing resumes."""
        argv = list(self.argv) + list(self.run_flags)
        if not fresh and self.resume is not None and Path(self.resume[0]).exists():
            argv.append(self.resume[1])
        return Command(self.launcher, tuple(argv), self.gpus)


@dataclass
class Plan:
    pipeline: Pipeline
    out: Path
    steps: list[Step]
    not_run: dict[str, str]         # steps left out and why (a dataset skipped with --skip-missing)

    def step(self, name: str) -> Step:
        return self.by_name[name]

    @property
    def by_name(self) -> dict[str, Step]:
        return {s.name: s for s in self.steps}


@dataclass(frozen=True)
class Layout:
    """Where each step writes, under OUT."""

    out: Path

    def shards(self, dataset: str) -> Path:
        return self.out / "shards" / dataset

    def cache(self, dataset: str) -> Path:
        return self.shards(dataset) / "cache.zarr"

    def teacher(self, output: str) -> Path:
        return self.out / "teachers" / output

    def student(self, name: str) -> Path:
        return self.out / "students" / name

    def evaluation(self, evaluation: str, label: str) -> Path:
        return self.out / "eval" / evaluation / label

    @property
    def report(self) -> Path:
        return self.out / "report.md"

    @property
    def state(self) -> Path:
        return self.out / "state"

    @property
    def logs(self) -> Path:
        return self.out / "logs"


def flags(options: dict) -> list[str]:
    """{fraction: [0.05, 0.1], seeds: 3, augment: false, set: {epochs: 2}}
    -> --fraction 0.05,0.1 --seeds 3 --no-augment --set epochs=2 (a mapping: one key=value flag each)."""
    out: list[str] = []
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        if value is None:
            continue
        if isinstance(value, dict):
            out += option_flags(value, flag)
        elif value is True:
            out.append(flag)
        elif value is False:
            out.append("--no-" + flag[2:])
        else:
            out += [flag, flag_value(value)]
    return out


def option_flags(options: dict, flag: str = "--option") -> list[str]:
    out: list[str] = []
    for key, value in options.items():
        out += [flag, f"{key}={option_value(value)}"]
    return out


def split_execution(options: dict) -> tuple[dict, dict]:
    """(flags that define the result, flags that only say how to run)."""
    return ({k: v for k, v in options.items() if k not in EXECUTION_FLAGS},
            {k: v for k, v in options.items() if k in EXECUTION_FLAGS})


def plan_steps(pipeline: Pipeline, out: str | Path, gpus: int = 0, skip_datasets: dict[str, str] | None = None) -> Plan:
    """Every step of the pipeline in run order. skip_datasets: {dataset: why}; their steps, and
    the evaluations and students that need them, are left out and listed in `not_run`."""
    layout = Layout(Path(out))
    skip = dict(skip_datasets or {})
    not_run: dict[str, str] = {}
    steps: list[Step] = []

    for d in pipeline.datasets.values():
        if d.name in skip:
            not_run[f"shards-{d.name}"] = skip[d.name]
            continue
        steps.append(_shards_step(d, layout))

    made = {}
    for t in pipeline.teachers.values():
        if t.make is None:
            continue
        if t.make.dataset in skip:
            raise LeaderError(f"teacher {t.name!r} is made from dataset {t.make.dataset!r}, which is missing "
                              f"({skip[t.make.dataset]}); every step needs the teachers")
        made[t.name] = _make_step(t, layout, gpus)
        steps.append(made[t.name])

    students = {}
    for s in pipeline.students.values():
        kept = tuple(d for d in s.datasets if d not in skip)
        if not kept:
            not_run[f"train-{s.name}"] = "every dataset it distils from is missing"
            continue
        students[s.name] = kept

    evaluations = []
    for e in pipeline.evaluations:
        for rep in e.representations:
            reason = skip.get(e.dataset) or _needs_dropped_student(rep, pipeline, students)
            if reason:
                not_run[f"eval-{e.name}-{rep.label}"] = reason
            else:
                evaluations.append((e, rep))

    # Teachers over every dataset a student distils from, and every dataset an evaluation reads them on.
    needed: dict[str, list[str]] = {t: [] for t in pipeline.teachers}
    for datasets in students.values():
        for t in needed:
            needed[t] += datasets
    for e, rep in evaluations:
        for t in teachers_read(rep.text, pipeline):
            needed[t].append(e.dataset)
    for t in pipeline.teachers.values():
        for d in pipeline.datasets:
            if d in needed[t.name]:
                steps.append(_precompute_step(t, d, layout, gpus, made.get(t.name)))

    for name, datasets in students.items():
        steps.append(_train_step(pipeline.students[name], datasets, pipeline, layout, gpus))

    for e, rep in evaluations:
        steps.append(_eval_step(e, rep, pipeline, layout, gpus))

    if pipeline.evaluations:
        steps.append(_report_step(pipeline, layout, [s.name for s in steps if s.stage == "eval"], not_run))
    _check_order(steps)
    return Plan(pipeline, layout.out, steps, not_run)


# ---------------------------------------------------------------------------------------------
# One function per stage


def _shards_step(d, layout: Layout) -> Step:
    out = layout.shards(d.name)
    build, run = split_execution({k: v for k, v in d.build.items() if k != "options"})
    argv = ["shards", "build", d.adapter, "--out", str(out)]
    if d.root is not None:
        argv += ["--root", str(d.root)]
    if d.name != d.adapter:
        argv += ["--name", d.name]
    argv += flags(build) + option_flags(d.build.get("options") or {})
    inputs = (Input("dataset", d.root, f"dataset {d.name}: root"),) if d.root is not None else ()
    return Step(f"shards-{d.name}", "shards", d.name, tuple(argv), (), inputs, (out,), ("file", out / "manifest.json"),
                run_flags=tuple(flags(run)))


def _make_step(t, layout: Layout, gpus: int) -> Step:
    make = t.make
    out = layout.teacher(make.output)
    argv = [*make.command, "--out", str(out)]
    deps = ()
    if make.dataset is not None:
        argv += ["--shards", str(layout.shards(make.dataset))]
        deps = (f"shards-{make.dataset}",)
    argv += flags(make.options)
    return Step(f"teacher-{t.name}", "teacher", make.dataset, tuple(argv), deps, (), (out,), ("file", out),
                launcher="child" if make.own_process else "inline", entry=t.name)


def _precompute_step(t, dataset: str, layout: Layout, gpus: int, made: Step | None) -> Step:
    model = layout.teacher(t.make.output) if t.make is not None else t.model
    settings, run = split_execution(t.precompute)
    if gpus >= 1:
        run = {**run, "device": "cuda"}
    argv = ["precompute", "--teacher", t.name, "--shards", str(layout.shards(dataset)), "--kind", t.kind,
            "--model", str(model), *option_flags(t.options), *flags(settings),
            # The engine decides when inputs changed (by fingerprint); a teacher cached from other
            # weights or settings is then replaced, and one from the same is resumed.
            "--overwrite-teacher"]
    deps = (f"shards-{dataset}",) + ((made.name,) if made is not None else ())
    inputs = (Input("weights", t.model, f"teacher {t.name}: model"),) if t.make is None else ()
    launcher = "torchrun" if gpus > 1 else "child" if t.own_process else "inline"
    return Step(f"precompute-{t.name}-{dataset}", "precompute", dataset, tuple(argv), deps, inputs, (),
                ("cache", layout.cache(dataset), t.name), launcher, tuple(flags(run)), gpus=gpus, entry=t.name)


def _train_step(s, datasets: tuple[str, ...], pipeline: Pipeline, layout: Layout, gpus: int) -> Step:
    out = layout.student(s.name)
    argv = ["train", "--config", str(s.config), "--out", str(out)]
    for d in datasets:
        argv += ["--shards", str(layout.shards(d))]
    for item in s.overrides:
        argv += ["--set", item]
    deps = tuple(f"shards-{d}" for d in datasets) + tuple(f"precompute-{t}-{d}" for t in pipeline.teachers for d in datasets)
    return Step(f"train-{s.name}", "train", None, tuple(argv), deps, (Input("config", s.config, f"student {s.name}: config"),),
                (out,), ("run", out), "torchrun" if gpus > 1 else "inline", resume=(out / "checkpoint.pt", "--resume"),
                gpus=gpus, entry=s.name)


def _eval_step(e: Evaluation, rep: Representation, pipeline: Pipeline, layout: Layout, gpus: int) -> Step:
    out = layout.evaluation(e.name, rep.label)
    kind, members = split_group(rep.text)
    resolved = [resolve_representation(m, pipeline, layout) for m in members]
    if kind == "average":
        reprs = [r for r, _, _ in resolved]
        extra = ["--ensemble", "average"]
    else:
        reprs = [(kind + ":" + "+".join(r for r, _, _ in resolved)) if kind else resolved[0][0]]
        extra = []
    argv = ["eval", e.protocol, "--shards", str(layout.shards(e.dataset)), "--out", str(out)]
    for r in reprs:
        argv += ["--repr", r]
    argv += extra
    settings, run = split_execution(e.options)
    argv += flags(settings)
    if gpus >= 1 and _accepts(["eval", e.protocol], "--device"):
        run = {**run, "device": "cuda"}
    deps = [f"shards-{e.dataset}"]
    inputs = []
    for _, needs, reads in resolved:
        deps += [n if n.startswith("train-") else f"precompute-{n}-{e.dataset}" for n in needs]
        inputs += reads
    return Step(f"eval-{e.name}-{rep.label}", "eval", e.dataset, tuple(argv), tuple(dict.fromkeys(deps)), tuple(inputs),
                (out,), ("file", out / "metrics.json"), run_flags=tuple(flags(run)), gpus=gpus, entry=e.name)


def _report_step(pipeline: Pipeline, layout: Layout, evaluations: list[str], not_run: dict[str, str]) -> Step:
    argv = ["reproduce", str(pipeline.path), "--out", str(layout.out)]
    if pipeline.profile:
        argv += ["--profile", pipeline.profile]
    argv += ["--only", "report"]
    identity = {"report": pipeline.report, "title": pipeline.title,
                "evaluations": [[e.name, e.protocol, e.dataset, [r.label for r in e.representations]]
                                for e in pipeline.evaluations],
                "not_run": sorted(k for k in not_run if k.startswith("eval-"))}
    return Step("report", "report", None, tuple(argv), tuple(evaluations), (), (), ("file", layout.report),
                launcher="engine", identity=identity, soft_deps=True)


# ---------------------------------------------------------------------------------------------
# Representations


def resolve_representation(text: str, pipeline: Pipeline, layout: Layout) -> tuple[str, list[str], list[Input]]:
    """One (non-group) representation -> (its --repr spelling, the teachers or train steps it
    needs, the outside files it reads)."""
    kind, sep, rest = text.partition(":")
    if kind in pipeline.students:
        return f"run:{layout.student(kind)}" + (f":{rest}" if sep else ""), [f"train-{kind}"], []
    if kind == "concat":
        parts = [resolve_representation(p, pipeline, layout) for p in rest.split("+")]
        return ("concat:" + "+".join(p[0] for p in parts), [n for p in parts for n in p[1]],
                [i for p in parts for i in p[2]])
    if kind == "teacher":
        if rest not in pipeline.teachers:
            raise LeaderError(f"{pipeline.path}: representation {text!r} names no teacher of this pipeline "
                              f"({', '.join(pipeline.teachers) or 'none'})")
        return text, [rest], []
    if kind == "run":
        return text, [], [Input("run", Path(rest), f"representation {text}: run folder")]
    if kind == "timm":
        arch, colon, checkpoint = rest.partition(":")
        if colon and checkpoint:
            return text, [], [Input("weights", Path(checkpoint), f"representation {text}: checkpoint")]
    return text, [], []


def teachers_read(text: str, pipeline: Pipeline) -> list[str]:
    """The pipeline teachers a representation reads from the cache."""
    kind, members = split_group(text)
    found = []
    for member in members:
        head, _, rest = member.partition(":")
        if head == "teacher" and rest in pipeline.teachers:
            found.append(rest)
        elif head == "concat":
            found += teachers_read(member, pipeline)
    return found


def _needs_dropped_student(rep: Representation, pipeline: Pipeline, students: dict) -> str | None:
    for member in split_group(rep.text)[1]:
        for part in (member.partition(":")[2].split("+") if member.startswith("concat:") else [member]):
            name = part.partition(":")[0]
            if name in pipeline.students and name not in students:
                return f"student {name} is not trained (every dataset it distils from is missing)"
    return None


def _accepts(command: list[str], option: str) -> bool:
    """Whether `leader COMMAND` has `option` (protocols differ: a GPU flag goes only where it is understood)."""
    from leader.reproduce.arguments import find_command

    found = find_command(command)
    return found is not None and any(option in p.opts or option in p.secondary_opts for p in found.params)


def _check_order(steps: list[Step]) -> None:
    seen: set[str] = set()
    for step in steps:
        for dep in step.deps:
            if dep not in seen:
                raise LeaderError(f"pipeline: step {step.name} reads {dep}, which does not run before it")
        seen.add(step.name)
