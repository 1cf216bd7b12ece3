"""`leader demo`: the whole system on the phantom, as an ordered list of resumable steps.

    result = run_demo("runs/demo", profile="default")
    print(result.report)

The steps, in order: phantom shards -> the two demo teachers -> `leader precompute` for each ->
`leader train` (both phases of Algorithm 1; with `full`, also a disease-only and an anatomy-only
student) -> every evaluation on the student, each teacher and their concatenation -> `leader
report` with the paper's claims marked PASS or FAIL. Each step calls the library function its
public command calls, with the arguments a user would type.

Resuming: a step writes `state/<step>.json` after its outputs are complete, and a rerun skips the
steps that have one. Steps that run TensorFlow (the disease teacher's training and its precompute)
run in a child process, `python -m leader.demo.pipeline run-step NAME --out DIR`, because
TensorFlow and torch do not share a process safely (DESIGN.md); the child reports progress as JSON
lines on stdout, and its log goes to `logs/<step>.log`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from leader.demo.teachers import AnatomyTeacherSettings, DiseaseTeacherSettings
from leader.evaluate.protocols import FEATURES, WEIGHTS, Protocol, get_protocol, protocols
from leader.errors import LeaderError
from leader.io import atomic_write_json, atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_RECORD = "demo.json"
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class DemoProfile:
    """Every size of the demo. `default` is tuned to finish in under 10 minutes on two CPU cores (8 min measured)."""

    name: str = "default"
    # phantom shards
    n_images: int = 1000
    image_size: int = 128                       # generated and stored at this side (no resize)
    shard_size: int = 250
    split_fractions: tuple = (0.7, 0.1, 0.2)    # train, val, test (per patient)
    landmark_splits: tuple = ("test",)          # landmark patches feed only the anatomy evaluation
    workers: int = 2
    # Images only the student distils from: a second phantom, built as its own dataset from seed + 1
    # (other people; the patient ids P000000... repeat, but nothing joins the two sets by patient).
    # The paper's student learns from the images of every dataset while its teachers were trained
    # elsewhere; labels here go unused, and every evaluation runs on the first set.
    extra_images: int = 2000
    extra_name: str = "phantom-extra"
    # teachers and cache
    disease: DiseaseTeacherSettings = field(default_factory=DiseaseTeacherSettings)
    anatomy: AnatomyTeacherSettings = field(default_factory=AnatomyTeacherSettings)
    views: int = 2                              # cached views per item (view 0 is the identity)
    patch_size: int = 64                        # patches are cut at this side before their views
    # student (this config plus these --set overrides)
    student_config: str = "configs/demo-student.yaml"
    student_overrides: tuple = ()
    ablations: bool = False                     # --full: single-branch students and the averaging ensemble
    # evaluation
    n_boot: int = 200
    retrieval_k: int = 20
    retrieval_queries: int = 300
    finetune_epochs: int = 3
    seed: int = 0

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=list).encode()).hexdigest()

    def protocol_options(self, protocol: str) -> dict:
        """The demo's sizes for each evaluation protocol (the rest are the protocols' defaults)."""
        return {
            "linear-probe": {"n_boot": self.n_boot},
            "linear-probe-lesion": {"n_boot": self.n_boot},
            "retrieval": {"k": self.retrieval_k, "n_queries": self.retrieval_queries, "seed": self.seed},
            "anatomy": {"seed": self.seed},
            "finetune": {"epochs": self.finetune_epochs, "patience": self.finetune_epochs, "n_boot": self.n_boot},
        }.get(protocol, {})


DEFAULT = DemoProfile(anatomy=AnatomyTeacherSettings(input_size=48, steps=300, batch_size=48))

PROFILES: dict[str, DemoProfile] = {
    "smoke": replace(
        DEFAULT, name="smoke", n_images=90, image_size=96, shard_size=45, split_fractions=(0.6, 0.2, 0.2), extra_images=30,
        disease=DiseaseTeacherSettings(input_size=64, widths=(8, 16, 32, 32), epochs=2, train_views=1),
        anatomy=AnatomyTeacherSettings(input_size=32, steps=15, batch_size=16),
        patch_size=32, views=2,
        student_overrides=("phases.0.steps=6", "phases.1.steps=6", "model.image_size=32", "model.kwargs.channels=[8,16,32,64]",
                           "run.tensorboard=false"),
        n_boot=20, retrieval_k=5, retrieval_queries=20, finetune_epochs=1),
    "default": DEFAULT,
    "full": replace(DEFAULT, name="full", ablations=True),
}

# The paper's claims in miniature (DESIGN.md section 6), as `leader report --claims` reads them.
# Subjects and references are shell patterns over representation names (run dirs end in these names).
CLAIMS: list[dict] = [
    {"name": "anatomy: the student separates landmarks far better than the disease teacher",
     "protocol": "anatomy", "metric": "knn_accuracy", "subject": "run:*/student", "reference": "teacher:disease", "plus": 0.10},
    {"name": "anatomy: the student keeps at least 85% of the anatomy teacher's landmark accuracy",
     "protocol": "anatomy", "metric": "knn_accuracy", "subject": "run:*/student", "reference": "teacher:anatomy", "times": 0.85},
    {"name": "disease: the student classifies disease far better than the anatomy teacher",
     "protocol": "linear-probe", "metric": "auc_mean", "subject": "run:*/student", "reference": "teacher:anatomy", "plus": 0.05},
    {"name": "disease: the student is within 0.03 AUC of the disease teacher (or above it)",
     "protocol": "linear-probe", "metric": "auc_mean", "subject": "run:*/student", "reference": "teacher:disease", "plus": -0.03},
    {"name": "retrieval: the student retrieves disease at least as well as the anatomy teacher",
     "protocol": "retrieval", "subject": "run:*/student", "reference": "teacher:anatomy"},
]
ABLATION_CLAIMS: list[dict] = [
    {"name": "ablation: both branches beat the disease-only student on anatomy",
     "protocol": "anatomy", "metric": "knn_accuracy", "subject": "run:*/student", "reference": "run:*/student-disease-only", "plus": 0.01},
    {"name": "ablation: both branches beat the anatomy-only student on disease",
     "protocol": "linear-probe", "metric": "auc_mean", "subject": "run:*/student", "reference": "run:*/student-anatomy-only", "plus": 0.01},
]


# ---------------------------------------------------------------------------------------------
# Steps


@dataclass
class Step:
    name: str
    title: str
    run: Callable[[ProgressFn], None]
    isolated: bool = False                      # needs TensorFlow: run in a child process


@dataclass
class DemoPaths:
    out: Path

    @property
    def shards(self) -> Path:
        return self.out / "shards"

    @property
    def extra_shards(self) -> Path:
        return self.out / "shards-extra"

    @property
    def disease_teacher(self) -> Path:
        return self.out / "teachers" / "disease"

    @property
    def anatomy_teacher(self) -> Path:
        return self.out / "teachers" / "anatomy.pth"

    def run(self, name: str) -> Path:
        return self.out / name

    @property
    def eval(self) -> Path:
        return self.out / "eval"

    @property
    def report(self) -> Path:
        return self.out / "report.md"

    @property
    def claims(self) -> Path:
        return self.out / "claims.yaml"

    def marker(self, step: str) -> Path:
        return self.out / "state" / f"{step}.json"

    def log(self, step: str) -> Path:
        return self.out / "logs" / f"{step}.log"




def build_steps(profile: DemoProfile, paths: DemoPaths) -> list[Step]:
    """The demo as a list of named steps; names are stable, so markers survive a rerun."""
    students = ["student"] + (["student-disease-only", "student-anatomy-only"] if profile.ablations else [])
    student_branches = {"student": None, "student-disease-only": "disease", "student-anatomy-only": "anatomy"}
    steps = [
        Step("shards", "phantom shards", lambda p: build_phantom_shards(profile, paths, p)),
    ]
    if profile.extra_images:
        steps.append(Step("shards-extra", f"phantom shards for distillation only ({profile.extra_name})",
                          lambda p: build_extra_shards(profile, paths, p)))
    steps += [
        Step("teacher-disease", "disease teacher (Keras -> CXR Foundation SavedModel)",
             lambda p: train_disease(profile, paths, p), isolated=True),
        Step("teacher-anatomy", "anatomy teacher (timm -> Adam-v2 checkpoint)", lambda p: train_anatomy(profile, paths, p)),
        Step("precompute-disease", "precompute disease teacher", lambda p: precompute_teacher(profile, paths, "disease", p),
             isolated=True),
        Step("precompute-anatomy", "precompute anatomy teacher", lambda p: precompute_teacher(profile, paths, "anatomy", p)),
    ]
    for name in students:
        steps.append(Step(f"train-{name}", f"train {name}",
                          lambda p, n=name: train_student(profile, paths, n, student_branches[n])))
    # Short labels name the steps and the evaluation folders, whatever --out is.
    representations = {name: [f"run:{paths.run(name)}"] for name in students[:1]}
    representations.update({"teacher-disease": ["teacher:disease"], "teacher-anatomy": ["teacher:anatomy"],
                            "concat": ["concat:teacher:disease+teacher:anatomy"]})
    representations.update({name: [f"run:{paths.run(name)}"] for name in students[1:]})
    for label, reps in representations.items():
        for protocol in protocols(FEATURES):
            steps.append(Step(f"eval-{protocol.name}-{label}", f"{protocol.name} {reps[0]}",
                              lambda p, pr=protocol, r=reps, lb=label: evaluate(profile, paths, pr, r, lb)))
    if profile.ablations:
        steps.append(Step("eval-linear-probe-average", "linear-probe average of the teachers",
                          lambda p: evaluate(profile, paths, get_protocol("linear-probe"),
                                             ["teacher:disease", "teacher:anatomy"], "average", ensemble="average")))
    for protocol in protocols(WEIGHTS):
        steps.append(Step(f"eval-{protocol.name}-student", f"{protocol.name} student",
                          lambda p, pr=protocol: evaluate(profile, paths, pr, representations["student"], "student")))
    steps.append(Step("report", "report", lambda p: write_demo_report(profile, paths)))
    return steps


def build_phantom_shards(profile: DemoProfile, paths: DemoPaths, on_progress: ProgressFn) -> None:
    train, val, test = profile.split_fractions
    _build_phantom(profile, paths.shards, None, profile.seed, profile.n_images, tuple(profile.landmark_splits),
                   {"train": train, "val": val, "test": test}, on_progress)


def build_extra_shards(profile: DemoProfile, paths: DemoPaths, on_progress: ProgressFn) -> None:
    """`leader shards build phantom --name phantom-extra --seed SEED+1 --option split_fractions={train: 1}`."""
    _build_phantom(profile, paths.extra_shards, profile.extra_name, profile.seed + 1, profile.extra_images, (),
                   {"train": 1.0, "val": 0.0, "test": 0.0}, on_progress)


def _build_phantom(profile: DemoProfile, out: Path, name: str | None, seed: int, n: int, landmark_splits: tuple,
                   split_fractions: dict, on_progress: ProgressFn) -> None:
    from leader.shards.builder import BuildSettings, build_shards
    from leader.shards.patches import PatchPlan

    settings = BuildSettings(
        dataset="phantom", name=name, size=profile.image_size, shard_size=profile.shard_size, seed=seed, n=n,
        patch=PatchPlan(landmark_splits=landmark_splits),
        options={"size": profile.image_size, "split_fractions": split_fractions})
    build_shards(settings, out, workers=profile.workers, on_progress=lambda done, shards: on_progress(done, n))


def student_shards(profile: DemoProfile, paths: DemoPaths) -> list[Path]:
    """The shard sets the teachers are precomputed over and the student distils from."""
    return [paths.shards] + ([paths.extra_shards] if profile.extra_images else [])


def train_disease(profile: DemoProfile, paths: DemoPaths, on_progress: ProgressFn) -> None:
    from leader.demo.teachers import settings_hash, teacher_is_current, train_disease_teacher

    if not teacher_is_current(paths.disease_teacher, settings_hash(profile.disease, paths.shards)):
        train_disease_teacher(paths.shards, paths.disease_teacher, profile.disease, on_progress)


def train_anatomy(profile: DemoProfile, paths: DemoPaths, on_progress: ProgressFn) -> None:
    from leader.demo.teachers import settings_hash, teacher_is_current, train_anatomy_teacher

    if not teacher_is_current(paths.anatomy_teacher, settings_hash(profile.anatomy, paths.shards)):
        train_anatomy_teacher(paths.shards, paths.anatomy_teacher, profile.anatomy, on_progress)


def precompute_teacher(profile: DemoProfile, paths: DemoPaths, role: str, on_progress: ProgressFn) -> None:
    """`leader precompute --teacher ROLE --shards S --model M --views V --patch-size P [--option ...]`, for
    each shard set the student distils from, with the teacher loaded once."""
    from leader.precompute.run import precompute, resolve_teacher
    from leader.precompute.teachers import create_teacher
    from leader.shards.manifest import Manifest

    if role == "disease":
        model, options = paths.disease_teacher, {}
    else:
        model, options = paths.anatomy_teacher, {"arch": profile.anatomy.arch, "input_size": profile.anatomy.input_size}
    choice = resolve_teacher(role, model=str(model), options=options)
    teacher = create_teacher(choice.kind, model=choice.model, **choice.options)
    sets = student_shards(profile, paths)
    totals = [Manifest.load(s).n_items for s in sets]
    try:
        for i, shards in enumerate(sets):
            before = sum(totals[:i])
            result = precompute(shards, teacher_name=role, teacher=teacher, views=profile.views, batch_size=64,
                                seed=profile.seed, patch_size=profile.patch_size, overwrite_teacher=True,
                                on_progress=lambda done, total, b=before: on_progress(b + done, sum(totals)))
            if not result.complete:
                raise LeaderError(f"precompute of teacher {role!r} over {shards} stopped before the end; "
                                  "rerun `leader demo` to resume")
    finally:
        teacher.close()


def train_student(profile: DemoProfile, paths: DemoPaths, name: str, only_branch: str | None) -> None:
    """`leader train --config configs/demo-student.yaml --shards S --out RUN --set ...` (resumes a started run)."""
    from leader.train.checkpoint import CHECKPOINT_NAME
    from leader.train.config import load_config
    from leader.train.loop import train

    overrides = list(profile.student_overrides) + [f"seed={profile.seed}"]
    if only_branch is not None:
        # The ablation keeps Algorithm 1's data and schedule and drops the other teacher's head.
        overrides += [f"phases.0.branches=[{only_branch}]", f"phases.1.branches=[{only_branch}]"]
    config = Path(profile.student_config)
    cfg = load_config(config if config.is_absolute() else REPO_ROOT / config, overrides,
                      shards=[str(s) for s in student_shards(profile, paths)])
    run = paths.run(name)
    summary = train(cfg, run, resume=(run / CHECKPOINT_NAME).exists())
    if summary.get("stopped"):
        raise LeaderError(f"training of {name} was stopped; rerun `leader demo` to resume it")


def evaluate(profile: DemoProfile, paths: DemoPaths, protocol: Protocol, reps: list[str], label: str,
             **options) -> None:
    """`leader eval COMMAND --shards S --repr R [--repr R2 --ensemble average] --out OUT/eval/PROTOCOL/LABEL`."""
    protocol(paths.shards, reps, paths.eval / protocol.name / label,
             **profile.protocol_options(protocol.name), **options)


def write_demo_report(profile: DemoProfile, paths: DemoPaths) -> None:
    """`leader report OUT/eval --claims OUT/claims.yaml --out OUT/report.md`, plus the teachers' records."""
    import yaml

    from leader.demo.teachers import record_path
    from leader.evaluate.report import check_claims, write_report

    claims = CLAIMS + (ABLATION_CLAIMS if profile.ablations else [])
    atomic_write_text(paths.claims, yaml.safe_dump(claims, sort_keys=False))
    write_report([paths.eval], paths.report, check_claims(claims))
    text = paths.report.read_text()
    notes = [f"\n## The demo ({profile.name} profile)\n"]
    if profile.name == "smoke":
        notes.append("This is the smoke profile: every step runs at a tiny size, so its claims may FAIL; "
                     "the default profile is the one sized to test them.\n")
    for teacher in (paths.disease_teacher, paths.anatomy_teacher):
        record = json.loads(record_path(teacher).read_text())
        numbers = ", ".join(f"{k} {record[k]:.3f}" for k in ("final_train_loss", "val_auc", "val_landmark_accuracy",
                                                               "val_offset_error") if k in record)
        notes.append(f"- {record['teacher']} teacher: {record['format']}; learned from {record['learned_from']}; "
                     f"{numbers}; {record['seconds']} s.")
    atomic_write_text(paths.report, text + "\n".join(notes) + "\n")


