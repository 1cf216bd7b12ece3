"""NIH ChestX-ray14 in its Kaggle layout: images_00N/images/*.png, Data_Entry_2017*.csv,
BBox_List_2017.csv (with its odd header), and the official split lists."""
from __future__ import annotations

import pytest

from typer.testing import CliRunner

from leader.cli import app
from leader.errors import LeaderError
from leader.shards.class_sets import select_classes
from leader.shards.datasets import create_dataset
from leader.shards.layout import iter_samples
from leader.shards.records import RejectLog, sample_key

from .fixtures_dicom import build_with_cli, corrupt, phantom, reasons, write_png

ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n"
)
# image, findings, patient, view, folder, in which list
IMAGES = [
    ("00000001_000.png", "Cardiomegaly|Effusion", "00000001", "PA", "images_001", "train_val"),
    ("00000001_001.png", "No Finding", "00000001", "AP", "images_001", "train_val"),
    ("00000002_000.png", "Infiltration", "00000002", "PA", "images_001", "test"),
    ("00000003_000.png", "Nodule|Mass", "00000003", "PA", "images_002", "train_val"),
    ("00000004_000.png", "No Finding", "00000004", "PA", "images_002", "test"),
    ("00000005_000.png", "Hernia", "00000005", "PA", None, "train_val"),  # file missing
    ("00000006_000.png", "Pneumonia", "00000006", "PA", "images_002", "train_val"),  # truncated
    ("00000007_000.png", "Covid", "00000007", "PA", "images_002", "train_val"),  # unknown finding
    ("00000008_000.png", "Edema", "00000008", "PA", "images_002", None),  # in no split list
]
# Boxes are given on the released 1024 x 1024 images; the fixture's files are 64 px copies.
BBOX = (
    "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
    "00000001_000.png,Cardiomegaly,168,320,480,404,,,\n"
    "00000002_000.png,Infiltrate,80,96,320,352,,,\n"
    "00000003_000.png,Nodule,640,128,160,192,,,\n"
    "00000003_000.png,Mass,abc,128,160,192,,,\n"
    "99999999_000.png,Nodule,16,16,80,80,,,\n"
)


def write_nih(root, images=IMAGES, bbox=BBOX, shape=(64, 64)):
    lines = [ENTRY_HEADER]
    lists = {"train_val": [], "test": []}
    for i, (name, findings, patient, view, folder, split) in enumerate(images):
        lines.append(f"{name},{findings},0,{patient},58,M,{view},2500,2048,0.143,0.143\n")
        if folder:
            write_png(root / folder / "images" / name, phantom(*shape, seed=i))
        if split:
            lists[split].append(name)
    (root / "Data_Entry_2017_v2020.csv").write_text("".join(lines))
    if bbox:
        (root / "BBox_List_2017.csv").write_text(bbox)
    (root / "train_val_list.txt").write_text("\n".join(lists["train_val"]) + "\n")
    (root / "test_list.txt").write_text("\n".join(lists["test"]) + "\n")
    if images is IMAGES:
        corrupt(root / "images_002" / "images" / "00000006_000.png", keep=0.4)
    return root


def test_records_labels_boxes_splits_and_rejects(tmp_path):
    root = write_nih(tmp_path / "nih")
    rejects = RejectLog()
    records = {r.image_id: r for r in create_dataset("nih14").records(root, rejects, seed=0, n=None)}

    assert sorted(records) == ["00000001_000.png", "00000001_001.png", "00000002_000.png",
                               "00000003_000.png", "00000004_000.png", "00000006_000.png"]
    first = records["00000001_000.png"]
    assert first.path == "images_001/images/00000001_000.png"
    assert first.patient_id == "00000001" and first.view == "PA"
    # Every NIH finding is read on every image: absent means negative, not unknown.
    assert first.labels["cardiomegaly"] == 1 and first.labels["effusion"] == 1
    assert first.labels["hernia"] == 0 and first.labels["no_finding"] == 0
    assert set(first.labels) == set(create_dataset("nih14").label_names)
    assert first.source_labels == {"Finding Labels": "Cardiomegaly|Effusion"}
    assert [(b.label, b.as_list()) for b in first.boxes] == [("cardiomegaly", [168.0, 320.0, 648.0, 724.0])]
    assert first.frame == (1024, 1024)
    assert records["00000001_001.png"].labels["no_finding"] == 1
    assert [b.label for b in records["00000002_000.png"].boxes] == ["infiltration"]
    assert [b.label for b in records["00000003_000.png"].boxes] == ["nodule"]

    assert records["00000002_000.png"].split == "test" and records["00000004_000.png"].split == "test"
    assert records["00000001_000.png"].split == records["00000001_001.png"].split in ("train", "val")

    bad = reasons(rejects)
    assert bad["images/00000005_000.png"] == "image file not found under --root"
    assert "unknown finding: ['Covid']" in bad["images_002/images/00000007_000.png"]
    assert "not in the official split" in bad["images_002/images/00000008_000.png"]
    assert bad["BBox_List_2017.csv:5"].startswith("unparseable box: [x, y, w, h] = ['abc'")
    assert bad["BBox_List_2017.csv:6"].startswith("box on an unknown image")
    assert len(rejects) == 5

    # The truncated PNG is only found when loaded (the builder's worker turns this into a reject).
    with pytest.raises(Exception, match="truncated"):
        records["00000006_000.png"].load()
    assert records["00000003_000.png"].load().shape == (64, 64)


