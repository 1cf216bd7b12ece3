"""`leader reproduce`: a pipeline file run as resumable `leader` steps.

The bench is a small study: phantom shards, two tiny timm teachers saved as real checkpoint files,
a demo student for 4 + 4 steps, probes and the anatomy evaluation, and a report with a table.
A second dataset (`nih14`) has a root that does not exist, so `--skip-missing` leaves it out and the
report marks its cells "not run".
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch  # before anything that may import tensorflow
import pytest
import yaml

from leader.errors import LeaderError
from leader.reproduce.runner import reproduce
from leader.reproduce.spec import load_pipeline
from leader.reproduce.steps import plan_steps

REPO = Path(__file__).resolve().parents[1]
STUDENT_SET = {"phases.0.steps": 4, "phases.1.steps": 4, "data.batch_size": 4, "model.image_size": 32,
               "run.tensorboard": False, "run.checkpoint_every": 2}


def save_teacher(path: Path, arch: str, seed: int) -> Path:
    import timm

    torch.manual_seed(seed)
    torch.save(timm.create_model(arch, num_classes=0).state_dict(), path)
    return path


def write_study(folder: Path, **changes) -> Path:
    """The bench's pipeline file and teacher weights in `folder`; returns the pipeline file."""
    folder.mkdir(parents=True, exist_ok=True)
    save_teacher(folder / "disease.pt", "test_resnet", seed=1)
    save_teacher(folder / "anatomy.pt", "test_convnext", seed=2)
    teacher = {"precompute": {"views": 2, "patch_size": 32, "batch_size": 64}}
    pipeline = {
        "name": "bench",
        "datasets": {
            "phantom": {"build": {"n": 40, "size": 32, "shard_size": 10, "seed": 0}},
            "nih14": {"root": "no-such-folder/nih14", "pretrain": False},
        },
        "teachers": {
            "disease": {"kind": "timm", "model": "disease.pt", "options": {"arch": "test_resnet", "input_size": 32}, **teacher},
            "anatomy": {"kind": "timm", "model": "anatomy.pt", "options": {"arch": "test_convnext", "input_size": 32}, **teacher},
        },
        "students": {"student": {"config": str(REPO / "configs" / "demo.yaml"), "set": STUDENT_SET, "datasets": ["phantom"]}},
        "evaluations": [
            {"name": "probe", "protocol": "linear-probe", "dataset": "phantom", "options": {"n_boot": 20},
             "representations": ["student", "teacher:disease", "concat:teacher:disease+teacher:anatomy"]},
            {"name": "landmarks", "protocol": "anatomy", "dataset": "phantom", "options": {"folds": 3},
             "representations": ["student", "teacher:anatomy"]},
            {"name": "probe-nih", "protocol": "linear-probe", "dataset": "nih14", "options": {"n_boot": 20},
             "representations": ["teacher:disease"]},
        ],
        "report": {
            "claims": [{"name": "the anatomy teacher separates landmarks", "evaluation": "landmarks",
                        "protocol": "anatomy", "subject": "teacher:anatomy", "value": 0.2}],
            "tables": [{"title": "Table 1: probes", "rows": ["student", "teacher-disease"],
                        "columns": [{"evaluation": "probe", "title": "phantom AUC"},
                                    {"evaluation": "probe-nih", "title": "NIH AUC"}]}],
            "figures": [{"title": "Fig. 3: landmark t-SNE", "evaluation": "landmarks", "figure": "tsne"}],
        },
    }
    for key, value in changes.items():
        pipeline[key] = value
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny convolutions on a shared 2-core machine run many times faster on one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli_env() -> dict[str, str]:
    """One thread, so that two runs of the same steps give the same numbers; quiet progress."""
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath, "LEADER_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


def leader(*args) -> list[str]:
    return [sys.executable, "-m", "leader.cli", *map(str, args)]


def announced_steps(output: str) -> list[str]:
    """The steps the command announced, in order ("3/11 precompute-anatomy-phantom: leader ...")."""
    return re.findall(r"^\d+/\d+ (\S+): (?!done earlier)", output, flags=re.M)


