"""MIMIC-CXR-JPG: files/pXX/p<subject>/s<study>/<dicom_id>.jpg and the three .csv.gz tables."""
from __future__ import annotations

import pytest

from leader.errors import LeaderError
from leader.shards.datasets import create_dataset
from leader.shards.datasets.chexpert import OBSERVATIONS_TO_VOCABULARY
from leader.shards.records import RejectLog

from .fixtures_dicom import build_with_cli, phantom, reasons, write_csv, write_jpeg

# dicom_id, subject, study, split, ViewPosition (None: not in the metadata), file written?
IMAGES = [
    ("aaaa-0001", "10000032", "50414267", "train", "PA", True),
    ("aaaa-0002", "10000032", "50414267", "train", "LATERAL", True),
    ("bbbb-0001", "10000764", "57375967", "validate", "AP", True),  # study has no label row
    ("cccc-0001", "11000001", "51111111", "test", "PA", True),
    ("dddd-0001", "12000002", "52222222", "train", "PA", False),  # file missing
    ("eeee-0001", "13000003", "53333333", "train", None, True),  # not in metadata
    ("ffff-0001", "14000004", "54444444", "train", "AP", True),  # damaged label row
]


def chexpert_row(subject, study, **observations):
    values = {name: "" for name in OBSERVATIONS_TO_VOCABULARY}
    values.update({k.replace("_", " "): v for k, v in observations.items()})
    return [subject, study, *values.values()]


def write_mimic(root):
    for i, (dicom_id, subject, study, _, _, exists) in enumerate(IMAGES):
        if exists:
            write_jpeg(root / f"files/p{subject[:2]}/p{subject}/s{study}/{dicom_id}.jpg", phantom(48, 64, seed=i))
    write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
              [(d, st, su, sp) for d, su, st, sp, _, _ in IMAGES], gz=True)
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz",
              ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns"],
              [(d, su, st, "CHEST (PA AND LAT)", v, 48, 64) for d, su, st, _, v, _ in IMAGES if v is not None], gz=True)
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *OBSERVATIONS_TO_VOCABULARY], [
        chexpert_row("10000032", "50414267", Cardiomegaly="1.0", Edema="-1.0", Pleural_Effusion="0.0"),
        chexpert_row("11000001", "51111111", Pneumonia="1.0", No_Finding=""),
        chexpert_row("10000764", "57375960", No_Finding="1.0", Support_Devices="1.0"),  # another study
        chexpert_row("12000002", "52222222", Fracture="1.0"),
        chexpert_row("13000003", "53333333", Fracture="1.0"),
        chexpert_row("14000004", "54444444", Edema="yes"),
    ], gz=True)
    return root


def test_records(tmp_path):
    root = write_mimic(tmp_path / "2.0.0")
    rejects = RejectLog()
    records = {r.image_id: r for r in create_dataset("mimic-cxr").records(root, rejects, seed=0, n=None)}
    assert sorted(records) == ["aaaa-0001", "bbbb-0001", "cccc-0001"]

    first = records["aaaa-0001"]
    assert first.path == "files/p10/p10000032/s50414267/aaaa-0001.jpg"
    assert first.patient_id == "10000032" and first.view == "PA" and first.split == "train"
    assert first.labels["cardiomegaly"] == 1 and first.labels["effusion"] == 0
    assert first.labels["edema"] is None and first.source_labels["Edema"] == "-1.0"
    assert first.labels["pneumonia"] is None and first.source_labels["Pneumonia"] == ""
    assert first.extra == {"study_id": "50414267"}
    assert first.load().shape == (48, 64)

    unlabelled = records["bbbb-0001"]
    assert unlabelled.split == "val"
    assert set(unlabelled.labels.values()) == {None}
    assert unlabelled.source_labels == {"status": "study not in mimic-cxr-2.0.0-chexpert.csv.gz"}
    assert records["cccc-0001"].split == "test" and records["cccc-0001"].labels["pneumonia"] == 1
    # A study the label file does not list says nothing, so it is not healthy, though the
    # patient's other study is No Finding.
    assert not any(r.healthy for r in records.values())

    bad = reasons(rejects)
    assert bad["files/p12/p12000002/s52222222/dddd-0001.jpg"] == "image file not found under --root"
    assert "not in mimic-cxr-2.0.0-metadata.csv.gz" in bad["files/p13/p13000003/s53333333/eeee-0001.jpg"]
    assert "unexpected label value: 'Edema' = 'yes'" in bad["files/p14/p14000004/s54444444/ffff-0001.jpg"]
    assert len(rejects) == 3

    every_view = create_dataset("mimic-cxr", frontal_only=False).records(root, RejectLog(), seed=0, n=None)
    assert "aaaa-0002" in {r.image_id for r in every_view}


def test_missing_label_files_are_named(tmp_path):
    root = write_mimic(tmp_path / "2.0.0")
    (root / "mimic-cxr-2.0.0-chexpert.csv.gz").unlink()
    with pytest.raises(LeaderError, match="expected mimic-cxr-2.0.0-chexpert.csv.gz under"):
        list(create_dataset("mimic-cxr").records(root, RejectLog(), seed=0, n=None))


def test_cli_build(tmp_path):
    root = write_mimic(tmp_path / "2.0.0")
    manifest, samples, rejects = build_with_cli("mimic-cxr", root, tmp_path / "out", "--n", "2")
    assert sorted(samples) == ["aaaa-0001", "bbbb-0001"]
    assert samples["aaaa-0001"].key == "mimic-cxr/aaaa-0001"
    assert samples["bbbb-0001"].meta["labels"]["cardiomegaly"] is None
    assert manifest.splits == {"train": 1, "val": 1}
    assert len(rejects) == 0  # the first two usable records come before any bad row
