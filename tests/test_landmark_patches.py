"""Landmark patches for the anatomy test: centred on the landmark, or moved and scaled by a seeded
amount when the plan asks for a harder test."""
import numpy as np

from leader.shards.patches import PatchPlan, landmark_patches

LANDMARKS = {"carina": [64.0, 50.0], "cardiac_apex": [80.0, 90.0]}


def centre_and_side(box):
    x0, y0, x1, y1 = box
    return ((x0 + x1) / 2, (y0 + y1) / 2), x1 - x0


def test_by_default_a_patch_is_centred_on_its_landmark():
    patches = landmark_patches(LANDMARKS, 128, 128, PatchPlan())
    for patch, (name, (x, y)) in zip(patches, LANDMARKS.items()):
        (cx, cy), side = centre_and_side(patch["box"])
        assert patch["label"] == name and (cx, cy) == (x, y) and side == 28.0     # 224/1024 of 128 px


def test_jitter_moves_and_scales_within_bounds_and_is_seeded():
    plan = PatchPlan(landmark_jitter=0.25, landmark_scale=(0.7, 1.4))
    first = landmark_patches(LANDMARKS, 128, 128, plan, "phantom/a", seed=0)
    assert first == landmark_patches(LANDMARKS, 128, 128, plan, "phantom/a", seed=0)
    assert first != landmark_patches(LANDMARKS, 128, 128, plan, "phantom/b", seed=0)
    assert first != landmark_patches(LANDMARKS, 128, 128, plan, "phantom/a", seed=1)
    moved = []
    for key in (f"phantom/{i}" for i in range(200)):
        for patch, (x, y) in zip(landmark_patches(LANDMARKS, 128, 128, plan, key), LANDMARKS.values()):
            (cx, cy), side = centre_and_side(patch["box"])
            assert 0.7 * 28 - 1e-6 <= side <= 1.4 * 28 + 1e-6
            assert abs(cx - x) <= 0.25 * side + 1e-3 and abs(cy - y) <= 0.25 * side + 1e-3
            moved.append(max(abs(cx - x), abs(cy - y)) / side)
    assert np.mean(moved) > 0.1                                          # most patches really move


def test_shards_build_takes_the_jitter_and_scale_from_the_command_line(tmp_path):
    from typer.testing import CliRunner

    from leader.cli import app
    from leader.shards.layout import iter_samples
    from leader.shards.manifest import Manifest

    out = tmp_path / "jittered"
    args = ["shards", "build", "phantom", "--out", str(out), "--n", "6", "--size", "64", "--shard-size", "6",
            "--landmark-splits", "train,val,test"]
    result = CliRunner().invoke(app, args + ["--landmark-jitter", "0.25", "--landmark-scale", "0.7,1.4"])
    assert result.exit_code == 0, result.output
    assert Manifest.load(out).build["patch"]["landmark_jitter"] == 0.25
    assert Manifest.load(out).build["patch"]["landmark_scale"] == [0.7, 1.4]
    sides = [p["box"][2] - p["box"][0] for s in iter_samples(out) for p in s.meta["patches"] if p["kind"] == "landmark"]
    assert len(sides) >= 10 and min(sides) < 14.0 < max(sides)        # 224/1024 of 64 px is 14 px
    for bad, words in ((["--landmark-scale", "1.4"], "LOW,HIGH"), (["--landmark-scale", "1.4,0.7"], "LOW <= HIGH"),
                       (["--landmark-jitter", "0.9"], "--landmark-jitter")):
        result = CliRunner().invoke(app, args[:4] + [str(tmp_path / "bad")] + args[5:] + bad)
        assert result.exit_code != 0 and words in str(result.exception), bad