# ---------------------------------------------------------------------------------------------
# Running: markers, child processes, resume


@dataclass
class DemoResult:
    out: Path
    report: Path
    ran: list[str]
    skipped: list[str]
    seconds: float
    verdicts: list = field(default_factory=list)


def check_demo_record(profile: DemoProfile, paths: DemoPaths) -> None:
    """A demo directory belongs to one profile; a rerun with other settings would mix two demos."""
    record = paths.out / DEMO_RECORD
    if record.exists():
        found = json.loads(record.read_text())
        if found.get("fingerprint") != profile.fingerprint():
            raise LeaderError(f"{paths.out} holds a demo run with other settings (profile {found.get('profile')!r}); "
                              f"choose another --out or delete {paths.out}")
        return
    paths.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, {"profile": profile.name, "fingerprint": profile.fingerprint(), "settings": asdict(profile)})


def run_in_child(step: Step, profile: DemoProfile, paths: DemoPaths, on_progress: ProgressFn) -> None:
    """Run one step in `python -m leader.demo.pipeline run-step`, following its progress lines."""
    log = paths.log(step.name)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LEADER_PROGRESS": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, "-m", "leader.demo.pipeline", "run-step", step.name, "--out", str(paths.out),
               "--profile", profile.name]
    with open(log, "w") as stderr:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        try:
            for line in child.stdout:
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "done" in message:
                    on_progress(message["done"], message["total"])
            code = child.wait()
        except BaseException:
            child.terminate()
            child.wait()
            raise
    if code != 0:
        lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
        last = lines[-1] if lines else "no output"
        raise LeaderError(f"demo step {step.name!r} failed (exit {code}): {last} (full log: {log})")


