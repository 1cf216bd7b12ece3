"""Building shard sets: determinism, patch geometry, the sample format, rejects and resume."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from leader.cli import app
from leader.errors import LeaderError
from leader.shards.builder import BuildSettings, build_shards
from leader.shards.class_sets import select_classes
from leader.shards.manifest import Manifest
from leader.shards.layout import iter_samples
from leader.shards.patches import PatchPlan
from tests.conftest import build_phantom

runner = CliRunner()


def shard_hashes(out: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*.tar"))]


def test_output_is_byte_identical_for_any_worker_count(tmp_path):
    one = build_phantom(tmp_path / "w1", n=20, shard_size=6)
    two = build_shards(BuildSettings(dataset="phantom", size=64, shard_size=6, seed=0, n=20), tmp_path / "w2", workers=2)
    assert shard_hashes(tmp_path / "w1") == shard_hashes(tmp_path / "w2")
    assert (tmp_path / "w1" / "keys.txt").read_text() == (tmp_path / "w2" / "keys.txt").read_text()
    assert one.fingerprint() == two.fingerprint()


def test_samples_carry_labels_boxes_landmarks_and_contiguous_rows(phantom_shards):
    manifest = Manifest.load(phantom_shards)
    samples = list(iter_samples(phantom_shards))
    assert len(samples) == manifest.n_samples == 24
    assert len(manifest.landmark_names) >= 10
    next_row = 0
    for s in samples:
        meta = s.meta
        h, w = meta["size"]
        assert max(h, w) == 64 and s.image().shape == (h, w)
        assert set(meta["labels"]) == set(manifest.label_names)
        assert meta["rows"] == [next_row, next_row + 1 + len(meta["patches"])]
        next_row = meta["rows"][1]
        for box in meta["boxes"]:
            assert 0 <= box["x0"] < box["x1"] <= w and 0 <= box["y0"] < box["y1"] <= h
            assert meta["labels"][box["label"]] == 1
        kinds = [p["kind"] for p in meta["patches"]]
        assert kinds.count("diseased") == len(meta["boxes"])
        if meta["split"] in ("val", "test"):
            assert kinds.count("landmark") == len(meta["landmarks"]) >= 10
        else:
            assert "landmark" not in kinds
        # The phantom calls a case healthy when it drew no finding; only such a case gives healthy patches.
        assert meta["healthy"] == (not any(v == 1 for v in meta["labels"].values()))
        if kinds.count("healthy"):
            assert meta["healthy"] and not meta["boxes"]
    assert next_row == manifest.n_items > manifest.n_samples


def test_patch_boxes_are_squares_inside_the_image(phantom_shards):
    for s in iter_samples(phantom_shards):
        h, w = s.meta["size"]
        for p in s.meta["patches"]:
            x0, y0, x1, y1 = p["box"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, p
            assert abs((x1 - x0) - (y1 - y0)) <= 2e-3, p  # coordinates are rounded to 1/1000 px


def test_diseased_patch_contains_its_lesion(phantom_shards):
    for s in iter_samples(phantom_shards):
        diseased = [p for p in s.meta["patches"] if p["kind"] == "diseased"]
        for box, patch in zip(s.meta["boxes"], diseased):
            x0, y0, x1, y1 = patch["box"]
            cx, cy = (box["x0"] + box["x1"]) / 2, (box["y0"] + box["y1"]) / 2
            assert x0 <= cx <= x1 and y0 <= cy <= y1


def test_splits_never_share_a_patient(phantom_shards):
    split_of = {}
    for s in iter_samples(phantom_shards):
        assert split_of.setdefault(s.meta["patient_id"], s.meta["split"]) == s.meta["split"]


def test_healthy_patches_balance_the_diseased_patches_of_each_split(phantom_shards):
    found: dict[str, Counter] = {}
    for s in iter_samples(phantom_shards):
        c = found.setdefault(s.meta["split"], Counter())
        c.update(p["kind"] for p in s.meta["patches"])
        c["healthy images"] += s.meta["healthy"]
    counts = Manifest.load(phantom_shards).counts
    for split, c in found.items():
        # One healthy patch per diseased patch; with few healthy images, up to 4 from each.
        assert c["healthy"] == min(c["diseased"], 4 * c["healthy images"]) > 0, (split, c)
        reported = counts["by_split"][split]
        assert (reported["diseased_patches"], reported["healthy_patches"], reported["healthy_candidates"]) == (
            c["diseased"], c["healthy"], c["healthy images"])
        assert reported["healthy_shortfall"] == c["diseased"] - c["healthy"]
    assert counts["images"] == 24 and counts["rejected_inputs"] == 0


def test_info_reports_counts_as_json(phantom_shards):
    result = runner.invoke(app, ["shards", "info", str(phantom_shards), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["samples"] == 24 and info["items"] > 24 and info["shards"] == 3
    assert info["patches"] == info["items"] - info["samples"]
    assert sum(info["splits"].values()) == 24 and info["rejects"] == 0
    assert info["diseased_patches"] == info["patch_kinds"]["diseased"] > 0
    assert info["healthy_patches"] + info["healthy_shortfall"] == info["diseased_patches"]


def test_info_on_several_sets_compares_their_counts(phantom_shards, tmp_path):
    build_shards(BuildSettings(dataset="phantom", size=32, shard_size=8, seed=1, n=8, name="phantom-b"), tmp_path / "b")
    result = runner.invoke(app, ["shards", "info", str(phantom_shards), str(tmp_path / "b"), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["dataset"] for r in rows] == ["phantom", "phantom-b"] and rows[1]["samples"] == 8
    table = runner.invoke(app, ["shards", "info", str(phantom_shards), str(tmp_path / "b")])
    assert table.exit_code == 0 and "diseased" in table.output and "phantom-b" in table.output


def test_a_shard_set_without_class_sets_refuses_a_preset(phantom_shards):
    manifest = Manifest.load(phantom_shards)
    assert manifest.class_sets == {} and select_classes(manifest, "all").names == manifest.label_names
    with pytest.raises(LeaderError, match="phantom: no class set or class 'paper'; class sets: all"):
        select_classes(manifest, "paper")


def few_normal_images(root: Path) -> Path:
    """A csv dataset, all in train: three lesion boxes on two images, one image said to be normal."""
    for i in range(4):
        write_png(root / f"{i}.png", i, size=(64, 64))
    import csv

    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", "split", "boxes"])
        writer.writerow(["0.png", "nodule", "train", '[{"label": "nodule", "x0": 5, "y0": 5, "x1": 15, "y1": 15}, '
                                                     '{"label": "nodule", "x0": 30, "y0": 30, "x1": 40, "y1": 40}]'])
        writer.writerow(["1.png", "mass", "train", '[{"label": "mass", "x0": 10, "y0": 10, "x1": 30, "y1": 30}]'])
        writer.writerow(["2.png", "No Finding", "train", ""])
        writer.writerow(["3.png", "", "train", ""])           # nothing listed: not said to be normal
    return root


def test_too_few_healthy_images_give_several_patches_each_then_a_reported_shortfall(tmp_path):
    root = few_normal_images(tmp_path / "data")
    args = ["shards", "build", "csv", "--root", str(root), "--size", "32", "--json"]
    # The default cap (4 per image) covers the 3 patches from the one normal image.
    full = json.loads(runner.invoke(app, args + ["--out", str(tmp_path / "a")]).stdout)
    assert (full["diseased_patches"], full["healthy_patches"], full["healthy_shortfall"]) == (3, 3, 0)
    capped = runner.invoke(app, args + ["--out", str(tmp_path / "b"), "--healthy-max-per-image", "2"])
    summary = json.loads(capped.stdout)
    assert (summary["healthy_patches"], summary["healthy_shortfall"], summary["healthy_candidates"]) == (2, 1, 1)
    assert summary["notes"] == ["csv: 2 healthy patches for 3 diseased, 1 short of the target 3: in train, "
                                "1 healthy image at up to 2 patches each"]
    samples = {s.meta["image_id"]: s.meta for s in iter_samples(tmp_path / "b")}
    assert [p["kind"] for p in samples["2"]["patches"]] == ["healthy", "healthy"] and samples["3"]["patches"] == []
    manifest = Manifest.load(tmp_path / "b")
    assert manifest.build["patch"]["healthy_max_per_image"] == 2 and "up to 2 per image" in manifest.counts["healthy_rule"]


def test_the_healthy_ratio_is_a_build_setting(tmp_path):
    settings = BuildSettings(dataset="phantom", size=32, shard_size=8, seed=0, n=24, patch=PatchPlan(healthy_ratio=0.5))
    manifest = build_shards(settings, tmp_path / "half")
    assert manifest.build["patch"]["healthy_ratio"] == 0.5
    for split, c in manifest.counts["by_split"].items():
        assert c["healthy_target"] == int(0.5 * c["diseased_patches"] + 0.5)
    none = runner.invoke(app, ["shards", "build", "phantom", "--n", "8", "--size", "32", "--healthy-ratio", "0",
                               "--out", str(tmp_path / "none"), "--json"])
    assert json.loads(none.stdout)["healthy_patches"] == 0
    refused = runner.invoke(app, ["shards", "build", "phantom", "--n", "8", "--healthy-ratio", "-1",
                                  "--out", str(tmp_path / "bad")])
    assert refused.exit_code != 0 and "--healthy-ratio must be 0 or more" in str(refused.exception)


def test_phantom_masks_ride_beside_their_images(phantom_shards):
    from leader.shards.masks import decode_masks
    from leader.shards.phantom import MASK_CLASSES

    manifest = Manifest.load(phantom_shards)
    assert manifest.mask_classes == list(MASK_CLASSES)
    counts = manifest.extra["masks"]
    assert counts["samples"] == 24 and counts["annotated"] == {c: 24 for c in MASK_CLASSES}
    assert counts["positive"]["right_lung"] == 24
    for sample in iter_samples(phantom_shards):
        planes = decode_masks(sample.mask_png, manifest.mask_classes)
        assert planes.shape == (len(MASK_CLASSES), *sample.image().shape)
        assert sample.meta["mask"]["classes"] == manifest.mask_classes
        assert sample.meta["mask"]["pixels"] == {c: int(p.sum()) for c, p in zip(MASK_CLASSES, planes)}
        for disease, value in sample.meta["labels"].items():
            assert planes[MASK_CLASSES.index(disease)].any() == (value == 1)
    info = json.loads(runner.invoke(app, ["shards", "info", str(phantom_shards), "--json"]).stdout)
    assert info["mask_classes"] == list(MASK_CLASSES) and info["masks"]["samples"] == 24


def test_shard_sets_built_before_masks_still_load(tmp_path):
    root = tmp_path / "csv"
    for i in range(4):
        write_png(root / "img" / f"{i}.png", i)
    (root / "labels.csv").write_text("path,labels\n" + "".join(f"img/{i}.png,nodule\n" for i in range(4)))
    out = tmp_path / "shards"
    build_shards(BuildSettings(dataset="csv", root=str(root), size=32, seed=0), out)
    # A manifest written before masks existed has no mask_classes at all.
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["mask_classes"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert Manifest.load(out).mask_classes == []
    assert all(s.mask_png is None and "mask" not in s.meta for s in iter_samples(out))


def write_png(path: Path, seed: int, size=(48, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(seed).random(size) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def csv_with_every_kind_of_bad_input(root: Path) -> dict[str, str]:
    """A users' CSV dataset with good rows and one row of each kind of bad input."""
    for i in range(6):
        write_png(root / "img" / f"good{i}.png", i)
    (root / "img" / "truncated.png").write_bytes((root / "img" / "good0.png").read_bytes()[:60])
    (root / "img" / "empty.png").write_bytes(b"")
    (root / "img" / "text.png").write_text("not an image")
    write_png(root.parent / "outside.png", 9)
    rows = [
        ("img/good0.png", "nodule", '[{"label": "nodule", "x0": 5, "y0": 5, "x1": 20, "y1": 20}]'),
        ("img/good1.png", "", ""),
        ("img/good2.png", "effusion", ""),
        ("img/good3.png", "", ""),
        ("img/good4.png", "", ""),
        ("img/good5.png", "nodule", '[{"label": "nodule", "x0": 5, "y0": 5, "x1": 400, "y1": 20}]'),
        ("img/truncated.png", "", ""),
        ("img/empty.png", "", ""),
        ("img/text.png", "", ""),
        ("../outside.png", "", ""),
        ("img/good1.png", "", ""),
    ]
    import csv

    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", "boxes"])
        writer.writerows(rows)
    return {
        "img/good5.png": "outside",
        "img/truncated.png": "unreadable",
        "img/empty.png": "unreadable",
        "img/text.png": "unreadable",
        "../outside.png": "escapes",
        "img/good1.png": "duplicate",
    }


