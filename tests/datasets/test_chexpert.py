"""CheXpert as released: train.csv/valid.csv with release-prefixed paths and 1/0/-1/blank labels."""
from __future__ import annotations

import pytest

from leader.errors import LeaderError
from leader.shards.datasets import create_dataset
from leader.shards.datasets.chexpert import OBSERVATIONS_TO_VOCABULARY, states_no_finding
from leader.shards.records import RejectLog

from .fixtures_dicom import build_with_cli, corrupt, phantom, reasons, write_csv, write_jpeg

HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS_TO_VOCABULARY]
PREFIX = "CheXpert-v1.0-small/"


def row(path, view="Frontal", ap_pa="AP", **observations):
    values = {name: "" for name in OBSERVATIONS_TO_VOCABULARY}
    values.update({k.replace("_", " "): v for k, v in observations.items()})
    return [PREFIX + path, "Female", "68", view, ap_pa, *values.values()]


TRAIN = [
    row("train/patient00001/study1/view1_frontal.jpg", Cardiomegaly="1.0", Edema="-1.0", Pleural_Effusion="0.0"),
    row("train/patient00001/study1/view2_lateral.jpg", view="Lateral", ap_pa="", Cardiomegaly="1.0"),
    row("train/patient00002/study1/view1_frontal.jpg", ap_pa="PA", No_Finding="1.0", Support_Devices="0.0"),
    row("train/patient00003/study2/view1_frontal.jpg", Edema="2.0"),  # not a CheXpert code
    row("train/patient00004/study1/view1_frontal.jpg", Fracture="1.0"),  # file missing
    row("train/patient00005/study1/view1_frontal.jpg", Pneumothorax="1.0"),  # truncated file
]
VALID = [row("valid/patient64541/study1/view1_frontal.jpg",
             **{**{name.replace(" ", "_"): "0.0" for name in OBSERVATIONS_TO_VOCABULARY}, "Atelectasis": "1.0"})]


def write_chexpert(root):
    # The folder was renamed after unzipping: the CSV paths still say CheXpert-v1.0-small/.
    for i, r in enumerate(TRAIN + VALID):
        relative = r[0][len(PREFIX):]
        if "patient00004" not in relative:
            write_jpeg(root / relative, phantom(64, 48, seed=i))
    corrupt(root / "train/patient00005/study1/view1_frontal.jpg", keep=0.3)
    write_csv(root / "train.csv", HEADER, TRAIN)
    write_csv(root / "valid.csv", HEADER, VALID)
    return root


def test_uncertain_and_blank_are_unknown_never_negative(tmp_path):
    root = write_chexpert(tmp_path / "my_chexpert_copy")
    rejects = RejectLog()
    records = {r.image_id: r for r in create_dataset("chexpert").records(root, rejects, seed=0, n=None)}

    assert sorted(records) == [
        "train/patient00001/study1/view1_frontal.jpg",
        "train/patient00002/study1/view1_frontal.jpg",
        "train/patient00005/study1/view1_frontal.jpg",
        "valid/patient64541/study1/view1_frontal.jpg",
    ]
    first = records["train/patient00001/study1/view1_frontal.jpg"]
    assert first.labels["cardiomegaly"] == 1
    assert first.labels["effusion"] == 0
    assert first.labels["edema"] is None and first.source_labels["Edema"] == "-1.0"  # uncertain
    assert first.labels["pneumonia"] is None and first.source_labels["Pneumonia"] == ""  # not mentioned
    assert first.patient_id == "patient00001" and first.view == "AP"
    assert first.load().shape == (64, 48)
    assert records["train/patient00002/study1/view1_frontal.jpg"].labels["no_finding"] == 1

    valid = records["valid/patient64541/study1/view1_frontal.jpg"]
    assert valid.split == "test" and valid.labels["atelectasis"] == 1
    assert all(v in (0, 1) for v in valid.labels.values())
    assert {r.split for r in records.values() if r.image_id.startswith("train/")} <= {"train", "val"}

    bad = reasons(rejects)
    assert bad["train/patient00003/study2/view1_frontal.jpg"].startswith("unexpected label value: 'Edema' = '2.0'")
    assert bad["train/patient00004/study1/view1_frontal.jpg"] == "image file not found under --root"
    assert len(rejects) == 2


def test_healthy_needs_no_finding_and_no_positive_or_uncertain_finding(tmp_path):
    root = write_chexpert(tmp_path / "chexpert")
    records = {r.image_id: r for r in create_dataset("chexpert").records(root, RejectLog(), seed=0, n=None)}
    assert {i for i, r in records.items() if r.healthy} == {"train/patient00002/study1/view1_frontal.jpg"}
    blank = {name: "" for name in OBSERVATIONS_TO_VOCABULARY}
    assert states_no_finding({**blank, "No Finding": "1.0", "Support Devices": "1.0"})  # a device is no finding
    assert not states_no_finding({**blank, "No Finding": "1.0", "Edema": "-1.0"})      # uncertain
    assert not states_no_finding({**blank, "No Finding": "1.0", "Fracture": "1.0"})
    assert not states_no_finding({**blank, "No Finding": ""})                          # not mentioned
    assert create_dataset("chexpert").class_sets["paper"].names == (
        "atelectasis", "cardiomegaly", "consolidation", "edema", "effusion")


def test_laterals_only_when_asked(tmp_path):
    root = write_chexpert(tmp_path / "CheXpert-v1.0-small")
    records = list(create_dataset("chexpert", frontal_only=False).records(root, RejectLog(), seed=0, n=None))
    lateral = [r for r in records if "lateral" in r.image_id]
    assert len(lateral) == 1 and lateral[0].view == "LATERAL"
    assert [r.image_id for r in create_dataset("chexpert").records(root, RejectLog(), seed=0, n=2)] == [
        "train/patient00001/study1/view1_frontal.jpg", "train/patient00002/study1/view1_frontal.jpg"]


def test_patients_never_span_splits(tmp_path):
    root = tmp_path / "chexpert"
    rows = [row(f"train/patient{p:05d}/study{s}/view1_frontal.jpg") for p in range(60) for s in (1, 2)]
    for r in rows:
        (root / r[0][len(PREFIX):]).parent.mkdir(parents=True, exist_ok=True)
        (root / r[0][len(PREFIX):]).touch()
    write_csv(root / "train.csv", HEADER, rows)
    records = list(create_dataset("chexpert").records(root, RejectLog(), seed=1, n=None))
    by_patient = {}
    for r in records:
        assert by_patient.setdefault(r.patient_id, r.split) == r.split
    assert set(by_patient.values()) == {"train", "val"}


def test_missing_label_file(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(LeaderError, match="expected train.csv"):
        list(create_dataset("chexpert").records(tmp_path, RejectLog(), seed=0, n=None))


def test_cli_build(tmp_path):
    root = write_chexpert(tmp_path / "CheXpert-v1.0-small")
    manifest, samples, rejects = build_with_cli("chexpert", root, tmp_path / "out", "--option", "frontal_only=false")
    assert len(samples) == 4 and manifest.n_rejects == 3
    assert any("truncated" in r["reason"] for r in rejects)
    meta = samples["train/patient00001/study1/view1_frontal.jpg"].meta
    assert meta["labels"]["edema"] is None and meta["source_labels"]["Edema"] == "-1.0"
    assert meta["size"] == [64, 48] and meta["patches"] == []
    assert manifest.label_counts["edema"]["unknown"] >= 1
    assert manifest.splits["test"] == 1
