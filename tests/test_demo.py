"""`leader demo --smoke`: every step of the demo pipeline on a tiny phantom, then a resumed rerun.

The demo is configs/demo.pipeline.yaml run by `leader reproduce`'s engine; these tests run it
through the `leader` command line, as a user would.
"""
from __future__ import annotations

import json

import torch  # before tensorflow, always (docs/design.md, section 2)
import pytest
from typer.testing import CliRunner

from leader.cli import app
from leader.demo.pipeline import DEMO_PIPELINE, PROFILES
from leader.reproduce.spec import load_pipeline
from leader.reproduce.steps import plan_steps


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """`leader demo --smoke` as a user runs it, in a process of its own, with every socket to a
    non-loopback address refused and logged (tests/network_guard.py)."""
    import subprocess
    import sys

    from tests.faults.conftest import REPO
    from tests.network_guard import guarded_env

    base = tmp_path_factory.mktemp("demo")
    out, network_log = base / "smoke", base / "network.log"
    network_log.touch()
    result = subprocess.run([sys.executable, "-m", "leader.cli", "demo", "--smoke", "--out", str(out)],
                            env=guarded_env(base, network_log), cwd=REPO, capture_output=True, text=True, timeout=900)
    return out, result


def test_smoke_runs_every_step_and_reports_each_claim(smoke_run):
    out, result = smoke_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"report: {out / 'report.md'}" in result.stdout
    pipeline = load_pipeline(DEMO_PIPELINE, PROFILES["smoke"])
    steps = [s.name for s in plan_steps(pipeline, out).steps]
    markers = {p.stem: json.loads(p.read_text()) for p in (out / "state").glob("*.json")}
    assert sorted(name for name, m in markers.items() if m.get("status") == "done") == sorted(steps)
    report = (out / "report.md").read_text()
    for claim in pipeline.report["claims"]:
        verdict = [line for line in report.splitlines() if claim["name"] in line]
        assert len(verdict) == 1 and ("**PASS**" in verdict[0] or "**FAIL**" in verdict[0]), claim["name"]
    assert "smoke profile" in report
    assert "`disease` (made by `leader demo teacher disease`)" in report


def test_the_demo_never_reaches_for_the_network(smoke_run):
    out, _ = smoke_run
    log = out.parent / "network.log"
    assert log.exists() and log.read_text() == "", f"the demo tried to reach the network: {log.read_text()}"


def test_teachers_are_in_the_real_formats_and_load_through_the_adapters(smoke_run):
    out, _ = smoke_run
    from leader.precompute.cache import TeacherCache

    checkpoint = torch.load(out / "teachers" / "anatomy.pth", weights_only=True)
    assert {"student", "teacher", "epoch"} <= set(checkpoint)
    assert all(k.startswith(("backbone.", "head.")) for k in checkpoint["teacher"])
    assert (out / "teachers" / "disease" / "saved_model.pb").exists()
    cache = TeacherCache.open(out / "shards" / "phantom" / "cache.zarr")
    assert cache.teacher_attrs("disease")["kind"] == "cxr-foundation"
    assert cache.teacher_attrs("anatomy")["kind"] == "adam"
    disease = json.loads((out / "teachers" / "disease.json").read_text())
    assert disease["curve"][-1]["train_loss"] < disease["curve"][0]["train_loss"] * 1.5
    assert "no disease label" in json.loads((out / "teachers" / "anatomy.json").read_text())["learned_from"]
    # TensorFlow ran in processes of their own: the teacher's training and its precompute.
    assert (out / "logs" / "teacher-disease.log").exists() and (out / "logs" / "precompute-disease-phantom.log").exists()


def test_the_student_distils_from_the_phantoms_train_split_in_the_real_cache(smoke_run):
    out, _ = smoke_run
    import yaml
    from leader.precompute.cache import TeacherCache

    cache = TeacherCache.open(out / "shards" / "phantom" / "cache.zarr")
    assert {"disease", "anatomy"} <= set(cache.teachers)
    config = yaml.safe_load((out / "students" / "student" / "config.yaml").read_text())
    assert config["data"]["shards"] == [str(out / "shards" / "phantom")] and config["data"]["splits"] == ["train"]


