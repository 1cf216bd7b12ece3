"""RSNA Pneumonia: one label row per box, 8-bit MONOCHROME2 DICOMs named by patientId."""
from __future__ import annotations

import pytest

from leader.errors import LeaderError
from leader.shards.datasets import create_dataset
from leader.shards.records import RejectLog

from .fixtures_dicom import build_with_cli, phantom, reasons, write_csv, write_dicom

# Boxes on the challenge's 1024 px images; the fixture's DICOMs are 64 px copies.
LABELS = [
    ("p1", "160", "192", "320", "256", "1"),
    ("p1", "648", "480", "192", "320", "1"),
    ("p2", "", "", "", "", "0"),
    ("p3", "", "", "", "", "0"),
    ("p4", "abc", "80", "80", "80", "1"),  # unparseable box
    ("p5", "", "", "", "", "0"),
    ("p5", "48", "48", "144", "144", "1"),  # contradicting Target
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
    assert [b.as_list() for b in p1.boxes] == [[160.0, 192.0, 480.0, 448.0], [648.0, 480.0, 840.0, 800.0]]
    assert {(b.label, b.source_label) for b in p1.boxes} == {("pneumonia", "Lung Opacity")}
    assert p1.frame == (1024, 1024)
    assert p1.view == "PA" and p1.path == "stage_2_train_images/p1.dcm"
    assert p1.extra == {"also_in": ["nih14"]} and p1.patient_id == "p1"
    assert p1.load().dtype.name == "uint8"
    assert records["p2"].labels == {"pneumonia": 0, "lung_opacity": 0, "no_finding": 1}
    assert records["p3"].labels["no_finding"] == 0 and records["p3"].boxes == []
    assert records["p3"].source_labels == {"Target": 0, "class": "No Lung Opacity / Not Normal"}

    bad = reasons(rejects)
    assert bad["stage_2_train_images/p4.dcm"] == (
        "unparseable box: ['abc', '80', '80', '80'] with Target 1 (stage_2_train_labels.csv row 6)")
    assert "rows disagree on Target" in bad["stage_2_train_images/p5.dcm"]
    assert bad["stage_2_train_images/p6.dcm"] == "image file not found under --root"
    assert len(rejects) == 3
    with pytest.raises(Exception, match="not a DICOM file"):
        records["p7"].load()


def test_only_the_normal_class_is_healthy(tmp_path):
    root = write_rsna(tmp_path / "rsna")
    records = {r.image_id: r for r in create_dataset("rsna").records(root, RejectLog(), seed=0, n=None)}
    assert records["p2"].healthy                       # "Normal"
    assert not records["p3"].healthy                   # "No Lung Opacity / Not Normal": no opacity, not normal
    assert not records["p1"].healthy


def test_without_class_file_no_finding_is_not_claimed(tmp_path):
    root = write_rsna(tmp_path / "rsna", with_classes=False)
    adapter = create_dataset("rsna")
    records = {r.image_id: r for r in adapter.records(root, RejectLog(), seed=0, n=2)}
    assert list(records) == ["p1", "p2"]
    assert records["p2"].labels == {"pneumonia": 0, "lung_opacity": 0}
    assert not any(r.healthy for r in records.values())
    assert adapter.notes == ["rsna: stage_2_detailed_class_info.csv is absent, so no image is stated Normal "
                             "and none gives healthy patches"]
    manifest, samples, _ = build_with_cli("rsna", root, tmp_path / "out", size=32)
    assert manifest.notes[0] == adapter.notes[0] and manifest.counts["healthy_patches"] == 0
    assert manifest.counts["healthy_shortfall"] == manifest.counts["diseased_patches"] == 2


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
    # 1024 px frame -> 64 px DICOM -> 32 px stored: [160, 192, 480, 448] / 32.
    assert p1["boxes"][0] == {"label": "pneumonia", "x0": 5.0, "y0": 6.0, "x1": 15.0, "y1": 14.0,
                              "source_label": "Lung Opacity"}
    assert [p["kind"] for p in p1["patches"]] == ["diseased", "diseased"]
    # Only the "Normal" image may give healthy patches: one per diseased patch of its split, or a shortfall.
    assert all(p["kind"] == "healthy" for p in samples["p2"].meta["patches"])
    assert samples["p3"].meta["patches"] == []
    counts = manifest.counts
    assert counts["healthy_patches"] + counts["healthy_shortfall"] == counts["diseased_patches"] == 2
    assert p1["extra"] == {"also_in": ["nih14"]}
