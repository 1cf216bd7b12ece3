"""chestx-det: ChestX-Det (Deepwise), 3,578 NIH ChestX-ray14 images with boxes for 13 findings.

Expected ``--root`` layout (the two annotation files from the GitHub repository plus the two image
zips, unpacked)::

    ROOT/
      ChestX_Det_train.json
      ChestX_Det_test.json
      train/<file_name>.png       (or train_data/train/, or train_data/)
      test/<file_name>.png        (or test_data/test/, or test_data/)

Each JSON file is a list of ``{"file_name", "syms": [...], "boxes": [[x0, y0, x1, y1], ...],
"polygons": [...]}`` with ``syms[i]`` naming ``boxes[i]``, in the pixels of the 1024x1024 images
(the record's frame; resized copies get their boxes scaled). Polygons (segmentation outlines)
are not used.

Labels: every image is annotated for all 13 classes, so a class not among its ``syms`` is 0.
"Diffuse Nodule" and "Nodule" both map to ``nodule``; each box keeps its ChestX-Det class as its
``source_label``, and ``source_classes`` codes the 13 classes under their own names (class set
``paper``). ``no_finding`` is 1 for images without any finding.

Healthy: ChestX-Det has no "normal" class; an image is normal in it when its entry lists no
finding at all (``"syms": [], "boxes": []``, as in the released JSON), which is what its three
radiologists said after looking for all 13 classes. Such an image is taken as healthy. Findings
outside the 13 (edema, hernia, ...) were not annotated, so they cannot be ruled out.

Splits: the official train/test files; ``val`` is carved patient-wise out of train (option
``val_fraction``, 15% by default). The dataset publishes no patient ids, so the image id (file
name without ``.png``) stands in for the patient. All images come from NIH ChestX-ray14 (ids renumbered), so each record carries
``extra["also_in"] = ["nih14"]``.

An entry whose syms/boxes cannot be parsed, names an unknown class, or repeats a file name is
rejected whole: keeping the rest of its boxes would let a healthy patch be cut over an unboxed
lesion.
"""
from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path
from typing import Iterator

from leader.errors import LeaderError
from leader.shards.class_sets import SOURCE, ClassSet
from leader.shards.datasets import register_dataset
from leader.shards.datasets._checks import check_val_fraction, read_json_file, require_root
from leader.shards.imageio import read_image
from leader.shards.records import Box, RejectLog, SourceRecord
from leader.shards.vocabulary import carve_val, ordered

CLASSES = {
    "Atelectasis": "atelectasis",
    "Calcification": "calcification",
    "Cardiomegaly": "cardiomegaly",
    "Consolidation": "consolidation",
    "Diffuse Nodule": "nodule",
    "Effusion": "effusion",
    "Emphysema": "emphysema",
    "Fibrosis": "fibrosis",
    "Fracture": "fracture",
    "Mass": "mass",
    "Nodule": "nodule",
    "Pleural Thickening": "pleural_thickening",
    "Pneumothorax": "pneumothorax",
}

FRAME = (1024, 1024)   # the released images; boxes and polygons are in their pixels
ANNOTATIONS = {"train": "ChestX_Det_train.json", "test": "ChestX_Det_test.json"}
# How the image zips unpack, depending on the tool and the mirror; the nested form first, since
# there train_data/ exists too but holds only the folder.
IMAGE_DIRS = {
    "train": ("train_data/train", "train", "train_data"),
    "test": ("test_data/test", "test", "test_data"),
}


class _EntryError(ValueError):
    pass


