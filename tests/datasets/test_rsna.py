"""RSNA Pneumonia: one label row per box, 8-bit MONOCHROME2 DICOMs named by patientId."""
from __future__ import annotations

import pytest

from leader.errors import LeaderError
from leader.shards.datasets import create_dataset
from leader.shards.records import RejectLog

from .fixtures_dicom import build_with_cli, phantom, reasons, write_csv, write_dicom

LABELS = [
    ("p1", "10", "12", "20", "16", "1"),
    ("p1", "40.5", "30", "12", "20", "1"),
    ("p2", "", "", "", "", "0"),
    ("p3", "", "", "", "", "0"),
    ("p4", "abc", "5", "5", "5", "1"),  # unparseable box
    ("p5", "", "", "", "", "0"),
    ("p5", "3", "3", "9", "9", "1"),  # contradicting Target
    ("p6", "", "", "", "", "0"),  # image missing
    ("p7", "", "", "", "", "0"),  # not a DICOM
]
CLASSES = [("p1", "Lung Opacity"), ("p1", "Lung Opacity"), ("p2", "Normal"),
           ("p3", "No Lung Opacity / Not Normal"), ("p4", "Lung Opacity"), ("p5", "Normal"),
           ("p6", "Normal"), ("p7", "Normal")]


def write_rsna(root, with_classes=True):
    for i, patient in enumerate(["p1", "p2", "p3", "p4", "p5"]):
        write_dicom(root / "stage_2_train_images" / f"{patient}.dcm", phantom(64, 64, seed=i),
                    patient_id=patient, view="AP" if i % 2 else "PA")
    (root / "stage_2_train_images" / "p7.dcm").write_text("patientId,x,y,width,height,Target\n")
    write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], LABELS)
    if with_classes:
        write_csv(root / "stage_2_detailed_class_info.csv", ["patientId", "class"], CLASSES)
    return root


def test_records(tmp_path):
    root = write_rsna(tmp_path / "rsna")
    rejects = RejectLog()
    records = {r.image_id: r for r in create_dataset("rsna").records(root, rejects, seed=0, n=None)}
    assert sorted(records) == ["p1", "p2", "p3", "p7"]

    p1 = records["p1"]
    assert p1.labels == {"pneumonia": 1, "lung_opacity": 1, "no_finding": 0}
    assert [b.as_list() for b in p1.boxes] == [[10.0, 12.0, 30.0, 28.0], [40.5, 30.0, 52.5, 50.0]]
    assert {b.label for b in p1.boxes} == {"pneumonia"}
    assert p1.view == "PA" and p1.path == "stage_2_train_images/p1.dcm"
    assert p1.extra == {"also_in": ["nih14"]} and p1.patient_id == "p1"
    assert p1.load().dtype.name == "uint8"
    assert records["p2"].labels == {"pneumonia": 0, "lung_opacity": 0, "no_finding": 1}
    assert records["p3"].labels["no_finding"] == 0 and records["p3"].boxes == []
    assert records["p3"].source_labels == {"Target": 0, "class": "No Lung Opacity / Not Normal"}

    bad = reasons(rejects)
    assert bad["stage_2_train_images/p4.dcm"] == (
        "unparseable box: ['abc', '5', '5', '5'] with Target 1 (stage_2_train_labels.csv row 6)")
    assert "rows disagree on Target" in bad["stage_2_train_images/p5.dcm"]
    assert bad["stage_2_train_images/p6.dcm"] == "image file not found under --root"
    assert len(rejects) == 3
    with pytest.raises(Exception, match="not a DICOM file"):
        records["p7"].load()


def test_without_class_file_no_finding_is_not_claimed(tmp_path):
    root = write_rsna(tmp_path / "rsna", with_classes=False)
    records = {r.image_id: r for r in create_dataset("rsna").records(root, RejectLog(), seed=0, n=2)}
    assert list(records) == ["p1", "p2"]
    assert records["p2"].labels == {"pneumonia": 0, "lung_opacity": 0}


def test_wrong_root(tmp_path):
    with pytest.raises(LeaderError, match="expected stage_2_train_labels.csv under"):
        list(create_dataset("rsna").records(tmp_path, RejectLog(), seed=0, n=None))


def test_cli_build(tmp_path):
    root = write_rsna(tmp_path / "rsna")
    manifest, samples, rejects = build_with_cli("rsna", root, tmp_path / "out", size=32)
    assert sorted(samples) == ["p1", "p2", "p3"]
    assert manifest.n_rejects == 4 and manifest.overlap_note.startswith("RSNA")
    p1 = samples["p1"].meta
    assert p1["scale"] == 0.5
    assert p1["boxes"][0] == {"label": "pneumonia", "x0": 5.0, "y0": 6.0, "x1": 15.0, "y1": 14.0}
    assert [p["kind"] for p in p1["patches"]] == ["diseased", "diseased"]
    # A normal image of a boxed dataset gets healthy patches for phase 2.
    assert [p["kind"] for p in samples["p2"].meta["patches"]] and all(
        p["kind"] == "healthy" for p in samples["p2"].meta["patches"])
    assert p1["extra"] == {"also_in": ["nih14"]}
