"""node21: the NODE21 nodule detection set, 1024x1024 preprocessed frontal CXRs as ``.mha``.

Expected ``--root`` layout (the challenge's ``cxr_images/proccessed_data`` folder, or the folder
that contains it)::

    ROOT/
      metadata.csv          img_name,label,x,y,width,height  (an extra leading index column is fine)
      images/<img_name>     e.g. images/n0001.mha  (img_name with or without ".mha")

``metadata.csv`` has one row per nodule (label 1, box ``x, y, width, height`` in pixels) and one
row per control image (label 0, box empty or zero). Labels: ``nodule`` 1/0. Boxes become
``[x, y, x + width, y + height]``, in the pixels of the 1024x1024 preprocessed images (the
record's frame; resized copies get their boxes scaled).

Healthy: the control images (label 0). They are NODE21's negatives, "no nodule"; the dataset has
no other label to rule out other findings. The images come from JSRT, PadChest, ChestX-ray14 and Open-I,
but the file names do not say which, so no per-image ``also_in`` is set; the overlap note says it.

Splits: NODE21's public set has no official split, so the split is patient-wise (70/15/15). It
has no patient ids either; the image id (file name without ``.mha``) stands in for the patient.

An image is rejected whole when any of its rows has a label or box number that cannot be parsed,
or when its rows mix label 0 and 1: a partial set of boxes would let a healthy patch be cut over
an unboxed nodule.
"""
from __future__ import annotations

import csv
import functools
import itertools
import math
from pathlib import Path
from typing import Iterator

from leader.errors import LeaderError
from leader.shards.datasets import register_dataset
from leader.shards.datasets._checks import require_root
from leader.shards.imageio import read_image
from leader.shards.records import Box, RejectLog, SourceRecord
from leader.shards.vocabulary import patient_split

COLUMNS = ("img_name", "label", "x", "y", "width", "height")
FRAME = (1024, 1024)   # every preprocessed image; metadata.csv's boxes are in its pixels
# Where metadata.csv sits when ROOT is the unpacked challenge download rather than its data folder.
DATA_DIRS = (".", "cxr_images/proccessed_data", "proccessed_data")


class _RowError(ValueError):
    pass


@register_dataset("node21")
class Node21:
    """NODE21: 1024x1024 .mha CXRs with nodule boxes (metadata.csv); patient-wise split."""

    name = "node21"
    label_names = ["nodule"]
    has_boxes = True
    has_landmarks = False
    overlap_note = "NODE21 draws its images from JSRT, PadChest, ChestX-ray14 and Open-I (which image is which is not published)"

    def records(self, root: Path | None, rejects: RejectLog, *, seed: int, n: int | None) -> Iterator[SourceRecord]:
        root = require_root(root, f"node21: --root must be the folder that holds metadata.csv and images/; got {root}")
        data_dir = find_data_dir(Path(root))
        rows_by_image = read_metadata(data_dir / "metadata.csv")
        return itertools.islice(self._emit(Path(root), data_dir, rows_by_image, rejects, seed), n)

    def _emit(self, root: Path, data_dir: Path, rows_by_image: dict, rejects: RejectLog, seed: int) -> Iterator[SourceRecord]:
        metadata = (data_dir / "metadata.csv").relative_to(root).as_posix()
        for img_name in sorted(rows_by_image):
            rows = rows_by_image[img_name]
            if not img_name:
                for line, _ in rows:
                    rejects.add(f"{metadata}:{line}", f"metadata.csv line {line} has no img_name")
                continue
            file_name = img_name if Path(img_name).suffix else f"{img_name}.mha"
            file = data_dir / "images" / file_name
            relative = file.relative_to(root).as_posix()
            try:
                label, boxes = parse_rows(rows)
            except _RowError as e:
                rejects.add(relative, f"metadata.csv: {e}")
                continue
            image_id = Path(file_name).stem
            yield SourceRecord(
                dataset=self.name,
                image_id=image_id,
                path=relative,
                load=functools.partial(read_image, str(file)),
                patient_id=image_id,
                split=patient_split(self.name, image_id, seed),
                labels={"nodule": label},
                source_labels={"label": rows[0][1]["label"], "rows": len(rows)},
                boxes=boxes,
                landmarks=None,
                healthy=label == 0,
                frame=FRAME,
            )


def find_data_dir(root: Path) -> Path:
    for candidate in DATA_DIRS:
        if (root / candidate / "metadata.csv").is_file():
            return (root / candidate) if candidate != "." else root
    raise LeaderError(
        f"node21: expected metadata.csv (and images/) in {root} or {root}/cxr_images/proccessed_data; "
        "is --root the folder of the NODE21 download?"
    )


def read_metadata(path: Path) -> dict[str, list[tuple[int, dict]]]:
    """img_name -> its (line number, row) pairs, in file order."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise LeaderError(f"node21: {path} lacks column(s) {', '.join(missing)}; expected {','.join(COLUMNS)}")
        reader.fieldnames = header
        rows: dict[str, list] = {}
        for row in reader:
            name = (row.get("img_name") or "").strip()
            rows.setdefault(name, []).append((reader.line_num, row))
    return rows


def parse_rows(rows: list[tuple[int, dict]]) -> tuple[int, list[Box]]:
    """The image's nodule label and boxes from all its rows, or `_RowError`."""
    labels, boxes = set(), []
    for line, row in rows:
        raw = (row.get("label") or "").strip()
        try:
            value = float(raw)
        except ValueError:
            raise _RowError(f"line {line}: label {raw!r} is not 0 or 1") from None
        if value not in (0.0, 1.0):
            raise _RowError(f"line {line}: label {raw!r} is not 0 or 1")
        labels.add(int(value))
        if value == 1.0:
            numbers = []
            for column in ("x", "y", "width", "height"):
                cell = (row.get(column) or "").strip()
                try:
                    number = float(cell)
                except ValueError:
                    raise _RowError(f"line {line}: {column} {cell!r} is not a number") from None
                if not math.isfinite(number):
                    raise _RowError(f"line {line}: {column} {cell!r} is not finite")
                numbers.append(number)
            x, y, w, h = numbers
            boxes.append(Box("nodule", x, y, x + w, y + h))
    if len(labels) > 1:
        raise _RowError(f"rows on lines {[line for line, _ in rows]} give both label 0 and 1")
    return labels.pop(), boxes
