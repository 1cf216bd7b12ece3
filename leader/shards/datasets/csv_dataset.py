"""csv: the generic adapter for your own chest X-rays, described by one CSV file.

Expected ``--root`` layout::

    ROOT/
      labels.csv            (or the single *.csv in ROOT, or any file given as csv_path)
      <any folders>/<images>    PNG, JPEG, DICOM, MHA ... (anything leader.shards.imageio reads)

The CSV is UTF-8 (a BOM is fine) with a header row. Header names are matched case-insensitively.

=============  ========  ===================================================================
column         required  meaning
=============  ========  ===================================================================
path           yes       image path relative to ROOT (spaces and non-ASCII are fine); an
                         absolute path must lie inside ROOT
labels         yes       ``|``-separated finding names; empty means "no finding"
patient_id     no        empty or absent: the image id is used as the patient id
split          no        train / val / test (valid, validation mean val); empty or absent: a
                         deterministic patient-wise split (70/15/15)
boxes          no        JSON list of ``{"label", "x0", "y0", "x1", "y1"}`` in original pixels
=============  ========  ===================================================================

Other columns are ignored and not copied anywhere: only label information is kept.

Labels. Each name is harmonised by lower-casing it and turning spaces and hyphens into
underscores; if that (or a common synonym, see `SYNONYMS`) is a name of the shared vocabulary the
vocabulary name is used, otherwise the name is kept exactly as written. The dataset's label set is
the union of the harmonised names over the whole CSV plus ``no_finding``; within it a finding not
listed for an image is 0 (the CSV lists every positive finding, as NIH does), and ``no_finding`` is
1 exactly when an image has no finding. A box's label counts as a listed finding. The names as
written are kept in ``source_labels["labels"]``; a box whose label was renamed keeps the name as
written as its ``source_label``. Because the label set is only known once the CSV is read,
``label_names`` and ``has_boxes`` are filled in by `records()`.

Healthy: only a row whose labels say so explicitly ("No Finding", "normal", ...: a name that
harmonises to ``no_finding``). An empty cell lists no finding, which may only mean none was
recorded, so that image gives no healthy patches.

Boxes are in the pixels of the image file as it is (records have no separate frame).

The image id is the path relative to ROOT without its extension (``scans/a b/1.png`` ->
``scans/a b/1``); the sample key sanitiser later turns unsafe characters into ``_``.

Rows are rejected (rejects.jsonl, with the CSV line number) for: an empty or NaN path or labels
cell, a path that escapes ROOT, a wrong cell count, an unknown split, unparseable boxes JSON or
box numbers, "no finding" listed together with findings, and a second row for the same image
("duplicate id"). A missing CSV, header or required column is a `LeaderError`.

Path containment is checked lexically (after normalising ``..``), not by resolving symlinks, so an
image tree linked into ROOT works, while ``../elsewhere.png`` is still refused.
"""
from __future__ import annotations

import csv
import functools
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

from leader.errors import LeaderError
from leader.shards.datasets import register_dataset
from leader.shards.datasets._checks import require_root
from leader.shards.imageio import read_image
from leader.shards.records import Box, RejectLog, SourceRecord
from leader.shards.vocabulary import VOCABULARY, ordered, patient_split

REQUIRED_COLUMNS = ("path", "labels")
OPTIONAL_COLUMNS = ("patient_id", "split", "boxes")

# Spellings users commonly write for a vocabulary finding (after lower-casing and underscoring).
SYNONYMS = {
    "normal": "no_finding",
    "pleural_effusion": "effusion",
    "covid": "covid19",
    "covid_19": "covid19",
    "tb": "tuberculosis",
    "pulmonary_tuberculosis": "tuberculosis",
    "lung_nodule": "nodule",
    "ptx": "pneumothorax",
}

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

_NAN_STRINGS = {"nan", "none", "null", "na", "n/a"}


def harmonise(name: str) -> str:
    """The vocabulary name for a finding as a user wrote it, or the name itself if none fits."""
    key = re.sub(r"[\s\-]+", "_", name.strip().lower())
    key = SYNONYMS.get(key, key)
    return key if key in VOCABULARY else name.strip()


