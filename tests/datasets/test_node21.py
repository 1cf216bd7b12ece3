"""NODE21: .mha images and a metadata.csv with one row per nodule."""
from __future__ import annotations

import numpy as np
import pytest

from leader.errors import LeaderError
from leader.shards.datasets import create_dataset

from .fixtures_files import build_with_cli, check_record, collect, radiograph, reject_reasons, write_csv, write_mha

HEADER = ["", "img_name", "label", "x", "y", "width", "height"]  # the official file's leading index column


@pytest.fixture()
def node21_root(tmp_path):
    """The challenge download as unpacked: cxr_images/proccessed_data/{metadata.csv,images/}."""
    root = tmp_path / "node21"
    data = root / "cxr_images" / "proccessed_data"
    for i, name in enumerate(["n0001", "n0002", "c0001", "c0002", "n0003", "n0004"]):
        write_mha(data / "images" / f"{name}.mha", radiograph(64, seed=i, bits=16 if i % 2 else 8))
    # Boxes on the 1024 px preprocessed images; the fixture's files are 64 px copies.
    rows = [
        [0, "n0001.mha", 1, 160, 320, 240, 192],
        [1, "n0001.mha", 1, 800, 800, 160, 160],   # a second nodule in the same image
        [2, "n0002.mha", 1, 480, 480, 320, 320],
        [3, "c0001.mha", 0, 0, 0, 0, 0],
        [4, "c0002", 0, "", "", "", ""],           # name without extension, empty box
        [5, "n0003.mha", 1, "?", 480, 320, 320],   # unparseable box number
        [6, "n0004.mha", 1, 160, 160, 80, 80],
        [7, "n0004.mha", 0, 0, 0, 0, 0],           # contradicts the row above
    ]
    write_csv(data / "metadata.csv", HEADER, rows)
    return root


def test_rows_grouped_into_images_with_boxes(node21_root):
    adapter = create_dataset("node21")
    records, rejects = collect("node21", node21_root, adapter=adapter)
    assert sorted(records) == ["c0001", "c0002", "n0001", "n0002"]
    for r in records.values():
        check_record(r, adapter)
        assert r.patient_id == r.image_id

    first = records["n0001"]
    assert first.path == "cxr_images/proccessed_data/images/n0001.mha"
    assert first.labels == {"nodule": 1}
    assert [b.as_list() for b in first.boxes] == [[160, 320, 400, 512], [800, 800, 960, 960]]
    assert first.frame == (1024, 1024)
    assert records["c0001"].labels == {"nodule": 0} and records["c0001"].boxes == []
    assert records["c0002"].labels == {"nodule": 0}
    # NODE21's negatives are its healthy images.
    assert {i for i, r in records.items() if r.healthy} == {"c0001", "c0002"}

    image = first.load()
    assert image.shape == (64, 64) and image.dtype == np.uint8
    assert records["n0002"].load().dtype == np.uint16  # a 16-bit .mha stays deep

    reasons = reject_reasons(rejects)
    assert reasons["cxr_images/proccessed_data/images/n0003.mha"] == "metadata.csv: line 7: x '?' is not a number"
    assert "give both label 0 and 1" in reasons["cxr_images/proccessed_data/images/n0004.mha"]
    assert len(rejects) == 2


def test_flat_layout_and_patient_wise_split(tmp_path):
    write_csv(tmp_path / "metadata.csv", HEADER[1:], [[f"c{i:04d}.mha", 0, 0, 0, 0, 0] for i in range(200)])
    records, _ = collect("node21", tmp_path, seed=1)
    splits = [r.split for r in records.values()]
    assert {"train", "val", "test"} == set(splits)
    again, _ = collect("node21", tmp_path, seed=1)
    assert splits == [r.split for r in again.values()]


def test_missing_metadata_or_column_is_one_clear_error(tmp_path):
    with pytest.raises(LeaderError, match="expected metadata.csv"):
        collect("node21", tmp_path)
    write_csv(tmp_path / "metadata.csv", ["img_name", "label", "x", "y"], [])
    with pytest.raises(LeaderError, match="lacks column\\(s\\) width, height"):
        collect("node21", tmp_path)


def test_cli_build(node21_root, tmp_path):
    samples, manifest, rejects = build_with_cli("node21", node21_root, tmp_path / "out", "--max-reject-fraction", "1")
    assert manifest.n_samples == 4 and manifest.label_names == ["nodule"]
    assert manifest.label_counts["nodule"] == {"pos": 2, "neg": 2, "unknown": 0}
    nodules = samples["n0001"].meta
    assert nodules["size"] == [64, 64] and nodules["bits"] == 8
    assert nodules["boxes"][0]["x1"] == pytest.approx(400 / 16, abs=1e-3)
    assert [p["kind"] for p in nodules["patches"]] == ["diseased", "diseased"]
    # Three nodule boxes, two negatives: three healthy patches where the split allows, the rest a shortfall.
    counts = manifest.counts
    assert counts["healthy_patches"] + counts["healthy_shortfall"] == counts["diseased_patches"] == 3
    assert {i for i, s in samples.items() if any(p["kind"] == "healthy" for p in s.meta["patches"])} <= {"c0001", "c0002"}
    assert samples["n0002"].meta["bits"] == 16
    assert len(rejects) == 2