def test_validation_is_carved_patient_wise_from_train_val(tmp_path):
    images = [(f"{p:08d}_{k:03d}.png", "No Finding", f"{p:08d}", "PA", "images", "train_val" if p < 80 else "test")
              for p in range(100) for k in range(2)]
    root = tmp_path / "nih"
    lines = [ENTRY_HEADER] + [f"{name},{f},0,{pt},40,F,{v},8,8,1,1\n" for name, f, pt, v, _, _ in images]
    (root / "images").mkdir(parents=True)
    for name, *_ in images:
        (root / "images" / name).touch()  # records() only needs the files to exist
    (root / "Data_Entry_2017.csv").write_text("".join(lines))
    (root / "train_val_list.txt").write_text("\n".join(i[0] for i in images if i[5] == "train_val"))
    (root / "test_list.txt").write_text("\n".join(i[0] for i in images if i[5] == "test"))

    records = list(create_dataset("nih14").records(root, RejectLog(), seed=3, n=None))
    split_of_patient = {}
    for r in records:
        assert split_of_patient.setdefault(r.patient_id, r.split) == r.split  # no patient leaks
    official_test = {f"{p:08d}" for p in range(80, 100)}
    assert {p for p, s in split_of_patient.items() if s == "test"} == official_test
    n_val = sum(s == "val" for s in split_of_patient.values())
    assert 3 <= n_val <= 20  # about 12.5% of 80 patients
    assert len(list(create_dataset("nih14").records(root, RejectLog(), seed=3, n=7))) == 7