def run_demo(out: str | Path, profile: str | DemoProfile = "default",
             on_step: Callable[[int, int, Step, bool], None] | None = None,
             on_progress: ProgressFn | None = None) -> DemoResult:
    """Run (or resume) the demo in `out`. on_step(index, total, step, skipped) announces each step."""
    profile = PROFILES[profile] if isinstance(profile, str) else profile
    paths = DemoPaths(Path(out))
    check_demo_record(profile, paths)
    steps = build_steps(profile, paths)
    started = time.perf_counter()
    ran, skipped = [], []
    for index, step in enumerate(steps):
        marker = paths.marker(step.name)
        done = marker.exists()
        if on_step is not None:
            on_step(index, len(steps), step, done)
        if done:
            skipped.append(step.name)
            continue
        progress = on_progress or (lambda done_, total: None)
        t0 = time.perf_counter()
        if step.isolated:
            run_in_child(step, profile, paths, progress)
        else:
            step.run(progress)
        atomic_write_json(marker, {"step": step.name, "seconds": round(time.perf_counter() - t0, 1),
                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        ran.append(step.name)
    return DemoResult(paths.out, paths.report, ran, skipped, time.perf_counter() - started)


def step_seconds(out: str | Path) -> dict[str, float]:
    """How long each finished step took, from its marker."""
    state = Path(out) / "state"
    return {p.stem: json.loads(p.read_text())["seconds"] for p in sorted(state.glob("*.json"))} if state.exists() else {}


def main(argv: list[str] | None = None) -> None:
    """`python -m leader.demo.pipeline run-step NAME --out DIR --profile P`: one step, in this process."""
    parser = argparse.ArgumentParser(prog="python -m leader.demo.pipeline")
    parser.add_argument("command", choices=("run-step",))
    parser.add_argument("step")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--profile", default="default", choices=sorted(PROFILES))
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    steps = {s.name: s for s in build_steps(profile, DemoPaths(args.out))}
    if args.step not in steps:
        print(f"error: unknown demo step {args.step!r}; steps: {', '.join(steps)}", file=sys.stderr)
        sys.exit(2)
    try:
        steps[args.step].run(lambda done, total: print(json.dumps({"done": done, "total": total}), flush=True))
    except LeaderError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
