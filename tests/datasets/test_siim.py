"""SIIM-ACR: nested DICOM folders, ` EncodedPixels` (leading space), column-major RLE with relative
(stage 1) or absolute (stage 2) starts, rows of one image united, masks stored beside the image."""
from __future__ import annotations

import numpy as np
import pytest

from leader.errors import LeaderError
from leader.shards.datasets import create_dataset
from leader.shards.datasets.siim import decode_mask, decode_siim_rle, encode_mask
from leader.shards.masks import decode_masks
from leader.shards.records import RejectLog

from .fixtures_dicom import build_with_cli, phantom, reasons, write_csv, write_dicom

# Drawn by hand on a 4-row, 3-column image; column-major order numbers the pixels down each column:
#   col 0 holds flat pixels 0-3, col 1 pixels 4-7, col 2 pixels 8-11.
HAND = np.array([[0, 1, 0],
                 [1, 1, 0],
                 [1, 0, 0],
                 [0, 0, 1]], dtype=bool)
HAND_ABSOLUTE = "1 2 4 2 11 1"     # runs at pixels 1-2, 4-5 and 11
HAND_RELATIVE = "1 2 1 2 5 1"      # the same runs, each start counted from the previous run's end


def siim_rle(mask: np.ndarray, form: str = "relative") -> str:
    """Encode as SIIM did: runs down the columns; starts relative to the previous run's end (stage 1)
    or absolute (stage 2)."""
    flat = np.concatenate([[0], mask.ravel(order="F").astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    out, end = [], 0
    for start, stop in zip(edges[0::2], edges[1::2]):
        out += [start - end if form == "relative" else start, stop - start]
        end = stop
    return " ".join(str(v) for v in out)


def rect(y0, y1, x0, x1, shape=(64, 64)):
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


TWO_REGIONS = rect(5, 15, 10, 20) | rect(40, 50, 30, 34)


def write_siim(root, form="relative", label_file="train-rle.csv"):
    images = {
        "1.2.1": "jpeg", "1.2.2": "jpeg", "1.2.3": None, "1.2.4": None, "1.2.5": None, "1.2.6": None,
        "1.2.8": None,  # no label row
    }
    for i, (image_id, compression) in enumerate(images.items()):
        write_dicom(root / "dicom-images-train" / f"1.3.{i}" / f"1.4.{i}" / f"{image_id}.dcm",
                    phantom(64, 64, seed=i), compression=compression, view=None)
    rows = [
        ("1.2.1", siim_rle(TWO_REGIONS, form)),
        ("1.2.2", "-1"),
        ("1.2.3", siim_rle(rect(10, 20, 10, 20), form)),
        ("1.2.3", siim_rle(rect(15, 30, 15, 25), form)),  # a second, overlapping mask row
        ("1.2.4", "-1"),
        ("1.2.4", siim_rle(rect(1, 2, 1, 2), form)),  # -1 and a mask
        ("1.2.5", "12 abc"),
        ("1.2.6", "4000 200"),  # past the end of a 64x64 mask
        ("1.2.7", "-1"),  # no image
    ]
    write_csv(root / label_file, ["ImageId", " EncodedPixels"], [(i, " " + r) for i, r in rows])
    return root


def test_both_forms_decode_to_the_mask_drawn_by_hand():
    assert np.array_equal(decode_siim_rle(HAND_RELATIVE, 4, 3, "relative"), HAND)
    assert np.array_equal(decode_siim_rle(HAND_ABSOLUTE, 4, 3, "absolute"), HAND)
    # Read in the wrong form, each is refused rather than decoded into another mask.
    with pytest.raises(ValueError, match="runs past the end of a 3x4 mask"):
        decode_siim_rle(HAND_ABSOLUTE, 4, 3, "relative")
    with pytest.raises(ValueError, match="overlap or go backwards"):
        decode_siim_rle(HAND_RELATIVE, 4, 3, "absolute")
    # The test encoder writes SIIM's forms, and the compact absolute form round-trips.
    assert siim_rle(HAND, "relative") == HAND_RELATIVE and siim_rle(HAND, "absolute") == HAND_ABSOLUTE
    assert np.array_equal(decode_mask(encode_mask(HAND)), HAND)


@pytest.mark.parametrize("form, label_file", [("relative", "train-rle.csv"), ("absolute", "stage_2_train.csv")])
def test_rows_of_one_image_are_united_in_either_form(tmp_path, form, label_file):
    # The hand-drawn mask split over two rows, as SIIM splits an image with two regions.
    upper, lower = HAND.copy(), HAND.copy()
    upper[2:], lower[:2] = False, False
    root = tmp_path / "siim"
    write_dicom(root / "dicom-images-train" / "s" / "r" / "9.9.dcm", phantom(4, 3), view=None)
    write_csv(root / label_file, ["ImageId", " EncodedPixels"],
              [("9.9", " " + siim_rle(upper, form)), ("9.9", " " + siim_rle(lower, form))])
    adapter = create_dataset("siim")
    (record,) = adapter.records(root, RejectLog(), seed=0, n=None)
    assert record.source_labels == {"n_masks": 2}
    assert np.array_equal(record.masks(4, 3).planes["pneumothorax"], HAND)
    assert adapter.mask_notes["rle_starts"] == form


def test_records(tmp_path):
    root = write_siim(tmp_path / "siim")
    rejects = RejectLog()
    adapter = create_dataset("siim")
    records = {r.image_id: r for r in adapter.records(root, rejects, seed=0, n=None)}
    assert sorted(records) == ["1.2.1", "1.2.2", "1.2.3"]
    assert adapter.mask_notes["rle_starts"] == "relative" and adapter.mask_notes["rle_file"] == "train-rle.csv"

    first = records["1.2.1"]
    assert first.labels == {"pneumothorax": 1} and first.source_labels == {"n_masks": 1}
    assert [b.as_list() for b in first.boxes] == [[10.0, 5.0, 20.0, 15.0], [30.0, 40.0, 34.0, 50.0]]
    assert first.path == "dicom-images-train/1.3.0/1.4.0/1.2.1.dcm"
    assert first.extra == {"also_in": ["nih14"]}
    assert np.array_equal(first.masks(64, 64).planes["pneumothorax"], TWO_REGIONS)
    assert first.load().shape == (64, 64)  # JPEG baseline DICOM

    assert records["1.2.2"].labels == {"pneumothorax": 0} and records["1.2.2"].boxes == []
    assert not records["1.2.2"].masks(64, 64).planes["pneumothorax"].any()   # -1: an empty mask
    merged = records["1.2.3"]
    assert merged.source_labels == {"n_masks": 2}
    assert [b.as_list() for b in merged.boxes] == [[10.0, 10.0, 25.0, 30.0]]
    assert merged.masks(64, 64).planes["pneumothorax"].sum() == 100 + 150 - 25

    bad = reasons(rejects)
    assert "both -1 and a mask" in bad["dicom-images-train/1.3.3/1.4.3/1.2.4.dcm"]
    assert "invalid RLE" in bad["dicom-images-train/1.3.4/1.4.4/1.2.5.dcm"]
    assert "runs past the end of a 64x64 mask" in bad["dicom-images-train/1.3.5/1.4.5/1.2.6.dcm"]
    assert bad["1.2.7.dcm"] == "image file not found under --root"
    assert bad["dicom-images-train/1.3.6/1.4.6/1.2.8.dcm"] == "no label row: the image is not in train-rle.csv"
    assert len(rejects) == 5


def test_a_file_mixing_both_forms_is_refused(tmp_path):
    root = tmp_path / "siim"
    for image_id in ("1", "2"):
        write_dicom(root / "dicom-images-train" / image_id / f"{image_id}.dcm", phantom(4, 3), view=None)
    write_csv(root / "train-rle.csv", ["ImageId", " EncodedPixels"], [("1", HAND_RELATIVE), ("2", HAND_ABSOLUTE)])
    with pytest.raises(LeaderError, match="mixes RLE forms: 1 rows read only with relative starts"):
        list(create_dataset("siim").records(root, RejectLog(), seed=0, n=None))


def test_wrong_root(tmp_path):
    with pytest.raises(LeaderError, match="expected train-rle.csv or stage_2_train.csv under"):
        list(create_dataset("siim").records(tmp_path, RejectLog(), seed=0, n=None))
    write_csv(tmp_path / "train-rle.csv", ["ImageId", " EncodedPixels"], [])
    with pytest.raises(LeaderError, match="no .dcm files under"):
        list(create_dataset("siim").records(tmp_path, RejectLog(), seed=0, n=None))
    with pytest.raises(LeaderError, match="rle_file=stage_2_train.csv names no file"):
        list(create_dataset("siim", rle_file="stage_2_train.csv").records(tmp_path, RejectLog(), seed=0, n=None))


@pytest.mark.parametrize("form, label_file", [("relative", "train-rle.csv"), ("absolute", "stage_2_train.csv")])
def test_cli_build_stores_the_masks_and_names_the_form(tmp_path, form, label_file):
    root = write_siim(tmp_path / "siim", form, label_file)
    manifest, samples, rejects = build_with_cli("siim", root, tmp_path / "out", size=32)
    assert sorted(samples) == ["1.2.1", "1.2.2", "1.2.3"]
    meta = samples["1.2.1"].meta
    assert meta["boxes"][0] == {"label": "pneumothorax", "x0": 5.0, "y0": 2.5, "x1": 10.0, "y1": 7.5}
    assert {p["kind"] for p in meta["patches"]} == {"diseased"}
    # "-1" means no pneumothorax, not a normal image: SIIM gives no healthy patches, and says so.
    assert samples["1.2.2"].meta["patches"] == [] and not samples["1.2.2"].meta["healthy"]
    assert manifest.notes[0].startswith("siim: no image is stated healthy")
    assert manifest.n_rejects == 5 and manifest.label_names == ["pneumothorax"]

    # The mask is stored at the stored image's size (64 -> 32: every other pixel, nearest).
    assert manifest.mask_classes == ["pneumothorax"]
    (stored,) = decode_masks(samples["1.2.1"].mask_png, manifest.mask_classes)
    assert np.array_equal(stored, TWO_REGIONS[1::2, 1::2])
    assert meta["mask"] == {"classes": ["pneumothorax"], "pixels": {"pneumothorax": 35}, "clipped_polygons": 0}
    assert not decode_masks(samples["1.2.2"].mask_png, manifest.mask_classes).any()
    masks = manifest.extra["masks"]
    assert masks["notes"]["rle_starts"] == form and masks["notes"]["rle_file"] == label_file
    assert masks["samples"] == 3 and masks["annotated"] == {"pneumothorax": 3} and masks["positive"] == {"pneumothorax": 2}
