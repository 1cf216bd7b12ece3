"""The generic `csv` adapter: a user's own images described by one CSV."""
from __future__ import annotations

import json

import numpy as np
import pytest

from leader.errors import LeaderError
from leader.shards.records import sample_key
from leader.shards.datasets.csv_dataset import CsvDataset, harmonise

from .fixtures_files import (
    build_with_cli,
    check_record,
    collect,
   
    radiograph,
    reject_reasons,
    write_csv,
    write_png,
)

HEADER = ["path", "labels", "patient_id", "split", "boxes", "site"]


@pytest.fixture()
def user_root(tmp_path):
    """Six images under folders with spaces and non-ASCII names, and one CSV with good and bad rows."""
    root = tmp_path / "my data"
    write_png(root / "scans" / "a b" / "img 1.png", radiograph(64, seed=1))
    write_png(root / "scans" / "été" / "img2.png", radiograph(64, seed=2))
    write_png(root / "scans" / "img3.png", radiograph(80, 64, seed=3))
    write_png(root / "scans" / "img4.png", radiograph(64, seed=4, bits=16))
    write_png(root / "scans" / "img5.png", radiograph(64, seed=5))
    write_png(root / "scans" / "img6.png", radiograph(64, seed=6))
    nodule = json.dumps([{"label": "Nodule", "x0": 10, "y0": 12, "x1": 30, "y1": 28}])
    rows = [
        ["scans/a b/img 1.png", "Nodule|Pleural Effusion", "P1", "train", nodule, "north"],
        ["scans/été/img2.png", "No Finding", "P1", "", "", "north"],
        ["scans/img3.png", "My Rare Sign", "", "test", "", "south"],
        [str(root / "scans" / "img4.png"), "covid-19", "P4", "val", "", "south"],
        ["scans/img5.png", "Nodule", "P5", "train", "[{broken", "south"],     # bad JSON
        ["../outside.png", "", "P6", "", "", "south"],                         # escapes root
        ["scans/img6.png", "nan", "P6", "", "", "south"],                      # NaN labels
        ["scans/img3.png", "Mass", "P3", "", "", "south"],                     # duplicate id
        ["scans/img6.png", "Mass", "P6", "holdout", "", "south"],              # unknown split
        ["scans/img6.png", "No Finding|Mass", "P6", "", "", "south"],          # contradictory
    ]
    write_csv(root / "labels.csv", HEADER, rows)
    return root


def test_rows_become_records_with_harmonised_labels(user_root):
    adapter = CsvDataset()
    records, rejects = collect("csv", user_root, adapter=adapter)

    assert sorted(records) == ["scans/a b/img 1", "scans/img3", "scans/img4", "scans/été/img2"]
    for record in records.values():
        check_record(record, adapter)

    # Vocabulary names where one fits, the user's own name otherwise; no_finding always.
    assert adapter.label_names == ["no_finding", "effusion", "nodule", "covid19", "My Rare Sign"]
    assert adapter.has_boxes

    first = records["scans/a b/img 1"]
    assert first.labels == {"no_finding": 0, "effusion": 1, "nodule": 1, "covid19": 0, "My Rare Sign": 0}
    assert first.source_labels == {"labels": ["Nodule", "Pleural Effusion"]}
    assert first.boxes[0].label == "nodule" and first.boxes[0].as_list() == [10, 12, 30, 28]
    assert (first.patient_id, first.split) == ("P1", "train")

    normal = records["scans/été/img2"]
    assert normal.labels["no_finding"] == 1 and sum(normal.labels.values()) == 1
    assert normal.split in ("train", "val", "test")  # patient-wise: derived from P1
    assert {i for i, r in records.items() if r.healthy} == {"scans/été/img2"}  # "No Finding", written out

    rare = records["scans/img3"]
    assert rare.patient_id == "scans/img3"  # no patient id -> the image id
    assert rare.labels["My Rare Sign"] == 1 and rare.split == "test"

    absolute = records["scans/img4"]
    assert absolute.labels["covid19"] == 1 and absolute.split == "val"
    assert absolute.load().dtype == np.uint16  # a 16-bit PNG stays deep

    image = first.load()
    assert image.shape == (64, 64) and image.dtype == np.uint8


def test_bad_rows_are_rejected_with_a_reason(user_root):
    _, rejects = collect("csv", user_root)
    reasons = [e["reason"] for e in rejects.entries]
    assert len(reasons) == 6
    assert any("line 6" in r and "unparseable boxes JSON" in r for r in reasons)
    assert reject_reasons(rejects)["../outside.png"].endswith("path escapes --root ('../outside.png')")
    assert any("labels is NaN" in r for r in reasons)
    assert any("duplicate id 'scans/img3' (first on line 4)" in r for r in reasons)
    assert any("unknown split 'holdout'" in r for r in reasons)
    assert any("no finding together with findings" in r for r in reasons)


def test_patient_wise_split_is_deterministic_and_shared_by_a_patient(user_root):
    a, _ = collect("csv", user_root, seed=3)
    b, _ = collect("csv", user_root, seed=3)
    assert {k: r.split for k, r in a.items()} == {k: r.split for k, r in b.items()}


def test_n_limits_records_in_file_order(user_root):
    records, rejects = collect("csv", user_root, n=2)
    assert list(records) == ["scans/a b/img 1", "scans/été/img2"]
    assert len(rejects) == 0  # rows past the n-th record are not examined for the build