@register_dataset("chestx-det")
class ChestXDet:
    """ChestX-Det: 3,578 NIH images with boxes for 13 findings (official train/test)."""

    name = "chestx-det"
    label_names = ordered(set(CLASSES.values()) | {"no_finding"})
    has_boxes = True
    has_landmarks = False
    overlap_note = "ChestX-Det images are a subset of NIH ChestX-ray14 (renumbered file names)"
    source_class_names = list(CLASSES)
    class_sets = {"paper": ClassSet(tuple(CLASSES), SOURCE, "ChestX-Det's 13 classes")}

    def __init__(self, val_fraction: float = 0.15):
        self.val_fraction = check_val_fraction("chestx-det", val_fraction)

    def records(self, root: Path | None, rejects: RejectLog, *, seed: int, n: int | None) -> Iterator[SourceRecord]:
        root = require_root(root, f"chestx-det: --root must be the folder that holds ChestX_Det_train.json; got {root}")
        sources = []
        for official, filename in ANNOTATIONS.items():
            entries = load_annotation_list(root / filename)
            sources.append((official, filename, entries, find_image_dir(root, official)))
        return itertools.islice(self._emit(root, sources, rejects, seed), n)

    def _emit(self, root: Path, sources, rejects: RejectLog, seed: int) -> Iterator[SourceRecord]:
        seen: set[str] = set()
        for official, filename, entries, image_dir in sources:
            folder = image_dir.relative_to(root).as_posix()
            for i, entry in enumerate(entries):
                file_name = entry.get("file_name") if isinstance(entry, dict) else None
                where = f"{folder}/{file_name}" if isinstance(file_name, str) else f"{filename}[{i}]"
                try:
                    if not isinstance(file_name, str) or not file_name:
                        raise _EntryError("entry has no file_name")
                    if file_name in seen:
                        raise _EntryError(f"duplicate entry for {file_name!r}")
                    seen.add(file_name)
                    boxes, names = parse_findings(entry)
                except _EntryError as e:
                    rejects.add(where, f"{filename} entry {i}: {e}")
                    continue
                image_id = Path(file_name).stem
                found = {CLASSES[name] for name in names}
                labels = {label: int(label in found) for label in self.label_names}
                labels["no_finding"] = int(not found)
                split = carve_val(official, self.name, image_id, seed, self.val_fraction)
                yield SourceRecord(
                    dataset=self.name,
                    image_id=image_id,
                    path=f"{folder}/{file_name}",
                    load=functools.partial(read_image, str(image_dir / file_name)),
                    patient_id=image_id,
                    split=split,
                    labels=labels,
                    source_labels={"syms": names},
                    boxes=boxes,
                    landmarks=None,
                    extra={"also_in": ["nih14"], "official_split": official},
                    healthy=not names,
                    frame=FRAME,
                    source_classes={name: int(name in names) for name in CLASSES},
                )


def load_annotation_list(path: Path) -> list:
    entries = read_json_file(path, "chestx-det", "the folder that holds ChestX_Det_train.json, ChestX_Det_test.json "
                                                 "and the train/ and test/ image folders")
    if not isinstance(entries, list):
        raise LeaderError(f"chestx-det: {path} must hold a JSON list of image entries, found {type(entries).__name__}")
    return entries


def find_image_dir(root: Path, split: str) -> Path:
    for candidate in IMAGE_DIRS[split]:
        if (root / candidate).is_dir():
            return root / candidate
    expected = ", ".join(f"{c}/" for c in IMAGE_DIRS[split])
    raise LeaderError(f"chestx-det: expected the {split} images in one of {expected} under {root}")


def parse_findings(entry: dict) -> tuple[list[Box], list[str]]:
    """The boxes (vocabulary labels) and the class names as written, or `_EntryError`."""
    syms, raw_boxes = entry.get("syms", []), entry.get("boxes", [])
    if not isinstance(syms, list) or not all(isinstance(s, str) for s in syms):
        raise _EntryError(f"syms must be a list of class names, got {syms!r}")
    if not isinstance(raw_boxes, list):
        raise _EntryError(f"boxes must be a list, got {raw_boxes!r}")
    if len(syms) != len(raw_boxes):
        raise _EntryError(f"{len(syms)} syms but {len(raw_boxes)} boxes")
    boxes = []
    for name, coords in zip(syms, raw_boxes):
        if name not in CLASSES:
            raise _EntryError(f"unknown class {name!r}; expected one of {sorted(CLASSES)}")
        if not isinstance(coords, list) or len(coords) != 4:
            raise _EntryError(f"box for {name!r} is not [x0, y0, x1, y1]: {coords!r}")
        try:
            numbers = [float(c) for c in coords if not isinstance(c, bool)]
        except (TypeError, ValueError):
            numbers = []
        if len(numbers) != 4 or not all(math.isfinite(c) for c in numbers):
            raise _EntryError(f"box for {name!r} has unparseable numbers: {coords!r}")
        boxes.append(Box(CLASSES[name], *numbers, source_label=name))
    return boxes, syms