def test_segmentation_fine_tunes_the_student_and_random_weights_on_the_same_labels(smoke_run):
    out, _ = smoke_run
    student = json.loads((out / "eval" / "segment" / "student" / "metrics.json").read_text())
    random = json.loads((out / "eval" / "segment" / "random" / "metrics.json").read_text())
    run = out / "students" / "student"
    assert student["representation"] == f"run:{run}" and random["representation"] == f"random:run:{run}"
    assert student["encoder"]["loaded"] > 0 and random["encoder"]["weights"] == "random"
    assert student["fraction"] == random["fraction"] == 0.1 and student["target"] == "union"
    assert student["fractions"]["0.1"]["training"][0]["n_train"] == random["fractions"]["0.1"]["training"][0]["n_train"]
    assert "Dice (pooled)" in (out / "report.md").read_text()


def test_rerun_skips_finished_steps_and_redoes_an_unfinished_one(smoke_run):
    out, _ = smoke_run
    (out / "state" / "report.json").unlink()            # as if killed while writing the report
    (out / "report.md").unlink()
    result = CliRunner().invoke(app, ["demo", "--smoke", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.md").exists()
    assert "1 steps run" in result.output.replace("\n", " ")


def test_another_profile_in_the_same_directory_is_refused(smoke_run):
    out, _ = smoke_run
    result = CliRunner().invoke(app, ["demo", "--out", str(out)])
    assert result.exit_code != 0
    assert "holds pipeline 'demo' (profile 'smoke')" in str(result.exception)


def test_a_demo_seed_moves_every_seed_of_the_pipeline_together(tmp_path):
    from leader.demo.pipeline import SEED_STRIDE, demo_pipeline

    base = plan_steps(demo_pipeline("default"), tmp_path).steps
    moved = plan_steps(demo_pipeline("default", seed=2), tmp_path).steps
    assert [s.name for s in base] == [s.name for s in moved]
    changed = set()
    for a, b in zip(base, moved):
        for i, (x, y) in enumerate(zip(a.argv, b.argv)):
            if x == y:
                continue
            # Only seeds differ: `--seed S` of shards, precompute and evaluations, `--set seed=S` of teachers and students.
            if a.argv[i - 1] == "--seed":
                assert int(y) == int(x) + 2 * SEED_STRIDE, (a.name, x, y)
            else:
                assert x.startswith("seed=") and int(y[5:]) == int(x[5:]) + 2 * SEED_STRIDE, (a.name, x, y)
            changed.add(a.stage)
    assert changed == {"shards", "teacher", "precompute", "train", "eval"}
    phantoms = [s.argv[s.argv.index("--seed") + 1] for s in moved if s.stage == "shards"]
    assert phantoms == ["2000"]                              # no other demo seed draws this phantom
    assert demo_pipeline("default", seed=2).name == "demo-seed2"


def test_two_demo_seeds_do_not_share_an_output_folder(smoke_run):
    out, _ = smoke_run
    result = CliRunner().invoke(app, ["demo", "--smoke", "--seed", "1", "--out", str(out)])
    assert result.exit_code != 0
    assert "holds pipeline 'demo' (profile 'smoke')" in str(result.exception) and "'demo-seed1'" in str(result.exception)


def test_a_teacher_trains_to_the_same_bits_whatever_kernels_and_threads_its_caller_runs(smoke_run, tmp_path):
    # The caller here runs PyTorch's plain (non-vectorised) kernels on one thread; unpinned, that
    # changes the weights. The teacher trains in a process of its own on pinned kernels and threads.
    import os
    import subprocess
    import sys

    out, _ = smoke_run
    shards = out / "shards" / "phantom"
    settings = ["--set", "steps=6", "--set", "input_size=32", "--set", "batch_size=16"]
    here = CliRunner().invoke(app, ["demo", "teacher", "anatomy", "--shards", str(shards), "--out", str(tmp_path / "a.pth"), *settings])
    assert here.exit_code == 0, here.output + repr(here.exception)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "ONEDNN_MAX_CPU_ISA": "SSE41"}
    subprocess.run([sys.executable, "-m", "leader.cli", "demo", "teacher", "anatomy", "--shards", str(shards),
                    "--out", str(tmp_path / "b.pth"), *settings], env=env, check=True, capture_output=True)
    a, b = (torch.load(tmp_path / name, weights_only=True)["teacher"] for name in ("a.pth", "b.pth"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["settings"]["threads"] == 2
