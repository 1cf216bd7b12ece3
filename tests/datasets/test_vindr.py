"""VinDr-CXR: three readers per training image (majority labels, fused boxes), consensus test set,
12-bit MONOCHROME1/2 DICOMs named <image_id>.dicom."""
from __future__ import annotations

import numpy as np
import pytest

from leader.errors import LeaderError
from leader.shards.datasets import create_dataset
from leader.shards.datasets.vindr import VINDR_TO_VOCABULARY, fuse_reader_boxes
from leader.shards.records import RejectLog

from .fixtures_dicom import build_with_cli, phantom, reasons, write_csv, write_dicom

CLASSES = [c for c in VINDR_TO_VOCABULARY if c != "Other diseases"]


def label_row(image_id, reader, *positive):
    row = [image_id] + ([reader] if reader else [])
    return row + [int(c in positive) for c in CLASSES]


def write_vindr(root):
    for i, image_id in enumerate(["t1", "t2", "t3", "t4", "t6", "t7", "t8", "t9", "t10"]):
        write_dicom(root / "train" / f"{image_id}.dicom", phantom(64, 64, bits=12, seed=i), bits_stored=12,
                    photometric="MONOCHROME1" if i % 2 else "MONOCHROME2", window=(2048, 4096), view=None)
    write_dicom(root / "test" / "s1.dicom", phantom(64, 64, bits=12, seed=9), bits_stored=12, view=None)

    ann = root / "annotations"
    write_csv(ann / "image_labels_train.csv", ["image_id", "rad_ID", *CLASSES], [
        label_row("t1", "R1", "Cardiomegaly", "Enlarged PA"),
        label_row("t1", "R2", "Cardiomegaly", "Enlarged PA"),
        label_row("t1", "R3", "Nodule/Mass"),
        *(label_row("t2", r, "No finding") for r in ("R1", "R4", "R5")),
        *(label_row("t3", r, "Pleural effusion") for r in ("R1", "R2", "R3")),
        *(label_row("t4", r, "Atelectasis") for r in ("R1", "R2", "R3")),
        *(label_row("t5", r, "No finding") for r in ("R1", "R2", "R3")),  # t5.dicom missing
        label_row("t6", "R1", "No finding")[:-1] + ["2"],  # not 0/1
        # Two readers see nothing, the third a nodule: its box is one reader's only.
        label_row("t8", "R1", "No finding"), label_row("t8", "R2", "No finding"), label_row("t8", "R3", "Nodule/Mass"),
        # Every reader names a finding the vocabulary does not have, and draws no box.
        *(label_row("t9", r, "COPD") for r in ("R1", "R2", "R3")),
        # "No finding" from 2 of 3 readers; the third names a disease without a box.
        label_row("t10", "R1", "No finding"), label_row("t10", "R2", "No finding"), label_row("t10", "R3", "Other disease"),
    ])
    write_csv(ann / "annotations_train.csv", ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"], [
        ("t1", "R1", "Cardiomegaly", 10, 30, 50, 50),
        ("t1", "R2", "Cardiomegaly", 12, 31, 52, 52),
        ("t1", "R3", "Nodule/Mass", 5, 5, 10, 10),  # one reader only: unconfirmed
        ("t1", "R1", "Enlarged PA", 30, 10, 40, 20),
        ("t1", "R2", "Enlarged PA", 31, 11, 41, 21),
        ("t2", "R1", "No finding", "", "", "", ""),
        ("t2", "R4", "No finding", "", "", "", ""),
        ("t2", "R5", "No finding", "", "", "", ""),
        ("t3", "R1", "Pleural effusion", 0, 0, 20, 20),
        ("t3", "R2", "Pleural effusion", 40, 40, 60, 60),  # elsewhere: its own cluster
        ("t3", "R3", "Pleural effusion", 1, 1, 21, 21),
        ("t4", "R1", "Atelectasis", "abc", 1, 2, 3),
        ("t7", "R1", "Cardiomegaly", 1, 1, 9, 9),  # no image_labels row
        ("t8", "R1", "No finding", "", "", "", ""),
        ("t8", "R2", "No finding", "", "", "", ""),
        ("t8", "R3", "Nodule/Mass", 20, 20, 30, 30),
        ("t10", "R1", "No finding", "", "", "", ""),  # diagnoses such as COPD have label columns only
        ("t10", "R2", "No finding", "", "", "", ""),
    ])
    write_csv(ann / "image_labels_test.csv", ["image_id", *CLASSES], [label_row("s1", None, "Cardiomegaly")])
    write_csv(ann / "annotations_test.csv", ["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"],
              [("s1", "Cardiomegaly", 8, 30, 56, 52)])
    return root


