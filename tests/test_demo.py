"""`leader demo --smoke`: every step of the pipeline on a tiny phantom, then a resumed rerun."""
from __future__ import annotations

import json

import torch  # before tensorflow, always (docs/design.md, section 2)
import pytest
import typer
from typer.testing import CliRunner

from leader.demo.commands import demo
from leader.demo.pipeline import CLAIMS, PROFILES, build_steps, DemoPaths


def demo_app() -> typer.Typer:
    app = typer.Typer()
    app.command("demo")(demo)
    app.command("noop")(lambda: None)   # two commands, so `demo` stays a named subcommand as in `leader`
    return app


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "smoke"
    result = CliRunner().invoke(demo_app(), ["demo", "--smoke", "--out", str(out)])
    return out, result


def test_smoke_runs_every_step_and_reports_each_claim(smoke_run):
    out, result = smoke_run
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert f"report: {out / 'report.md'}" in result.output
    steps = [s.name for s in build_steps(PROFILES["smoke"], DemoPaths(out))]
    assert sorted(p.stem for p in (out / "state").glob("*.json")) == sorted(steps)
    report = (out / "report.md").read_text()
    for claim in CLAIMS:
        verdict = [line for line in report.splitlines() if claim["name"] in line]
        assert len(verdict) == 1 and ("**PASS**" in verdict[0] or "**FAIL**" in verdict[0]), claim["name"]
    assert "smoke profile" in report


def test_teachers_are_in_the_real_formats_and_load_through_the_adapters(smoke_run):
    out, _ = smoke_run
    from leader.precompute.cache import TeacherCache

    checkpoint = torch.load(out / "teachers" / "anatomy.pth", weights_only=True)
    assert {"student", "teacher", "epoch"} <= set(checkpoint)
    assert all(k.startswith(("backbone.", "head.")) for k in checkpoint["teacher"])
    assert (out / "teachers" / "disease" / "saved_model.pb").exists()
    cache = TeacherCache.open(out / "shards" / "cache.zarr")
    assert cache.teacher_attrs("disease")["kind"] == "cxr-foundation"
    assert cache.teacher_attrs("anatomy")["kind"] == "adam"
    disease = json.loads((out / "teachers" / "disease.json").read_text())
    assert disease["curve"][-1]["train_loss"] < disease["curve"][0]["train_loss"] * 1.5
    assert "no disease label" in json.loads((out / "teachers" / "anatomy.json").read_text())["learned_from"]


def test_the_student_also_distils_from_the_extra_images_and_is_evaluated_on_the_first_set(smoke_run):
    out, _ = smoke_run
    import yaml
    from leader.precompute.cache import TeacherCache
    from leader.shards.manifest import Manifest

    extra = Manifest.load(out / "shards-extra")
    assert extra.dataset == "phantom-extra" and set(extra.splits) == {"train"}
    assert extra.n_samples >= PROFILES["smoke"].extra_images - 1          # a phantom image may be rejected
    cache = TeacherCache.open(out / "shards-extra" / "cache.zarr")
    assert {"disease", "anatomy"} <= set(cache.teachers)
    config = yaml.safe_load((out / "student" / "config.yaml").read_text())
    assert config["data"]["shards"] == [str(out / "shards"), str(out / "shards-extra")]
    probe = next((out / "eval" / "linear-probe" / "student").rglob("*.json"))
    assert str(out / "shards-extra") not in probe.read_text()


def test_rerun_skips_finished_steps_and_redoes_an_unfinished_one(smoke_run):
    out, _ = smoke_run
    (out / "state" / "report.json").unlink()            # as if killed while writing the report
    (out / "report.md").unlink()
    result = CliRunner().invoke(demo_app(), ["demo", "--smoke", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.md").exists()
    assert "1 steps run" in result.output.replace("\n", " ")


def test_another_profile_in_the_same_directory_is_refused(smoke_run):
    out, _ = smoke_run
    result = CliRunner().invoke(demo_app(), ["demo", "--out", str(out)])
    assert result.exit_code != 0
    assert "other settings" in str(result.exception)
