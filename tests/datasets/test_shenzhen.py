"""Shenzhen: the label is the last digit of the file name; readings are optional text files."""
from __future__ import annotations

import pytest

from leader.errors import LeaderError
from leader.shards.datasets import create_dataset

from .fixtures_files import build_with_cli, check_record, collect, radiograph, reject_reasons, write_png, write_text


@pytest.fixture()
def shenzhen_root(tmp_path):
    root = tmp_path / "ChinaSet_AllFiles"
    for i, name in enumerate(["CHNCXR_0001_0", "CHNCXR_0002_0", "CHNCXR_0327_1", "CHNCXR_0400_1"]):
        write_png(root / "CXR_png" / f"{name}.png", radiograph(96, 80, seed=i))
    write_png(root / "CXR_png" / "CHNCXR_0500_2.png")          # no such class
    write_text(root / "CXR_png" / "Thumbs.db", "not an image")  # what Windows leaves behind
    write_text(root / "ClinicalReadings" / "CHNCXR_0327_1.txt", "male 35yrs\nSTB,ATB in left upper field\n")
    write_text(root / "ClinicalReadings" / "CHNCXR_0001_0.txt", "female 24yrs\nnormal\n")
    return root


def test_labels_from_file_names_and_readings_kept(shenzhen_root):
    adapter = create_dataset("shenzhen")
    records, rejects = collect("shenzhen", shenzhen_root.parent, adapter=adapter)  # the parent works too
    assert sorted(records) == ["CHNCXR_0001_0", "CHNCXR_0002_0", "CHNCXR_0327_1", "CHNCXR_0400_1"]
    for r in records.values():
        check_record(r, adapter)
        assert r.patient_id == r.image_id and r.boxes == []

    tb = records["CHNCXR_0327_1"]
    assert tb.labels == {"no_finding": 0, "tuberculosis": 1}
    assert tb.source_labels == {"file_name_label": "1", "clinical_reading": "male 35yrs\nSTB,ATB in left upper field"}
    assert tb.path == "ChinaSet_AllFiles/CXR_png/CHNCXR_0327_1.png"
    assert records["CHNCXR_0002_0"].labels == {"no_finding": 1, "tuberculosis": 0}
    assert {i for i, r in records.items() if r.healthy} == {"CHNCXR_0001_0", "CHNCXR_0002_0"}
    assert "clinical_reading" not in records["CHNCXR_0002_0"].source_labels
    assert tb.load().shape == (96, 80)

    assert reject_reasons(rejects) == {
        "ChinaSet_AllFiles/CXR_png/CHNCXR_0500_2.png": "file name does not follow CHNCXR_####_{0,1}.png",
        "ChinaSet_AllFiles/CXR_png/Thumbs.db": "file name does not follow CHNCXR_####_{0,1}.png",
    }


def test_split_is_patient_wise_and_seeded(shenzhen_root):
    for i in range(5, 205):
        write_text(shenzhen_root / "CXR_png" / f"CHNCXR_{i:04d}_0.png", "")  # names are enough for splits
    a, _ = collect("shenzhen", shenzhen_root, seed=0)
    b, _ = collect("shenzhen", shenzhen_root, seed=1)
    assert {r.split for r in a.values()} == {"train", "val", "test"}
    assert [r.split for r in a.values()] != [r.split for r in b.values()]


def test_wrong_root_is_one_clear_error(tmp_path):
    with pytest.raises(LeaderError, match="expected CXR_png/"):
        collect("shenzhen", tmp_path)


def test_cli_build(shenzhen_root, tmp_path):
    samples, manifest, rejects = build_with_cli("shenzhen", shenzhen_root, tmp_path / "out", "--max-reject-fraction", "1")
    assert manifest.n_samples == 4 and not manifest.has_boxes
    assert manifest.label_counts["tuberculosis"] == {"pos": 2, "neg": 2, "unknown": 0}
    assert samples["CHNCXR_0001_0"].meta["size"] == [64, 53]
    assert all(s.meta["patches"] == [] for s in samples.values())  # no boxes: whole images only
    assert len(rejects) == 2