def test_bad_inputs_are_rejected_with_reasons_and_counted(tmp_path):
    root = tmp_path / "data"
    expected = csv_with_every_kind_of_bad_input(root)
    out = tmp_path / "shards"
    args = ["shards", "build", "csv", "--root", str(root), "--out", str(out), "--size", "32", "--json"]
    # Six of eleven rows are bad: far above the 1% default, so the build fails without a manifest.
    failed = runner.invoke(app, args)
    assert failed.exit_code != 0 and not (out / "manifest.json").exists()
    assert "rejected" in str(failed.exception)
    result = runner.invoke(app, args + ["--max-reject-fraction", "0.6"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert summary["samples"] == 5 and summary["rejects"] == len(rejects) == len(expected)
    for path, word in expected.items():
        reasons = [r["reason"] for r in rejects if r["path"] == path]
        assert reasons and word in reasons[0].lower(), (path, reasons)


def test_errors_are_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "leader.cli", "shards", "info", str(tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_killed_build_resumes_to_the_same_shards(tmp_path):
    args = ["shards", "build", "phantom", "--n", "48", "--size", "48", "--shard-size", "4", "--seed", "3"]
    reference = tmp_path / "reference"
    assert runner.invoke(app, args + ["--out", str(reference)]).exit_code == 0

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "leader.cli", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((out / ".build").glob("shard-*.json"))) < 3:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the kill came too late to test a resume"
    assert runner.invoke(app, args + ["--out", str(out)]).exit_code == 0
    assert shard_hashes(out) == shard_hashes(reference)
    assert Manifest.load(out).to_dict() | {"build": None} == Manifest.load(reference).to_dict() | {"build": None}
    assert not (out / ".build").exists()


def test_rebuilding_with_other_settings_is_refused(tmp_path, phantom_shards):
    out = tmp_path / "s"
    build_phantom(out, n=8, shard_size=4)
    result = runner.invoke(app, ["shards", "build", "phantom", "--out", str(out), "--n", "8", "--size", "32"])
    assert result.exit_code != 0 and "other settings" in str(result.exception)


def test_a_second_build_of_one_adapter_takes_its_own_name(tmp_path):
    # Two in-house csv datasets, or a second phantom as extra unlabelled images, are two datasets
    # to the trainer only if their manifests name them apart.
    one = build_shards(BuildSettings(dataset="phantom", size=32, shard_size=4, seed=0, n=4), tmp_path / "a")
    two = build_shards(BuildSettings(dataset="phantom", size=32, shard_size=4, seed=1, n=4, name="phantom-extra"),
                       tmp_path / "b")
    assert (one.dataset, two.dataset) == ("phantom", "phantom-extra")
    assert Manifest.load(tmp_path / "b").build["name"] == "phantom-extra"
    again = build_shards(BuildSettings(dataset="phantom", size=32, shard_size=4, seed=1, n=4, name="phantom-extra"),
                         tmp_path / "b")
    assert again.dataset == "phantom-extra"                 # a rerun finds the finished set
    result = runner.invoke(app, ["shards", "build", "phantom", "--out", str(tmp_path / "c"), "--n", "4",
                                 "--name", "my data"])
    assert result.exit_code != 0 and "--name 'my data': use letters, digits" in str(result.exception)