@dataclass
class _Row:
    line: int
    path: str          # as written in the CSV
    file: Path         # absolute, normalised
    image_id: str
    patient_id: str
    split: str | None
    written_labels: list[str]
    positives: set[str]
    boxes: list[Box] = field(default_factory=list)


class _RowError(ValueError):
    """A row that cannot be used; the message is the reject reason."""


@register_dataset("csv")
class CsvDataset:
    """Your own images and labels, listed in one CSV (path, labels[, patient_id, split, boxes])."""

    name = "csv"
    overlap_note = None
    has_landmarks = False
    # Known only once the CSV is read: records() sets both on the instance. The class says what the
    # adapter can carry (for `leader shards datasets`); the instance says what this CSV has.
    label_names: list[str] = []
    has_boxes = True

    def __init__(self, csv_path: str | os.PathLike | None = None):
        self.csv_path = Path(csv_path) if csv_path is not None else None

    def find_csv(self, root: Path) -> Path:
        """The label CSV: `csv_path` (relative to root unless absolute), else labels.csv, else the only *.csv."""
        if self.csv_path is not None:
            path = self.csv_path if self.csv_path.is_absolute() else root / self.csv_path
            if not path.is_file():
                raise LeaderError(f"csv: the label file {path} does not exist")
            return path
        if (root / "labels.csv").is_file():
            return root / "labels.csv"
        found = sorted(root.glob("*.csv"))
        if len(found) == 1:
            return found[0]
        if not found:
            raise LeaderError(
                f"csv: expected a CSV with columns path,labels (labels.csv or a single *.csv) in {root}"
            )
        names = ", ".join(p.name for p in found)
        raise LeaderError(
            f"csv: several CSV files in {root} ({names}); name one with --option csv_path=FILE or call it labels.csv"
        )

    def records(self, root: Path | None, rejects: RejectLog, *, seed: int, n: int | None) -> Iterator[SourceRecord]:
        root = require_root(root, f"csv: --root must be the folder that holds the label CSV and the images; got {root}")
        root = Path(os.path.abspath(root))
        csv_file = self.find_csv(root)
        rows = self._read_rows(csv_file, root)

        # The label set is the union over the file, so every image carries the same keys.
        findings: set[str] = set()
        for row in rows:
            if isinstance(row, _Row):
                findings |= row.positives
        findings.discard("no_finding")
        self.label_names = ordered(findings | {"no_finding"})
        self.has_boxes = any(isinstance(row, _Row) and row.boxes for row in rows)
        return itertools.islice(self._emit(rows, sorted(findings), root, csv_file, rejects, seed), n)

    def _emit(self, rows, findings, root, csv_file, rejects, seed) -> Iterator[SourceRecord]:
        for row in rows:
            if not isinstance(row, _Row):
                path, reason = row
                rejects.add(path, reason)
                continue
            labels = {name: int(name in row.positives) for name in findings}
            labels["no_finding"] = int(not (row.positives - {"no_finding"}))
            yield SourceRecord(
                dataset=self.name,
                image_id=row.image_id,
                path=row.path,
                load=functools.partial(read_image, str(row.file)),
                patient_id=row.patient_id,
                split=row.split or patient_split(self.name, row.patient_id, seed),
                labels=labels,
                source_labels={"labels": row.written_labels},
                boxes=row.boxes,
                landmarks=None,
                extra={"csv": csv_file.name, "csv_line": row.line},
                healthy="no_finding" in row.positives,
            )

    def _read_rows(self, csv_file: Path, root: Path) -> list:
        """Every data row in file order: a `_Row`, or (path, reason) for a row to reject."""
        try:
            with open(csv_file, newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                if header is None or not any(h.strip() for h in header):
                    raise LeaderError(
                        f"csv: {csv_file} has no header row; expected columns path,labels[,patient_id,split,boxes]"
                    )
                columns = [h.strip().lower() for h in header]
                missing = [c for c in REQUIRED_COLUMNS if c not in columns]
                if missing:
                    raise LeaderError(
                        f"csv: {csv_file} lacks column(s) {', '.join(missing)}; expected columns "
                        f"path,labels[,patient_id,split,boxes], found {','.join(h.strip() for h in header)}"
                    )
                index = {c: columns.index(c) for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in columns}
                rows: list = []
                seen: dict[str, int] = {}
                for cells in reader:
                    line = reader.line_num
                    if not any(c.strip() for c in cells):
                        continue  # blank line: nothing to lose
                    raw_path = cells[index["path"]] if len(cells) > index["path"] else ""
                    try:
                        # Spreadsheet exports pad rows with empty cells; anything else off-width
                        # is a broken row (often an unquoted comma inside the boxes JSON).
                        if len(cells) < len(header) or any(c.strip() for c in cells[len(header):]):
                            raise _RowError(f"has {len(cells)} cells but the header has {len(header)}")
                        row = self._parse_row(cells, index, line, root)
                        if row.image_id in seen:
                            raise _RowError(f"duplicate id {row.image_id!r} (first on line {seen[row.image_id]})")
                        seen[row.image_id] = line
                        rows.append(row)
                    except _RowError as e:
                        rows.append((raw_path or f"{csv_file.name}:{line}", f"{csv_file.name} line {line}: {e}"))
                return rows
        except UnicodeDecodeError as e:
            raise LeaderError(f"csv: {csv_file} is not UTF-8 text ({e})") from None
        except csv.Error as e:
            raise LeaderError(f"csv: {csv_file} is not a readable CSV ({e})") from None

    def _parse_row(self, cells: list[str], index: dict[str, int], line: int, root: Path) -> _Row:
        def cell(column: str) -> str:
            return cells[index[column]].strip() if column in index else ""

        raw_path = cell("path")
        if not raw_path or raw_path.lower() in _NAN_STRINGS:
            raise _RowError(f"path is empty or NaN ({raw_path!r})")
        file = Path(os.path.normpath(root / raw_path))
        try:
            relative = file.relative_to(root)
        except ValueError:
            raise _RowError(f"path escapes --root ({raw_path!r})") from None
        image_id = PurePosixPath(relative.as_posix()).with_suffix("").as_posix()

        raw_labels = cells[index["labels"]]
        if raw_labels.strip().lower() in _NAN_STRINGS:
            raise _RowError(f"labels is NaN ({raw_labels!r}); leave it empty for no finding")
        written = [name.strip() for name in raw_labels.split("|") if name.strip()]
        positives = {harmonise(name) for name in written}
        boxes = parse_boxes(cell("boxes"))
        positives |= {box.label for box in boxes}
        if "no_finding" in positives and len(positives) > 1:
            raise _RowError(f"labels list no finding together with findings: {raw_labels!r}")

        split = cell("split")
        if split:
            if split.lower() not in SPLIT_NAMES:
                raise _RowError(f"unknown split {split!r}; expected train, val or test")
            split = SPLIT_NAMES[split.lower()]
        patient_id = cell("patient_id")
        if patient_id.lower() in _NAN_STRINGS:
            patient_id = ""
        return _Row(
            line=line,
            path=raw_path,
            file=file,
            image_id=image_id,
            patient_id=patient_id or image_id,
            split=split or None,
            written_labels=written,
            positives=positives,
            boxes=boxes,
        )


def parse_boxes(text: str) -> list[Box]:
    """Boxes from the CSV's JSON cell; raises `_RowError` naming what is wrong."""
    if not text:
        return []
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise _RowError(f"unparseable boxes JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(items, list):
        raise _RowError(f"boxes must be a JSON list, got {type(items).__name__}")
    boxes = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _RowError(f"box {i} is not an object with label, x0, y0, x1, y1")
        missing = [k for k in ("label", "x0", "y0", "x1", "y1") if k not in item]
        if missing:
            raise _RowError(f"box {i} lacks {', '.join(missing)}")
        label = item["label"]
        if not isinstance(label, str) or not label.strip():
            raise _RowError(f"box {i} has no label name")
        coords = []
        for k in ("x0", "y0", "x1", "y1"):
            value = item[k]
            try:
                if isinstance(value, bool):
                    raise ValueError
                number = float(value)
            except (TypeError, ValueError):
                raise _RowError(f"box {i} has a non-numeric {k} ({value!r})") from None
            if not math.isfinite(number):
                raise _RowError(f"box {i} has a non-finite {k} ({value!r})")
            coords.append(number)
        name = harmonise(label)
        boxes.append(Box(name, *coords, source_label=label.strip() if name != label.strip() else None))
    return boxes