def test_wrong_root_names_what_was_expected(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(LeaderError, match=r"expected Data_Entry_2017\*\.csv under .*is --root the folder"):
        list(create_dataset("nih14").records(tmp_path, RejectLog(), seed=0, n=None))


def test_cli_build(tmp_path):
    root = write_nih(tmp_path / "nih")
    manifest, samples, rejects = build_with_cli("nih14", root, tmp_path / "out")
    assert sorted(samples) == ["00000001_000.png", "00000001_001.png", "00000002_000.png",
                               "00000003_000.png", "00000004_000.png"]
    assert manifest.n_rejects == 6 and len(rejects) == 6
    assert any("truncated" in r["reason"] for r in rejects)
    sample = samples["00000001_000.png"]
    assert sample.key == sample_key("nih14", "00000001_000.png")
    assert sample.meta["orig_size"] == [64, 64] and sample.image().dtype.name == "uint8"
    assert sample.meta["boxes"] == [{"label": "cardiomegaly", "x0": 10.5, "y0": 20.0, "x1": 40.5, "y1": 45.25}]
    assert [p["kind"] for p in sample.meta["patches"]] == ["diseased"]
    assert manifest.label_names[0] == "no_finding" and manifest.has_boxes
    # The paper averages the 14 findings; "all" keeps every label, No Finding included.
    paper = select_classes(manifest, "paper")
    assert paper.labels == "harmonised" and paper.names == manifest.label_names[1:] and len(paper.names) == 14
    assert select_classes(manifest, None).names == manifest.label_names


def test_only_an_image_labelled_no_finding_is_healthy(tmp_path):
    root = write_nih(tmp_path / "nih")
    records = {r.image_id: r for r in create_dataset("nih14").records(root, RejectLog(), seed=0, n=None)}
    assert {i for i, r in records.items() if r.healthy} == {"00000001_001.png", "00000004_000.png"}
    # An image with a finding the dataset does not list is rejected, so it never becomes healthy.
    assert "00000007_000.png" not in records


def test_a_512_px_copy_builds_with_its_official_boxes_scaled(tmp_path):
    """torchxrayvision ships NIH at 512 px while BBox_List_2017.csv stays on the 1024 px images.

    Before boxes had a frame, this box was rejected as lying outside the 512x512 image, and with one
    of the two images rejected the build stopped.
    """
    images = [("00000001_000.png", "Cardiomegaly", "00000001", "PA", "images", "train_val"),
              ("00000002_000.png", "No Finding", "00000002", "PA", "images", "train_val")]
    bbox = "Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000001_000.png,Cardiomegaly,300,400,350,250,,,\n"
    root = write_nih(tmp_path / "nih", images, bbox, shape=(512, 512))
    result = CliRunner().invoke(app, ["shards", "build", "nih14", "--root", str(root), "--out", str(tmp_path / "out"),
                                      "--size", "64"])  # the default 1% reject threshold
    assert result.exit_code == 0, result.output
    meta = {s.meta["image_id"]: s.meta for s in iter_samples(tmp_path / "out")}["00000001_000.png"]
    assert meta["orig_size"] == [512, 512] and meta["frame"] == [1024, 1024]
    # [300, 400, 650, 650] on 1024 px is [150, 200, 325, 325] on the 512 px file, and x 1/8 when stored at 64.
    assert meta["boxes"] == [{"label": "cardiomegaly", "x0": 18.75, "y0": 25.0, "x1": 40.625, "y1": 40.625}]
    assert (tmp_path / "out" / "rejects.jsonl").read_text() == ""


def test_a_file_of_another_aspect_is_rejected_not_scaled(tmp_path):
    images = [("00000001_000.png", "Cardiomegaly", "00000001", "PA", "images", "train_val")]
    bbox = "Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000001_000.png,Cardiomegaly,300,400,350,250,,,\n"
    root = write_nih(tmp_path / "nih", images, bbox, shape=(512, 400))  # a cropped copy
    manifest, samples, rejects = build_with_cli("nih14", root, tmp_path / "out")
    assert samples == {} and manifest.n_samples == 0
    assert reasons(rejects)["images/images/00000001_000.png"] == (
        "annotations are given on a 1024x1024 image but the file is 400x512: its aspect 0.781 differs from "
        "1.000, so it is not a resized copy")


def test_a_box_on_a_no_finding_image_rejects_it(tmp_path):
    images = [("00000001_000.png", "No Finding", "00000001", "PA", "images", "train_val"),
              ("00000002_000.png", "Nodule", "00000002", "PA", "images", "train_val")]
    bbox = ("Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000001_000.png,Nodule,300,400,50,50,,,\n"
            "00000002_000.png,Nodule,300,400,50,50,,,\n")
    manifest, samples, rejects = build_with_cli("nih14", write_nih(tmp_path / "nih", images, bbox), tmp_path / "out")
    assert sorted(samples) == ["00000002_000.png"]
    assert reasons(rejects)["images/images/00000001_000.png"] == (
        "stated healthy but has 1 lesion box(es): the dataset contradicts itself")


def test_healthy_patches_match_the_boxes_not_the_normal_images(tmp_path):
    """Ten "No Finding" images against three boxes: three healthy patches, from three of the ten."""
    images = [("00000001_000.png", "Nodule|Mass", "00000001", "PA", "images", "test"),
              ("00000002_000.png", "Effusion", "00000002", "PA", "images", "test")]
    images += [(f"{p:08d}_000.png", "No Finding", f"{p:08d}", "PA", "images", "test") for p in range(10, 20)]
    bbox = ("Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000001_000.png,Nodule,160,160,64,64,,,\n"
            "00000001_000.png,Mass,480,480,160,160,,,\n00000002_000.png,Effusion,640,640,320,320,,,\n")
    manifest, samples, rejects = build_with_cli("nih14", write_nih(tmp_path / "nih", images, bbox), tmp_path / "out")
    healthy = {i: [p for p in s.meta["patches"] if p["kind"] == "healthy"] for i, s in samples.items()}
    assert sum(map(len, healthy.values())) == 3 and sum(1 for v in healthy.values() if v) == 3
    assert all(samples[i].meta["healthy"] for i, v in healthy.items() if v)
    counts = manifest.counts
    assert (counts["diseased_patches"], counts["healthy_patches"], counts["healthy_candidates"]) == (3, 3, 10)
    assert counts["by_split"]["test"]["healthy_target"] == 3 and counts["healthy_shortfall"] == 0