def test_fusion_rule():
    agree = [("R1", (0, 0, 10, 10)), ("R2", (1, 1, 11, 11)), ("R3", (0, 1, 10, 11))]
    fused, dropped = fuse_reader_boxes(agree, n_readers=3)
    assert dropped == 0 and len(fused) == 1
    box, readers = fused[0]
    assert readers == ("R1", "R2", "R3") and box == pytest.approx((1 / 3, 2 / 3, 31 / 3, 32 / 3), abs=1e-3)
    # Two boxes of ONE reader never confirm each other, however much they overlap.
    fused, dropped = fuse_reader_boxes([("R1", (0, 0, 10, 10)), ("R1", (0, 0, 10, 10))], n_readers=3)
    assert fused == [] and dropped == 2
    # IoU below 0.4 does not cluster: (0,0,10,10) vs (5,0,15,10) has IoU 1/3.
    fused, dropped = fuse_reader_boxes([("R1", (0, 0, 10, 10)), ("R2", (5, 0, 15, 10))], n_readers=3)
    assert fused == [] and dropped == 2
    # A consensus (one reader) keeps every box.
    assert len(fuse_reader_boxes([("c", (0, 0, 5, 5)), ("c", (20, 20, 30, 30))], n_readers=1)[0]) == 2


def records_of(root, **options):
    rejects = RejectLog()
    records = {r.image_id: r for r in create_dataset("vindr", **options).records(root, rejects, seed=0, n=None)}
    return records, rejects


def test_records_with_fused_boxes(tmp_path):
    root = write_vindr(tmp_path / "1.0.0")
    records, rejects = records_of(root, boxes="fused")
    assert sorted(records) == ["s1", "t1", "t10", "t2", "t3", "t8", "t9"]

    t1 = records["t1"]
    assert t1.labels["cardiomegaly"] == 1  # 2 of 3 readers
    assert t1.labels["lung_lesion"] == 0  # 1 of 3 readers
    assert t1.labels["no_finding"] == 0
    assert set(t1.labels) == set(create_dataset("vindr").label_names)
    assert [(b.label, b.source_label, b.as_list()) for b in t1.boxes] == [
        ("cardiomegaly", "Cardiomegaly", [11.0, 30.5, 51.0, 51.0])]
    assert t1.extra["box_readers"] == [["R1", "R2"]] and t1.extra["unconfirmed_boxes"] == 1
    assert t1.extra["other_boxes"] == [{"label": "Enlarged PA", "box": [30.5, 10.5, 40.5, 20.5], "readers": ["R1", "R2"]}]
    assert t1.source_labels["votes"] == {"Cardiomegaly": 2, "Enlarged PA": 2, "Nodule/Mass": 1}
    assert t1.source_labels["readers"] == ["R1", "R2", "R3"]
    assert t1.split in ("train", "val") and t1.patient_id == "t1"
    # VinDr's own classes, by the same 2-of-3 vote: Enlarged PA has no vocabulary entry but is one of them.
    assert t1.source_classes["Cardiomegaly"] == 1 and t1.source_classes["Enlarged PA"] == 1
    assert t1.source_classes["Nodule/Mass"] == 0 and len(t1.source_classes) == 22

    t2 = records["t2"]
    assert t2.labels["no_finding"] == 1 and t2.boxes == []
    image = t2.load()  # MONOCHROME1, 12-bit, windowed
    assert image.dtype == np.uint16
    t3 = records["t3"]
    assert [b.as_list() for b in t3.boxes] == [[0.5, 0.5, 20.5, 20.5]]
    assert t3.extra["unconfirmed_boxes"] == 1 and t3.labels["effusion"] == 1
    assert records["t8"].boxes == [] and records["t8"].extra["unconfirmed_boxes"] == 1

    s1 = records["s1"]
    assert s1.split == "test" and s1.labels["cardiomegaly"] == 1
    assert [b.as_list() for b in s1.boxes] == [[8.0, 30.0, 56.0, 52.0]]
    assert s1.source_labels["readers"] == ["consensus"]

    bad = reasons(rejects)
    assert bad["train/t4.dicom"] == (
        "unparseable box: ['abc', '1', '2', '3'] for 'Atelectasis' (annotations_train.csv row 13)")
    assert bad["train/t5.dicom"] == "image file not found under --root"
    assert "label not 0 or 1: 'No finding' = '2'" in bad["train/t6.dicom"]
    assert "boxes without labels: no row in image_labels_train.csv" in bad["train/t7.dicom"]
    assert len(rejects) == 4