def markers(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "state").glob("*.json")
            if p.stem not in ("pipeline", "input-hashes")}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The study run once from the command line (one thread), after its dry run."""
    folder = tmp_path_factory.mktemp("study")
    pipeline = write_study(folder)
    out = folder / "out"
    dry = subprocess.run(leader("reproduce", pipeline, "--out", out, "--skip-missing", "--dry-run"),
                         env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert not out.exists(), "a dry run writes nothing"
    run = subprocess.run(leader("reproduce", pipeline, "--out", out, "--skip-missing"),
                         env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return {"pipeline": pipeline, "out": out, "dry": dry.stdout, "run": run.stdout + run.stderr, "folder": folder}


def test_steps_run_in_dependency_order_and_a_rerun_skips_every_one(bench):
    plan = plan_steps(load_pipeline(bench["pipeline"]), bench["out"], skip_datasets={"nih14": "absent"})
    names = [s.name for s in plan.steps]
    assert names == ["shards-phantom", "precompute-disease-phantom", "precompute-anatomy-phantom", "train-student",
                     "eval-probe-student", "eval-probe-teacher-disease",
                     "eval-probe-concat-teacher-disease+teacher-anatomy",
                     "eval-landmarks-student", "eval-landmarks-teacher-anatomy", "report"]
    for step in plan.steps:                              # every step after what it reads
        assert all(names.index(d) < names.index(step.name) for d in step.deps)
    assert announced_steps(bench["run"]) == names
    assert {k: v["status"] for k, v in markers(bench["out"]).items()} == dict.fromkeys(names, "done")

    again = reproduce(bench["pipeline"], bench["out"], skip_missing=True)
    assert again.ran == [] and again.skipped == names


def test_the_dry_run_prints_exactly_the_commands_that_ran(bench):
    printed = [line for line in bench["dry"].splitlines() if line and not line.startswith("#")]
    ran = markers(bench["out"])
    order = [s.name for s in plan_steps(load_pipeline(bench["pipeline"]), bench["out"],
                                         skip_datasets={"nih14": "absent"}).steps]
    assert printed == [ran[name]["command"] for name in order]
    assert printed[0].startswith("leader shards build phantom --out ")
    assert "# not run: shards-nih14 (root " in bench["dry"]


def test_the_report_fills_the_table_and_marks_what_did_not_run(bench):
    report = (bench["out"] / "report.md").read_text()
    assert "## Table 1: probes" in report
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in report.splitlines() if line.startswith("| `")}
    metrics = json.loads((bench["out"] / "eval" / "probe" / "student" / "metrics.json").read_text())
    assert rows["`student`"][0].startswith(f"{metrics['auc_mean']:.3f} [")
    assert rows["`student`"][1] == "-"                    # not one of that evaluation's representations
    assert rows["`teacher-disease`"][1] == "not run"      # its dataset's root is missing
    assert "- `eval-probe-nih-teacher-disease`: root " in report
    assert "**PASS** the anatomy teacher separates landmarks" in report
    assert "](eval/landmarks/teacher-anatomy/tsne_landmarks.png)" in report
    assert "## Evaluations on phantom" in report


def test_a_new_teacher_weight_file_reruns_exactly_the_steps_downstream_of_it(tmp_path):
    pipeline = write_study(tmp_path)
    out = tmp_path / "out"
    first = reproduce(pipeline, out, skip_missing=True)
    assert first.skipped == []
    save_teacher(tmp_path / "anatomy.pt", "test_convnext", seed=7)          # a new release of the anatomy teacher
    second = reproduce(pipeline, out, skip_missing=True)
    assert second.ran == ["precompute-anatomy-phantom", "train-student", "eval-probe-student",
                          "eval-probe-concat-teacher-disease+teacher-anatomy", "eval-landmarks-student",
                          "eval-landmarks-teacher-anatomy", "report"]
    assert second.skipped == ["shards-phantom", "precompute-disease-phantom", "eval-probe-teacher-disease"]
    from leader.io import sha256_file
    from leader.precompute.cache import TeacherCache

    cache = TeacherCache.open(out / "shards" / "phantom" / "cache.zarr")
    assert cache.teacher_attrs("anatomy")["fingerprint"] == sha256_file(tmp_path / "anatomy.pt")


def test_a_kill_in_the_middle_then_a_rerun_gives_the_same_report(bench, tmp_path):
    shutil.copy(bench["folder"] / "disease.pt", tmp_path / "disease.pt")
    shutil.copy(bench["folder"] / "anatomy.pt", tmp_path / "anatomy.pt")
    pipeline = tmp_path / "bench.yaml"
    shutil.copy(bench["pipeline"], pipeline)
    out = tmp_path / "out"
    proc = subprocess.Popen(leader("reproduce", pipeline, "--out", out, "--skip-missing"), env=cli_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = out / "state" / "precompute-anatomy-phantom.json"
    deadline = time.monotonic() + 120
    while not (marker.exists() and json.loads(marker.read_text())["status"] == "done"):
        assert proc.poll() is None, "the run ended before the kill"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "report.md").exists()
    done = {k for k, v in markers(out).items() if v["status"] == "done"}
    assert "train-student" not in done

    rerun = subprocess.run(leader("reproduce", pipeline, "--out", out, "--skip-missing"), env=cli_env(), cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert set(announced_steps(rerun.stdout + rerun.stderr)).isdisjoint(done)
    expected = (bench["out"] / "report.md").read_text().replace(str(bench["folder"]), "STUDY")
    assert (out / "report.md").read_text().replace(str(tmp_path), "STUDY") == expected


def test_every_missing_input_is_listed_before_anything_runs(tmp_path):
    pipeline = write_study(tmp_path, students={"student": {"config": "no-such.yaml"}})
    (tmp_path / "anatomy.pt").unlink()
    out = tmp_path / "out"
    with pytest.raises(LeaderError) as caught:
        reproduce(pipeline, out)
    message = str(caught.value)
    assert "nothing was run" in message
    for path in (tmp_path / "no-such-folder" / "nih14", tmp_path / "anatomy.pt", tmp_path / "no-such.yaml"):
        assert f"{path} not found" in message
    assert len(message.splitlines()) == 1 + 3
    assert not out.exists()


def test_only_runs_exactly_the_named_steps_and_needs_their_inputs(tmp_path):
    pipeline = write_study(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(LeaderError, match=r"output of step precompute-anatomy-phantom \(needed by train-student"):
        reproduce(pipeline, out, only=["train"], skip_missing=True)
    assert reproduce(pipeline, out, only=["shards", "precompute-disease-phantom"], skip_missing=True).ran == \
        ["shards-phantom", "precompute-disease-phantom"]
    lines = []
    reproduce(pipeline, out, only=["phantom"], skip_missing=True, dry_run=True, echo=lines.append)
    assert "# done: shards-phantom" in lines and "# done: precompute-disease-phantom" in lines
    assert [line.split()[1] for line in lines if not line.startswith("#")] == ["precompute"] + ["eval"] * 5
    with pytest.raises(LeaderError, match="--only 'chexpert' names no stage"):
        reproduce(pipeline, out, only=["chexpert"], skip_missing=True)


def test_gpus_launch_precompute_and_train_under_torchrun(tmp_path):
    lines = []
    reproduce(write_study(tmp_path), tmp_path / "out", gpus=2, skip_missing=True, dry_run=True, echo=lines.append)
    commands = [line for line in lines if not line.startswith("#")]
    by_stage = {c.split(" -m leader.cli ")[-1].split()[0] if c.startswith("torchrun") else c.split()[1]: c for c in commands}
    assert by_stage["precompute"].startswith("torchrun --nproc_per_node 2 -m leader.cli precompute ")
    assert by_stage["precompute"].endswith("--overwrite-teacher --device cuda")
    assert by_stage["train"].startswith("torchrun --nproc_per_node 2 -m leader.cli train ")
    assert by_stage["eval"].startswith("leader eval ") and by_stage["eval"].endswith("--device cuda")
    assert by_stage["shards"].startswith("leader shards build ") and "cuda" not in by_stage["shards"]


def test_a_tensorflow_teacher_precomputes_in_its_own_process(tmp_path):
    pipeline = write_study(tmp_path, teachers={
        "disease": {"kind": "cxr-foundation", "model": "disease.pt"},
        "anatomy": {"kind": "adam", "model": "anatomy.pt"}})
    plan = plan_steps(load_pipeline(pipeline), tmp_path / "out", skip_datasets={"nih14": "absent"})
    launchers = {s.name: s.launcher for s in plan.steps if s.stage == "precompute"}
    assert launchers == {"precompute-disease-phantom": "child", "precompute-anatomy-phantom": "inline"}


def test_a_misspelt_option_fails_before_anything_runs_naming_the_step(tmp_path):
    evaluations = [{"name": "probe", "protocol": "linear-probe", "dataset": "phantom", "options": {"n_bot": 20},
                    "representations": ["teacher:disease"]}]
    pipeline = write_study(tmp_path, evaluations=evaluations, report={})
    with pytest.raises(LeaderError, match=r"step eval-probe-teacher-disease: .*No such option: --n-bot"):
        reproduce(pipeline, tmp_path / "out", skip_missing=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, words", [
    ({"evaluations": [{"name": "x", "protocol": "retrieval", "dataset": "chexpert", "representations": ["student"]}]},
     ["evaluations[0].dataset", "'chexpert' is not in datasets"]),
    ({"teachers": {"disease": {"kind": "timm"}}}, ["teachers.disease", "exactly one of model"]),
    ({"students": {"student": {"config": "c.yaml", "lr": 1}}}, ["students.student", "unknown key 'lr'"]),
    ({"report": {"tables": [{"columns": [{"evaluation": "nope"}]}]}}, ["report.tables[0].columns[0]", "'nope'"]),
])
def test_a_wrong_pipeline_file_is_one_error_naming_the_key(tmp_path, change, words):
    with pytest.raises(LeaderError) as caught:
        load_pipeline(write_study(tmp_path, **change))
    assert len(str(caught.value).splitlines()) == 1
    for word in words:
        assert word in str(caught.value)


def test_a_profile_is_merged_over_the_file_and_owns_its_output_folder(tmp_path):
    pipeline = write_study(tmp_path, profiles={"quick": {"datasets": {"phantom": {"build": {"n": 30}}}}})
    quick = load_pipeline(pipeline, profile="quick")
    assert quick.datasets["phantom"].build == {"n": 30, "size": 32, "shard_size": 10, "seed": 0}
    out = tmp_path / "out"
    reproduce(pipeline, out, profile="quick", only=["shards"], skip_missing=True)
    with pytest.raises(LeaderError, match="holds pipeline 'bench' \\(profile 'quick'\\)"):
        reproduce(pipeline, out, only=["shards"], skip_missing=True)


def test_a_wrong_student_setting_fails_before_anything_runs(tmp_path):
    pipeline = write_study(tmp_path, students={"student": {"config": str(REPO / "configs" / "demo.yaml"),
                                                           "set": {"optim.learning_rate": 0.1}}})
    with pytest.raises(LeaderError, match=r"step train-student: --set optim.learning_rate: unknown key 'learning_rate'"):
        reproduce(pipeline, tmp_path / "out", skip_missing=True)
    assert not (tmp_path / "out").exists()


def test_the_output_folder_may_be_spelt_another_way(bench, monkeypatch):
    monkeypatch.chdir(bench["folder"])
    again = reproduce(bench["pipeline"], Path("out"), skip_missing=True)
    assert again.ran == [] and "report" in again.skipped


def test_the_paper_pipeline_plans_every_step_of_the_study(tmp_path):
    lines = []
    outcome = reproduce(REPO / "configs" / "paper.yaml", tmp_path / "paper", dry_run=True, echo=lines.append)
    plan = outcome.plan
    assert set(plan.pipeline.datasets) >= {"nih14", "chexpert", "mimic-cxr", "padchest", "rsna", "shenzhen", "vindr",
                                           "chestx-det", "node21", "tbx11k"}
    train = plan.step("train-leader")
    assert train.argv[train.argv.index("--config") + 1] == str(REPO / "configs" / "leader-swinb.yaml")
    assert [a for a in train.argv if "/shards/" in a] == [str(tmp_path / "paper" / "shards" / d) for d in
                                                          ["nih14", "chexpert", "mimic-cxr", "padchest", "rsna", "shenzhen",
                                                           "vindr", "chestx-det", "node21", "tbx11k"]]
    assert "phases.1.datasets=[\"vindr\", \"chestx-det\", \"node21\", \"tbx11k\"]" in train.argv
    assert len([line for line in lines if not line.startswith("#")]) == len(plan.steps)
    assert any(line.startswith("# problem: dataset nih14: root /data/nih14 not found") for line in lines)
    smoke = reproduce(REPO / "configs" / "paper.yaml", tmp_path / "smoke", profile="smoke", dry_run=True, echo=lambda _: None)
    assert "--n" in smoke.plan.step("shards-vindr").argv
