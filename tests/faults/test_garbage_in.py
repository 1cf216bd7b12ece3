"""Garbage in: every broken input is a logged rejection or one clear error, and the counts add up.

One users' dataset (the `csv` adapter) holds good images next to one of each kind of bad input a
real collection contains. `leader shards build csv` must take every good image, reject every bad
one with its reason in rejects.jsonl, and report exact counts: nothing dropped, nothing twice.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.datasets.fixtures_dicom import write_dicom as dicom_fixture
from tests.faults.conftest import assert_one_line_error, invoke


def radiograph(seed: int, shape=(40, 48), dtype=np.uint8) -> np.ndarray:
    top = np.iinfo(dtype).max if dtype == np.uint8 else 4095       # 16-bit files store 12 bits
    return (np.random.default_rng(seed).random(shape) * top).astype(dtype)


def write_png(path: Path, pixels: np.ndarray) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def write_jpeg(path: Path, pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def write_dicom(path: Path, pixels: np.ndarray | None, photometric: str = "MONOCHROME2") -> None:
    """A 12-bit DX radiograph (the dataset fixtures' writer); pixels=None leaves out the pixel data."""
    absent = pixels is None
    dicom_fixture(path, np.zeros((40, 48), np.uint16) if absent else pixels, photometric=photometric,
                  bits_stored=12, include_pixels=not absent)


def box(label: str, x0: float, y0: float, x1: float, y1: float) -> str:
    return json.dumps([{"label": label, "x0": x0, "y0": y0, "x1": x1, "y1": y1}])


@pytest.fixture(scope="module")
def broken_dataset(tmp_path_factory):
    """A CSV dataset and what must become of each of its rows: ("sample", path) or ("reject", path, why)."""
    root = tmp_path_factory.mktemp("garbage") / "data"
    images = root / "images"
    png = write_png(images / "good0.png", radiograph(0))
    for i, name in enumerate(["good1", "good2", "nan_labels", "surplus", "overhang", "inverted"], start=1):
        write_png(images / f"{name}.png", radiograph(i))
    write_png(images / "é ü" / "pâtient 1.png", radiograph(7))             # unicode and spaces are fine
    write_png(images / "deep16.png", radiograph(8, dtype=np.uint16))        # 12 bits in a 16-bit PNG
    write_dicom(images / "good.dcm", radiograph(9, dtype=np.uint16))
    jpeg = write_jpeg(images / "whole.jpg", radiograph(10))
    (images / "truncated.png").write_bytes(png[: len(png) // 2])
    (images / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (images / "empty.png").write_bytes(b"")
    (images / "notes.png").write_text("this is a radiology report, not an image\n")
    write_dicom(images / "no_pixels.dcm", None)
    write_dicom(images / "palette.dcm", radiograph(11, dtype=np.uint16), photometric="PALETTE COLOR")
    write_png(images / "black16.png", np.zeros((40, 48), np.uint16))
    write_png(root.parent / "outside.png", radiograph(12))

    header = ["path", "labels", "patient_id", "boxes", "notes"]           # "notes": an extra column, ignored
    rows = [
        (["images/good0.png", "Nodule", "p0", box("nodule", 5, 5, 20, 20), "x"], ("sample",)),
        (["images/good1.png", "", "p1", "", ""], ("sample",)),
        (["images/good2.png", "effusion", "p2", "", ""], ("sample",)),
        (["images/é ü/pâtient 1.png", "", "p3", "", ""], ("sample",)),
        (["images/deep16.png", "", "p4", "", ""], ("sample",)),
        (["images/good.dcm", "", "p5", "", ""], ("sample",)),
        (["images/whole.jpg", "", "p6", "", ""], ("sample",)),
        (["images/truncated.png", "", "p7", "", ""], ("reject", "unreadable image: truncated image file")),
        (["images/cut.jpg", "", "p8", "", ""], ("reject", "unreadable image: truncated image file")),
        (["images/empty.png", "", "p9", "", ""], ("reject", "unreadable image: empty file (0 bytes)")),
        (["images/notes.png", "", "p10", "", ""], ("reject", "unreadable image: not an image")),
        (["images/no_pixels.dcm", "", "p11", "", ""], ("reject", "unreadable image: DICOM has no pixel data")),
        (["images/palette.dcm", "", "p12", "", ""],
         ("reject", "unreadable image: unsupported DICOM photometric interpretation 'PALETTE COLOR'")),
        (["images/black16.png", "", "p13", "", ""], ("reject", "blank image")),
        (["images/missing.png", "", "p14", "", ""], ("reject", "unreadable image: file not found")),
        (["nan", "nodule", "p15", "", ""], ("reject", "path is empty or NaN")),
        (["images/nan_labels.png", "NaN", "p16", "", ""], ("reject", "labels is NaN")),
        (["images/surplus.png", "", "p17", "", "", "surplus"], ("reject", "has 6 cells but the header has 5")),
        (["images/overhang.png", "mass", "p18", box("mass", 10, 10, 400, 30), ""],
         ("reject", "lies outside the 48x40 image")),
        (["images/inverted.png", "mass", "p19", box("mass", 30, 30, 10, 10), ""], ("reject", "inverted or empty")),
        (["images/good1.png", "", "p20", "", ""], ("reject", "duplicate id 'images/good1' (first on line 3)")),
        (["images/../../outside.png", "", "p21", "", ""], ("reject", "path escapes --root")),
        ([str(root.parent / "outside.png"), "", "p22", "", ""], ("reject", "path escapes --root")),
    ]
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(cells for cells, _ in rows)
    return root, rows


def test_every_bad_input_is_rejected_with_its_reason_and_counted_exactly(broken_dataset, tmp_path):
    root, rows = broken_dataset
    out = tmp_path / "shards"
    result = invoke("shards", "build", "csv", "--root", root, "--out", out, "--size", "32",
                    "--max-reject-fraction", "1", "--json")
    assert result.code == 0, result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout)

    expected_samples = sorted(cells[0] for cells, fate in rows if fate[0] == "sample")
    expected_rejects = [(cells[0], fate[1]) for cells, fate in rows if fate[0] == "reject"]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert summary["samples"] == len(expected_samples) == 7
    assert summary["rejects"] == len(rejects) == len(expected_rejects) == 16
    assert summary["samples"] + summary["rejects"] == len(rows), "every CSV row is a sample or a reject"
    assert sum(summary["reject_reasons"].values()) == 16

    # Entry by entry: each bad row has exactly one rejection, naming its path and its problem.
    unmatched = list(rejects)
    for path, reason in expected_rejects:
        found = [r for r in unmatched if r["path"] == path and reason in r["reason"]]
        assert len(found) == 1, (path, reason, [r for r in rejects if r["path"] == path])
        unmatched.remove(found[0])
    assert unmatched == []

    from leader.shards.layout import iter_samples

    samples = list(iter_samples(out))
    assert sorted(s.meta["path"] for s in samples) == expected_samples
    by_path = {s.meta["path"]: s for s in samples}
    assert by_path["images/deep16.png"].meta["bits"] == 16
    assert by_path["images/good0.png"].meta["boxes"][0]["label"] == "nodule"
    unicode = by_path["images/é ü/pâtient 1.png"]
    assert unicode.meta["image_id"] == "images/é ü/pâtient 1" and unicode.image().shape == (27, 32)
    assert len({s.key for s in samples}) == len(samples)


def test_threshold_fails_the_build_in_one_line_and_writes_no_manifest(broken_dataset, tmp_path):
    root, _ = broken_dataset
    out = tmp_path / "shards"
    result = invoke("shards", "build", "csv", "--root", root, "--out", out, "--size", "32")
    line = assert_one_line_error(result, "16 of 23 inputs were rejected", "--max-reject-fraction", "rejects.jsonl")
    assert str(out / "rejects.jsonl") in line
    assert not (out / "manifest.json").exists()
    assert len((out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()) == 16


@pytest.mark.parametrize("content, words", [
    ("images/a.png,nodule\nimages/b.png,\n", ["lacks column(s) path, labels"]),           # no header row
    ("", ["has no header row"]),
    ("file,findings\nimages/a.png,nodule\n", ["lacks column(s) path, labels", "found file,findings"]),
    (b"path,labels\n\xff\xfe broken bytes\n", ["is not UTF-8 text"]),
])
def test_a_csv_without_a_usable_header_is_one_clear_error(tmp_path, content, words):
    root = tmp_path / "data"
    root.mkdir()
    path = root / "labels.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = invoke("shards", "build", "csv", "--root", root, "--out", tmp_path / "shards", "--size", "32")
    line = assert_one_line_error(result, "csv:", *words)
    assert str(path) in line
    assert not (tmp_path / "shards" / "manifest.json").exists()


def test_a_missing_root_or_label_file_is_one_clear_error(tmp_path):
    assert_one_line_error(invoke("shards", "build", "csv", "--root", tmp_path / "nowhere", "--out", tmp_path / "s"),
                          "--root", "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke("shards", "build", "csv", "--root", tmp_path / "empty", "--out", tmp_path / "s"),
                          "expected a CSV with columns path,labels")
