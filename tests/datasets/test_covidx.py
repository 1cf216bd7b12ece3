"""COVIDx: space-separated list files in two label schemes, official train/test(/val) splits."""
from __future__ import annotations

import pytest

from leader.errors import LeaderError
from leader.shards.records import sample_key
from leader.shards.datasets import create_dataset
from leader.shards.datasets.covidx import parse_line

from .fixtures_files import build_with_cli, check_record, collect, radiograph, reject_reasons, write_png, write_text


def write_images(root, split, names):
    for i, name in enumerate(names):
        write_png(root / split / name, radiograph(72, seed=hash(name) % 1000))


@pytest.fixture()
def covidx4_root(tmp_path):
    """COVIDx CXR-4 style: positive/negative with a source column, and a val.txt."""
    root = tmp_path / "covidx4"
    write_text(root / "train.txt", "\n".join([
        "419639-003251 MIDRC-RICORD-1C-419639-003251-46647-0.png positive ricord",
        "a1b2 0a1b2c3d-rsna.png negative rsna",
        "P7 img with space.png negative bimcv",
        "P8 lonely.png maybe sirm",     # unknown label
        "P9",                          # too few fields
        "",
    ]))
    write_text(root / "val.txt", "P10 v1.png positive stonybrook\n")
    write_text(root / "test.txt", "P11 t1.jpg negative rsna\nP12 t2.png positive cohen\n")
    write_images(root, "train", ["MIDRC-RICORD-1C-419639-003251-46647-0.png", "0a1b2c3d-rsna.png", "img with space.png", "lonely.png"])
    write_images(root, "val", ["v1.png"])
    write_png(root / "test" / "t1.jpg", radiograph(72))  # PNG bytes behind a .jpg name still read
    write_images(root, "test", ["t2.png"])
    return root


def test_cxr4_records_labels_and_overlap_flags(covidx4_root):
    adapter = create_dataset("covidx")
    records, rejects = collect("covidx", covidx4_root, adapter=adapter)
    assert sorted(records) == ["0a1b2c3d-rsna", "MIDRC-RICORD-1C-419639-003251-46647-0", "img with space", "t1", "t2", "v1"]
    for r in records.values():
        check_record(r, adapter)

    positive = records["MIDRC-RICORD-1C-419639-003251-46647-0"]
    assert positive.labels == {"covid19": 1}  # CXR-4 says nothing about pneumonia or normal
    assert positive.patient_id == "419639-003251" and positive.split == "train"
    assert positive.source_labels == {"label": "positive", "source": "ricord"}
    assert "also_in" not in positive.extra

    rsna = records["0a1b2c3d-rsna"]
    assert rsna.labels == {"covid19": 0} and rsna.extra["also_in"] == ["rsna", "nih14"]
    assert records["t1"].extra["also_in"] == ["rsna", "nih14"] and records["t1"].split == "test"
    assert records["v1"].split == "val"  # the release's own val list
    assert records["img with space"].path == "train/img with space.png"
    assert not any(r.healthy for r in records.values())  # "negative" pools normal and pneumonia
    assert records["t1"].load().shape == (72, 72)

    reasons = reject_reasons(rejects)
    assert "unknown label" in reasons["train.txt:4"]
    assert "expected 'patient_id filename label [source]'" in reasons["train.txt:5"]
    assert len(rejects) == 2


def test_older_three_class_release_without_val_list(tmp_path):
    write_text(tmp_path / "train_split.txt", "\n".join(f"{i} n{i}.png {label}" for i, label in enumerate(["COVID-19", "pneumonia", "normal"] * 70)))
    write_text(tmp_path / "test_split.txt", "100 x.png normal\n")
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    records, rejects = collect("covidx", tmp_path)
    assert len(rejects) == 0
    assert records["n0"].labels == {"covid19": 1, "pneumonia": None, "no_finding": 0}
    assert records["n1"].labels == {"covid19": 0, "pneumonia": 1, "no_finding": 0}
    assert records["n2"].labels == {"covid19": 0, "pneumonia": 0, "no_finding": 1}
    assert records["n0"].source_labels == {"label": "COVID-19"}
    assert records["n2"].healthy and not records["n1"].healthy and not records["n0"].healthy
    train_splits = {r.split for r in records.values() if r.extra["official_split"] == "train"}
    assert train_splits == {"train", "val"}  # val carved patient-wise from train


def test_parse_line_handles_both_schemes_and_spaces():
    assert parse_line("p1 a.png positive rsna") == ("p1", "a.png", "positive", "rsna")
    assert parse_line("p1 a.png COVID-19") == ("p1", "a.png", "COVID-19", None)
    assert parse_line("p1 my file.png normal") == ("p1", "my file.png", "normal", None)


def test_missing_list_or_folder_is_one_clear_error(covidx4_root):
    (covidx4_root / "test.txt").unlink()
    with pytest.raises(LeaderError, match="expected test.txt or test_split.txt"):
        collect("covidx", covidx4_root)
    write_text(covidx4_root / "test.txt", "")
    for p in (covidx4_root / "val").iterdir():
        p.unlink()
    (covidx4_root / "val").rmdir()
    with pytest.raises(LeaderError, match="val.txt lists images, but the folder .*val does not exist"):
        collect("covidx", covidx4_root)


def test_cli_build(covidx4_root, tmp_path):
    samples, manifest, rejects = build_with_cli("covidx", covidx4_root, tmp_path / "out", "--max-reject-fraction", "1")
    assert manifest.n_samples == 6 and manifest.splits == {"train": 3, "val": 1, "test": 2}
    assert manifest.label_counts["covid19"] == {"pos": 3, "neg": 3, "unknown": 0}
    assert samples["img with space"].meta["key"] == sample_key("covidx", "img with space")
    assert len(rejects) == 2