def test_every_readers_box_by_default(tmp_path):
    root = write_vindr(tmp_path / "1.0.0")
    records, rejects = records_of(root)
    t1 = records["t1"]
    assert [(b.source_label, b.as_list()) for b in t1.boxes] == [
        ("Cardiomegaly", [10.0, 30.0, 50.0, 50.0]), ("Cardiomegaly", [12.0, 31.0, 52.0, 52.0]),
        ("Nodule/Mass", [5.0, 5.0, 10.0, 10.0])]
    assert [b.label for b in t1.boxes] == ["cardiomegaly", "cardiomegaly", "lung_lesion"]
    assert t1.extra["box_readers"] == [["R1"], ["R2"], ["R3"]] and "unconfirmed_boxes" not in t1.extra
    assert t1.extra["box_mode"] == "readers"
    assert [b.as_list() for b in records["t3"].boxes] == [[0, 0, 20, 20], [40, 40, 60, 60], [1, 1, 21, 21]]
    # The single reader's nodule is a lesion box of its own, though the image label (1 of 3) is 0.
    t8 = records["t8"]
    assert [(b.source_label, b.as_list()) for b in t8.boxes] == [("Nodule/Mass", [20, 20, 30, 30])]
    assert t8.labels["lung_lesion"] == 0 and t8.labels["no_finding"] == 1
    assert len(rejects) == 4
    with pytest.raises(LeaderError, match="vindr: boxes must be one of readers, fused"):
        create_dataset("vindr", boxes="majority")


def test_only_an_image_every_reader_calls_normal_is_healthy(tmp_path):
    root = write_vindr(tmp_path / "1.0.0")
    for mode in ("readers", "fused"):
        records, _ = records_of(root, boxes=mode)
        assert {i for i, r in records.items() if r.healthy} == {"t2"}, mode
    records, _ = records_of(root)
    # t8: "No finding" from 2 of 3 readers and one reader's box; t10: 2 of 3 and an unmapped disease.
    assert records["t8"].labels["no_finding"] == records["t10"].labels["no_finding"] == 1
    # t9: every reader names COPD, which the vocabulary lacks: no vocabulary finding, yet not normal.
    assert not any(v for k, v in records["t9"].labels.items()) and not records["t9"].healthy


def test_monochrome1_is_inverted(tmp_path):
    pixels = phantom(32, 32, bits=12)
    write_dicom(tmp_path / "m1.dicom", pixels, bits_stored=12, photometric="MONOCHROME1")
    write_dicom(tmp_path / "m2.dicom", pixels, bits_stored=12, photometric="MONOCHROME2")
    from leader.shards.imageio import read_image

    assert np.array_equal(read_image(tmp_path / "m1.dicom"), 65535 - read_image(tmp_path / "m2.dicom"))


def test_wrong_root(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(LeaderError, match="expected annotations/annotations_train.csv under"):
        list(create_dataset("vindr").records(tmp_path, RejectLog(), seed=0, n=None))


def test_cli_build(tmp_path):
    root = write_vindr(tmp_path / "1.0.0")
    manifest, samples, rejects = build_with_cli("vindr", root, tmp_path / "out", "--option", "boxes=fused", size=32)
    assert sorted(samples) == ["s1", "t1", "t10", "t2", "t3", "t8", "t9"] and manifest.n_rejects == 4
    t1 = samples["t1"].meta
    assert t1["bits"] == 16
    assert t1["boxes"] == [{"label": "cardiomegaly", "x0": 5.5, "y0": 15.25, "x1": 25.5, "y1": 25.5,
                            "source_label": "Cardiomegaly"}]
    assert [(p["kind"], p["source_label"]) for p in t1["patches"]] == [("diseased", "Cardiomegaly")]
    assert manifest.splits["test"] == 1
    assert manifest.class_sets["paper"]["labels"] == "source" and len(manifest.class_sets["paper"]["names"]) == 14
    assert set(manifest.class_sets["paper"]["names"]) <= set(manifest.source_class_names)
    # Only t2 may give healthy patches, and it is the only healthy image there is.
    for image_id, sample in samples.items():
        assert (image_id == "t2") == sample.meta["healthy"]
        if image_id != "t2":
            assert all(p["kind"] != "healthy" for p in sample.meta["patches"])


def test_cli_build_counts_every_readers_box_by_default(tmp_path):
    root = write_vindr(tmp_path / "1.0.0")
    manifest, samples, _ = build_with_cli("vindr", root, tmp_path / "readers", size=32)
    fused, _, _ = build_with_cli("vindr", root, tmp_path / "fused", "--option", "boxes=fused", size=32)
    # t1: 2 cardiomegaly boxes and 1 nodule; t3: 3 effusion boxes; t8: 1 nodule; s1: 1 consensus box.
    assert manifest.counts["diseased_patches"] == 8 and fused.counts["diseased_patches"] == 3
    assert manifest.build["options"] == {} and fused.build["options"] == {"boxes": "fused"}
    assert [p["source_label"] for p in samples["t1"].meta["patches"] if p["kind"] == "diseased"] == [
        "Cardiomegaly", "Cardiomegaly", "Nodule/Mass"]