def test_missing_header_or_column_is_one_clear_error(tmp_path):
    write_csv(tmp_path / "labels.csv", ["file", "labels"], [["a.png", ""]])
    with pytest.raises(LeaderError, match="lacks column\\(s\\) path; expected columns path,labels"):
        collect("csv", tmp_path)

    (tmp_path / "labels.csv").write_text("")
    with pytest.raises(LeaderError, match="no header row"):
        collect("csv", tmp_path)

    (tmp_path / "labels.csv").unlink()
    with pytest.raises(LeaderError, match="expected a CSV with columns path,labels"):
        collect("csv", tmp_path)


def test_csv_path_option_and_case_insensitive_header(tmp_path):
    write_png(tmp_path / "x.png")
    write_csv(tmp_path / "meta" / "mine.csv", ["Path", "Labels"], [["x.png", "Cardiomegaly"]])
    write_csv(tmp_path / "other.csv", ["path", "labels"], [])
    records, _ = collect("csv", tmp_path, adapter=CsvDataset(csv_path="meta/mine.csv"))
    assert records["x"].labels == {"no_finding": 0, "cardiomegaly": 1}


def test_box_numbers_that_cannot_be_parsed_reject_the_row(tmp_path):
    bad = json.dumps([{"label": "mass", "x0": "left", "y0": 1, "x1": 5, "y1": 5}])
    nan = '[{"label": "mass", "x0": NaN, "y0": 1, "x1": 5, "y1": 5}]'
    write_csv(tmp_path / "labels.csv", ["path", "labels", "boxes"], [["a.png", "", bad], ["b.png", "", nan]])
    records, rejects = collect("csv", tmp_path)
    assert records == {}
    assert reject_reasons(rejects) == {
        "a.png": "labels.csv line 2: box 0 has a non-numeric x0 ('left')",
        "b.png": "labels.csv line 3: box 0 has a non-finite x0 (nan)",
    }


def test_rows_of_the_wrong_width(tmp_path):
    (tmp_path / "labels.csv").write_text(
        "path,labels,boxes\n"
        "a.png,Mass,,,\n"                                                  # padded by a spreadsheet: fine
        'b.png,Mass,[{"label": "mass", "x0": 1, "y0": 1, "x1": 5, "y1": 5}]\n'  # unquoted JSON commas
        "c.png\n",                                                         # truncated
        encoding="utf-8",
    )
    records, rejects = collect("csv", tmp_path)
    assert list(records) == ["a"]
    assert reject_reasons(rejects) == {
        "b.png": "labels.csv line 3: has 7 cells but the header has 3",
        "c.png": "labels.csv line 4: has 1 cells but the header has 3",
    }


def test_harmonise_maps_spellings_onto_the_vocabulary():
    assert harmonise("Pleural_Thickening") == "pleural_thickening"
    assert harmonise(" pleural effusion ") == "effusion"
    assert harmonise("No Finding") == "no_finding"
    assert harmonise("Weird-Thing") == "Weird-Thing"


def test_cli_build(user_root, tmp_path):
    samples, manifest, rejects = build_with_cli("csv", user_root, tmp_path / "out", "--max-reject-fraction", "1")
    assert manifest.n_samples == 4 and manifest.has_boxes
    assert manifest.label_names == ["no_finding", "effusion", "nodule", "covid19", "My Rare Sign"]
    first = samples["scans/a b/img 1"]
    assert first.meta["key"] == sample_key("csv", "scans/a b/img 1")
    assert first.meta["boxes"] == [{"label": "nodule", "x0": 10.0, "y0": 12.0, "x1": 30.0, "y1": 28.0,
                                    "source_label": "Nodule"}]
    assert [p["kind"] for p in first.meta["patches"]] == ["diseased"]
    # The normal image lies in the test split (its patient's), the nodule in train: healthy patches
    # balance each split, so train's is a shortfall and test, without boxes, needs none.
    assert samples["scans/été/img2"].meta["split"] == "test" and samples["scans/été/img2"].meta["patches"] == []
    assert manifest.counts["by_split"]["train"]["healthy_shortfall"] == 1
    assert samples["scans/img3"].meta["size"] == [64, 51]  # 80x64 stored with long side 64
    assert sorted(r["path"] for r in rejects)[0] == "../outside.png" and len(rejects) == 6


def test_cli_csv_path_option(tmp_path):
    root = tmp_path / "data"
    write_png(root / "a.png", radiograph(64, seed=1))
    write_png(root / "b.png", radiograph(64, seed=2))
    write_csv(root / "lists" / "mine.csv", ["path", "labels", "split"], [["a.png", "Mass", "test"], ["b.png", "", "train"]])
    write_csv(root / "unrelated.csv", ["x"], [])
    samples, manifest, rejects = build_with_cli("csv", root, tmp_path / "out", "--option", "csv_path=lists/mine.csv")
    assert manifest.label_names == ["no_finding", "mass"] and not manifest.has_boxes
    assert samples["a"].meta["labels"] == {"mass": 1, "no_finding": 0} and samples["a"].meta["split"] == "test"
    assert samples["b"].meta["patches"] == []  # no boxes anywhere: no healthy patches either
    # An empty labels cell lists no finding but does not say the image is normal.
    assert samples["b"].meta["labels"]["no_finding"] == 1 and not samples["b"].meta["healthy"]
    assert rejects == []
