"""PadChest: one big CSV with stringified label lists, 16-bit PNGs under <ImageDir>/<ImageID>."""
from __future__ import annotations

import numpy as np
import pytest

from leader.errors import LeaderError
from leader.shards.datasets import create_dataset
from leader.shards.datasets.padchest import parse_labels, states_normal
from leader.shards.records import RejectLog

from .fixtures_dicom import build_with_cli, phantom, reasons, write_csv, write_png

HEADER = ["ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "Projection",
          "MethodProjection", "Labels", "Localizations", "MethodLabel"]
# image, ImageDir, folder actually on disk (None: missing), patient, projection, Labels
IMAGES = [
    ("img1.png", "0", "0", "P1", "PA", "['pleural effusion', ' cardiomegaly', 'pacemaker', 'aortic elongation']"),
    ("img2.png", "0", "0", "P1", "L", "['pleural effusion']"),  # lateral: skipped by default
    ("img3.png", "1", "1", "P2", "AP_horizontal", "['normal']"),
    ("img4.png", "2", "unzipped_elsewhere", "P3", "PA", "['laminar atelectasis', 'rib fracture']"),
    ("img5.png", "2", "2", "P4", "PA", "['pleural effusion'"),  # truncated list literal
    ("img6.png", "2", None, "P5", "PA", "['normal']"),  # file missing
    ("img7.png", "2", "2", "P6", "PA", "['normal']"),  # blank 16-bit PNG
    ("img8.png", "2.0", "2", "P7", "AP", "[]"),  # no labels: unknown
]


def write_padchest(root):
    rows = []
    for i, (image, image_dir, folder, patient, projection, labels) in enumerate(IMAGES):
        if folder is not None:
            pixels = np.zeros((48, 48), np.uint16) if image == "img7.png" else phantom(48, 48, bits=12, seed=i)
            write_png(root / folder / image, pixels)
        rows.append([image, image_dir, "20090101", f"S{i}", patient, "1950", projection, "Manual review",
                     labels, "[]", "Physician" if i % 2 else "RNN_model"])
    write_csv(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz", HEADER, rows, gz=True)
    return root


def test_parse_labels():
    assert parse_labels("['pleural effusion', ' cardiomegaly ']") == ["pleural effusion", "cardiomegaly"]
    assert parse_labels("['']") == [] and parse_labels("") == []
    with pytest.raises(ValueError, match="not a Python list literal"):
        parse_labels("['normal'")
    with pytest.raises(ValueError, match="not a list of strings"):
        parse_labels("[1, 2]")


def test_only_normal_alone_is_healthy():
    assert states_normal(["normal"])
    assert not states_normal(["normal", "scoliosis"])      # an unmapped finding beside it
    assert not states_normal(["normal", "pacemaker"])
    assert not states_normal(["suboptimal study"]) and not states_normal([])


def test_records(tmp_path):
    root = write_padchest(tmp_path / "padchest")
    rejects = RejectLog()
    records = {r.image_id: r for r in create_dataset("padchest").records(root, rejects, seed=0, n=None)}
    assert sorted(records) == ["img1.png", "img3.png", "img4.png", "img7.png", "img8.png"]

    first = records["img1.png"]
    assert first.path == "0/img1.png" and first.view == "PA" and first.patient_id == "P1"
    assert first.labels["effusion"] == 1 and first.labels["cardiomegaly"] == 1
    assert first.labels["support_devices"] == 1  # pacemaker
    assert first.labels["pneumonia"] == 0 and first.labels["no_finding"] == 0
    # Unmapped names are not lost: the raw list is kept whole.
    assert first.source_labels == {"Labels": ["pleural effusion", "cardiomegaly", "pacemaker", "aortic elongation"]}
    assert first.extra == {"MethodLabel": "RNN_model"}
    image = first.load()
    assert image.dtype == np.uint16 and image.min() == 0 and image.max() == 65535

    assert records["img3.png"].labels["no_finding"] == 1
    assert {i for i, r in records.items() if r.healthy} == {"img3.png", "img7.png"}  # "normal", and nothing else
    moved = records["img4.png"]
    assert moved.path == "unzipped_elsewhere/img4.png"
    assert moved.labels["atelectasis"] == 1 and moved.labels["rib_fracture"] == 1 and moved.labels["fracture"] == 1
    assert set(records["img8.png"].labels.values()) == {None}

    bad = reasons(rejects)
    assert "not a Python list literal" in bad["2/img5.png"]
    assert bad["2/img6.png"] == "image file not found under --root"
    assert len(rejects) == 2
    with pytest.raises(Exception, match="blank image"):
        records["img7.png"].load()


def test_missing_csv(tmp_path):
    (tmp_path / "0").mkdir()
    write_csv(tmp_path / "other.csv", ["a", "b"], [[1, 2]])
    with pytest.raises(LeaderError, match="expected PADCHEST_chest_x_ray_images_labels_160K"):
        list(create_dataset("padchest").records(tmp_path, RejectLog(), seed=0, n=None))


def test_cli_build_keeps_16_bits(tmp_path):
    root = write_padchest(tmp_path / "padchest")
    manifest, samples, rejects = build_with_cli("padchest", root, tmp_path / "out", "--option", "frontal_only=false")
    assert sorted(samples) == ["img1.png", "img2.png", "img3.png", "img4.png", "img8.png"]
    assert samples["img1.png"].meta["bits"] == 16 and samples["img1.png"].image().dtype == np.uint16
    assert "blank image" in {r["path"]: r["reason"] for r in rejects}["2/img7.png"]
    assert manifest.n_rejects == 3
    # Split is patient-wise: P1's two images share one split.
    assert samples["img1.png"].meta["split"] == samples["img2.png"].meta["split"]
    assert manifest.overlap_note and "NODE21" in manifest.overlap_note
