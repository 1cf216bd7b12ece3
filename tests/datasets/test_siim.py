"""SIIM-ACR: nested DICOM folders, ` EncodedPixels` (leading space), relative column-major RLE."""
from __future__ import annotations

import numpy as np
import pytest

from leader.errors import LeaderError
from leader.shards.datasets import create_dataset
from leader.shards.datasets.siim import decode_mask, decode_siim_rle, encode_mask
from leader.shards.records import RejectLog

from .fixtures_dicom import build_with_cli, phantom, reasons, write_csv, write_dicom


def siim_rle(mask: np.ndarray) -> str:
    """Encode as SIIM did: runs down the columns, each start given relative to the previous run's end."""
    flat = np.concatenate([[0], mask.ravel(order="F").astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    out, end = [], 0
    for start, stop in zip(edges[0::2], edges[1::2]):
        out += [start - end, stop - start]
        end = stop
    return " ".join(str(v) for v in out)


def rect(y0, y1, x0, x1, shape=(64, 64)):
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def write_siim(root):
    images = {
        "1.2.1": "jpeg", "1.2.2": "jpeg", "1.2.3": None, "1.2.4": None, "1.2.5": None, "1.2.6": None,
        "1.2.8": None,  # no label row
    }
    for i, (image_id, compression) in enumerate(images.items()):
        write_dicom(root / "dicom-images-train" / f"1.3.{i}" / f"1.4.{i}" / f"{image_id}.dcm",
                    phantom(64, 64, seed=i), compression=compression, view=None)
    two_regions = rect(5, 15, 10, 20) | rect(40, 50, 30, 34)
    rows = [
        ("1.2.1", siim_rle(two_regions)),
        ("1.2.2", "-1"),
        ("1.2.3", siim_rle(rect(10, 20, 10, 20))),
        ("1.2.3", siim_rle(rect(15, 30, 15, 25))),  # a second, overlapping mask row
        ("1.2.4", "-1"),
        ("1.2.4", siim_rle(rect(1, 2, 1, 2))),  # -1 and a mask
        ("1.2.5", "12 abc"),
        ("1.2.6", "4000 200"),  # past the end of a 64x64 mask
        ("1.2.7", "-1"),  # no image
    ]
    write_csv(root / "train-rle.csv", ["ImageId", " EncodedPixels"], [(i, " " + r) for i, r in rows])
    return root


def test_rle_is_column_major_and_relative():
    # 8x8: skip 2, paint 3 (rows 2-4 of column 0); then skip 50 past that run's end (flat index
    # 5 + 50 = 55) and paint 2: row 7 of column 6 and row 0 of column 7.
    mask = decode_siim_rle("2 3 50 2", 8, 8)
    assert mask[2:5, 0].all() and mask[7, 6] and mask[0, 7] and mask.sum() == 5
    blob = rect(3, 7, 2, 6, shape=(16, 12))
    assert np.array_equal(decode_siim_rle(siim_rle(blob), 16, 12), blob)
    assert np.array_equal(decode_mask(encode_mask(blob)), blob)
    assert encode_mask(rect(1, 3, 0, 1, shape=(4, 4)))["counts"] == [1, 2]


def test_records(tmp_path):
    root = write_siim(tmp_path / "siim")
    rejects = RejectLog()
    records = {r.image_id: r for r in create_dataset("siim").records(root, rejects, seed=0, n=None)}
    assert sorted(records) == ["1.2.1", "1.2.2", "1.2.3"]

    first = records["1.2.1"]
    assert first.labels == {"pneumothorax": 1} and first.source_labels == {"n_masks": 1}
    assert [b.as_list() for b in first.boxes] == [[10.0, 5.0, 20.0, 15.0], [30.0, 40.0, 34.0, 50.0]]
    assert first.path == "dicom-images-train/1.3.0/1.4.0/1.2.1.dcm"
    assert first.extra["also_in"] == ["nih14"]
    mask = decode_mask(first.extra["mask_rle"])
    assert mask.shape == (64, 64) and mask.sum() == 100 + 40
    assert first.load().shape == (64, 64)  # JPEG baseline DICOM

    assert records["1.2.2"].labels == {"pneumothorax": 0} and records["1.2.2"].boxes == []
    assert "mask_rle" not in records["1.2.2"].extra
    merged = records["1.2.3"]
    assert merged.source_labels == {"n_masks": 2}
    assert [b.as_list() for b in merged.boxes] == [[10.0, 10.0, 25.0, 30.0]]

    bad = reasons(rejects)
    assert "both -1 and a mask" in bad["dicom-images-train/1.3.3/1.4.3/1.2.4.dcm"]
    assert "invalid RLE" in bad["dicom-images-train/1.3.4/1.4.4/1.2.5.dcm"]
    assert "past the end of a 64x64 mask" in bad["dicom-images-train/1.3.5/1.4.5/1.2.6.dcm"]
    assert bad["dicom-images-train/1.2.7.dcm"] == "image file not found under --root"
    assert bad["dicom-images-train/1.3.6/1.4.6/1.2.8.dcm"] == "no label row: the image is not in train-rle.csv"
    assert len(rejects) == 5


def test_wrong_root(tmp_path):
    write_csv(tmp_path / "train-rle.csv", ["ImageId", " EncodedPixels"], [])
    with pytest.raises(LeaderError, match="expected dicom-images-train under"):
        list(create_dataset("siim").records(tmp_path, RejectLog(), seed=0, n=None))


def test_cli_build(tmp_path):
    root = write_siim(tmp_path / "siim")
    manifest, samples, rejects = build_with_cli("siim", root, tmp_path / "out", size=32)
    assert sorted(samples) == ["1.2.1", "1.2.2", "1.2.3"]
    meta = samples["1.2.1"].meta
    assert meta["boxes"][0] == {"label": "pneumothorax", "x0": 5.0, "y0": 2.5, "x1": 10.0, "y1": 7.5}
    assert meta["extra"]["mask_rle"]["size"] == [64, 64]  # the mask stays in original pixels
    assert {p["kind"] for p in meta["patches"]} == {"diseased"}
    # "-1" means no pneumothorax, not a normal image: SIIM gives no healthy patches, and says so.
    assert samples["1.2.2"].meta["patches"] == [] and not samples["1.2.2"].meta["healthy"]
    assert manifest.notes[0].startswith("siim: no image is stated healthy")
    assert manifest.n_rejects == 5 and manifest.label_names == ["pneumothorax"]
