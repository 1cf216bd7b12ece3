"""VinDr-CXR (Nguyen et al. 2022): 18,000 DICOMs (MONOCHROME1/2, 12-16 bit), 3 readers per training image.

Expected ``--root`` (the PhysioNet ``vindr-cxr/1.0.0`` folder, as-is)::

    ROOT/
      annotations/annotations_train.csv   image_id,rad_id,class_name,x_min,y_min,x_max,y_max
      annotations/image_labels_train.csv  image_id,rad_ID,<one 0/1 column per finding>
      annotations/annotations_test.csv    consensus boxes (rad_id optional)   optional
      annotations/image_labels_test.csv   consensus labels                    optional
      train/<image_id>.dicom
      test/<image_id>.dicom

(The CSVs may also sit directly in ROOT.) Without ``image_labels_*.csv`` the labels are read off the
annotation rows: a reader is positive for every class they drew or named.

Image labels: a finding is 1 when a strict majority of the image's readers ticked it (2 of 3),
else 0; the test split's consensus rows are one reader. VinDr's names map to the vocabulary
(``Nodule/Mass`` -> lung_lesion, ``Pleural effusion`` -> effusion, ``Pulmonary fibrosis`` ->
fibrosis, ``ILD`` -> ild, ...); Enlarged PA, COPD, Lung tumor and Other disease(s) have no vocabulary
entry and stay in ``source_labels`` (the per-class reader votes) only.

Boxes (option ``boxes``): ``readers`` (the default) keeps every reader's box, each with its own
class; ``fused`` fuses them (``fuse_reader_boxes``): per image and class, boxes are taken reader
by reader; each joins the cluster (holding no box of the same reader yet) whose mean box it
overlaps most, if that IoU >= 0.4, otherwise it starts a new cluster. A cluster drawn by a strict
majority of the image's readers (2 of 3) becomes one box, the mean of its members' coordinates;
clusters drawn by fewer readers are dropped as unconfirmed and counted in
``extra["unconfirmed_boxes"]``. Why every reader's box by default: LeADER's Table 1 lists 36,096
VinDr samples, exactly the number of lesion-box rows in the Kaggle release of the same 15,000
training images (67,914 rows, of which 31,818 are the "No finding" rows of 10,606 normal images),
where a lesion seen by three readers is three rows; fusing counts it once.
``extra["box_readers"]`` gives each kept box's readers. Boxes of classes outside the vocabulary
are kept the same way in ``extra["other_boxes"]``. Test boxes are consensus boxes and are used as
they are. Boxes are in the DICOM's own pixels (the record has no separate frame); each box keeps
its VinDr class in ``source_label``.

Healthy: only an image that every one of its readers called "No finding" (and nothing else, and
drew no box). An image with an unmapped finding (Enlarged PA, COPD, ...), a single reader's box,
or "No finding" from 2 of 3 readers only is not healthy, though its ``no_finding`` label (a
majority vote) may be 1.

Class names: ``source_classes`` codes VinDr's 22 local (lesion) classes by the same majority vote
as ``labels``. Class set ``paper``: VinDr's 14 standard lesion classes (those of its Kaggle
challenge), under VinDr's own names.

Splits: ``train/`` -> train, with ``val`` carved out of it image-wise (``val_fraction``);
``test/`` -> test. VinDr publishes no patient ids, so the image id is the patient id.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pandas as pd

from leader.errors import LeaderError
from leader.shards.class_sets import SOURCE, ClassSet
from leader.shards.datasets import register_dataset
from leader.shards.datasets._checks import check_val_fraction, image_file, require_root
from leader.shards.imageio import read_image
from leader.shards.records import Box, RejectLog, SourceRecord
from leader.shards.vocabulary import carve_val, ordered

VINDR_TO_VOCABULARY: dict[str, str | None] = {
    "Aortic enlargement": "aortic_enlargement",
    "Atelectasis": "atelectasis",
    "Calcification": "calcification",
    "Cardiomegaly": "cardiomegaly",
    "Clavicle fracture": "clavicle_fracture",
    "Consolidation": "consolidation",
    "Edema": "edema",
    "Emphysema": "emphysema",
    "Enlarged PA": None,
    "ILD": "ild",
    "Infiltration": "infiltration",
    "Lung Opacity": "lung_opacity",
    "Lung cavity": "lung_cavity",
    "Lung cyst": "lung_cyst",
    "Mediastinal shift": "mediastinal_shift",
    "Nodule/Mass": "lung_lesion",
    "Pleural effusion": "effusion",
    "Pleural thickening": "pleural_thickening",
    "Pneumothorax": "pneumothorax",
    "Pulmonary fibrosis": "fibrosis",
    "Rib fracture": "rib_fracture",
    "Other lesion": "other_lesion",
    "COPD": None,
    "Lung tumor": None,
    "Pneumonia": "pneumonia",
    "Tuberculosis": "tuberculosis",
    "Other disease": None,
    "Other diseases": None,
    "No finding": "no_finding",
}
# Releases differ in capitalisation ("Lung Opacity" / "Lung opacity"); match names case-blind.
_CANONICAL = {name.lower(): name for name in VINDR_TO_VOCABULARY}
NO_FINDING = "No finding"
IOU_THRESHOLD = 0.4
CONSENSUS = "consensus"
BOX_MODES = ("readers", "fused")
# The findings readers localise with boxes; the others (COPD, Lung tumor, Pneumonia, Tuberculosis,
# Other disease(s), No finding) are diagnoses of the whole image.
LOCAL_CLASSES = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture", "Consolidation",
    "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst",
    "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "Rib fracture", "Other lesion",
)
STANDARD_14 = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD", "Infiltration",
    "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis",
)


@dataclass
class Reading:
    """What one reader (or the test consensus) said about one image."""

    positive: set[str] = field(default_factory=set)  # VinDr class names
    boxes: list[tuple[str, tuple[float, float, float, float]]] = field(default_factory=list)


@dataclass
class ImageReadings:
    split: str
    readers: dict[str, Reading] = field(default_factory=dict)
    problem: str | None = None

    def flag(self, problem: str) -> None:
        """Keep the first problem found: it is the reason the image is rejected."""
        self.problem = self.problem or problem


@register_dataset("vindr")
class VinDrCXR:
    name = "vindr"
    label_names = ordered(v for v in VINDR_TO_VOCABULARY.values() if v)
    has_boxes = True
    has_landmarks = False
    overlap_note = None
    source_class_names = list(LOCAL_CLASSES)
    class_sets = {"paper": ClassSet(STANDARD_14, SOURCE, "VinDr-CXR's 14 standard lesion classes")}

    def __init__(self, val_fraction: float = 0.125, boxes: str = "readers"):
        self.val_fraction = check_val_fraction("vindr", val_fraction)
        if boxes not in BOX_MODES:
            raise LeaderError(f"vindr: boxes must be one of {', '.join(BOX_MODES)} (every reader's box, or boxes "
                              f"fused across readers), got {boxes!r}")
        self.boxes = boxes

    def records(
        self, root: Path | None, rejects: RejectLog, *, seed: int = 0, n: int | None = None
    ) -> Iterator[SourceRecord]:
        root = _check_root(root)
        images: dict[str, ImageReadings] = {}
        for split in ("train", "test"):
            _read_split(root, split, images)
        yielded = 0
        for image_id, readings in images.items():
            if n is not None and yielded >= n:
                return
            relative = f"{readings.split}/{image_id}.dicom"
            if readings.problem:
                rejects.add(relative, readings.problem)
                continue
            path = image_file(root, relative, rejects)
            if path is None:
                continue
            yielded += 1
            yield self._record(image_id, relative, path, readings, seed)

    def _record(self, image_id: str, relative: str, path: Path, readings: ImageReadings, seed: int):
        n_readers = len(readings.readers)
        votes: dict[str, int] = {}
        for reading in readings.readers.values():
            for name in reading.positive:
                votes[name] = votes.get(name, 0) + 1
        labels = {vocab: 0 for vocab in self.label_names}
        for name, count in votes.items():
            if (vocab := VINDR_TO_VOCABULARY[name]) is not None and 2 * count > n_readers:
                labels[vocab] = 1
        boxes, other_boxes, box_readers, unconfirmed = [], [], [], 0
        classes = sorted({c for r in readings.readers.values() for c, _ in r.boxes})
        for name in classes:
            per_reader = sorted(((reader, box) for reader, r in readings.readers.items() for c, box in r.boxes if c == name),
                                key=lambda rb: rb[0])
            if self.boxes == "fused":
                kept, dropped = fuse_reader_boxes(per_reader, n_readers)
                unconfirmed += dropped
            else:
                kept = [(box, (reader,)) for reader, box in per_reader]
            for box, readers in kept:
                if (vocab := VINDR_TO_VOCABULARY[name]) is not None:
                    boxes.append(Box(vocab, *box, source_label=name))
                    box_readers.append(list(readers))
                else:
                    other_boxes.append({"label": name, "box": list(box), "readers": list(readers)})
        split = carve_val(readings.split, self.name, image_id, seed, self.val_fraction)
        extra = {"box_mode": self.boxes, "box_readers": box_readers}
        if self.boxes == "fused":
            extra["unconfirmed_boxes"] = unconfirmed
        if other_boxes:
            extra["other_boxes"] = other_boxes
        # "Every reader" is the dataset's own statement of a normal image; a majority is not.
        healthy = bool(readings.readers) and all(r.positive == {NO_FINDING} and not r.boxes
                                                 for r in readings.readers.values())
        return SourceRecord(
            dataset=self.name,
            image_id=image_id,
            path=relative,
            load=functools.partial(read_image, path),
            patient_id=image_id,
            split=split,
            labels=labels,
            source_labels={"readers": list(readings.readers), "votes": dict(sorted(votes.items()))},
            boxes=boxes,
            landmarks=None,
            view=None,
            extra=extra,
            healthy=healthy,
            source_classes={name: int(2 * votes.get(name, 0) > n_readers) for name in LOCAL_CLASSES},
        )


def fuse_reader_boxes(
    boxes: list[tuple[str, tuple[float, float, float, float]]], n_readers: int, iou_threshold: float = IOU_THRESHOLD
) -> tuple[list[tuple[tuple[float, float, float, float], tuple[str, ...]]], int]:
    """Fuse one class's boxes from several readers of one image (the rule in the module docstring).

    `boxes` are (reader, (x0, y0, x1, y1)). Returns ([(mean box, its readers)], n unconfirmed clusters).
    """
    clusters: list[list[tuple[str, tuple[float, float, float, float]]]] = []
    for reader, box in sorted(boxes, key=lambda rb: rb[0]):
        best, best_iou = None, iou_threshold
        for cluster in clusters:
            if any(r == reader for r, _ in cluster):
                continue
            overlap = iou(box, _mean_box(cluster))
            if overlap >= best_iou:
                best, best_iou = cluster, overlap
        if best is None:
            clusters.append([(reader, box)])
        else:
            best.append((reader, box))
    kept = [(_mean_box(c), tuple(r for r, _ in c)) for c in clusters if 2 * len(c) > n_readers]
    return kept, len(clusters) - len(kept)


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _mean_box(cluster) -> tuple[float, float, float, float]:
    return tuple(round(sum(box[i] for _, box in cluster) / len(cluster), 3) for i in range(4))


# -------------------------------------------------------------------------------------------------
# Reading the CSVs


def _check_root(root: Path | None) -> Path:
    root = require_root(root, f"vindr: --root {root} is not a folder; pass the vindr-cxr/1.0.0 folder")
    if _find(root, "annotations_train.csv") is None:
        raise LeaderError(
            f"vindr: expected annotations/annotations_train.csv under {root}; is --root the folder that "
            "holds annotations/, train/ and test/?"
        )
    return root


def _find(root: Path, filename: str) -> Path | None:
    for candidate in (root / "annotations" / filename, root / filename):
        if candidate.exists():
            return candidate
    return None


def _canonical(name: str) -> str | None:
    return _CANONICAL.get(name.strip().lower())


def _read_table(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table.columns = [c.strip() for c in table.columns]
    if "image_id" not in table.columns:
        raise LeaderError(f"vindr: {path} has no image_id column")
    return table.apply(lambda col: col.str.strip())


def _reader_column(table: pd.DataFrame) -> str | None:
    return next((c for c in table.columns if c.lower() == "rad_id"), None)


def _read_split(root: Path, split: str, images: dict[str, ImageReadings]) -> None:
    annotations_path = _find(root, f"annotations_{split}.csv")
    labels_path = _find(root, f"image_labels_{split}.csv")
    if annotations_path is None and labels_path is None:
        return  # the test labels are optional
    this_split: dict[str, ImageReadings] = {}

    def readings_of(image_id: str) -> ImageReadings:
        if image_id in images and images[image_id].split != split:
            image = images[image_id]
            image.flag("image in both splits: the image id is listed for train and for test")
            return image
        return this_split.setdefault(image_id, images.setdefault(image_id, ImageReadings(split)))

    if labels_path is not None:
        table = _read_table(labels_path)
        reader_col = _reader_column(table)
        class_cols = [c for c in table.columns if c not in ("image_id", reader_col)]
        unknown = [c for c in class_cols if _canonical(c) is None]
        if unknown:
            raise LeaderError(f"vindr: {labels_path.name} has unknown finding column(s) {unknown}")
        for line, row in enumerate(table.to_dict("records"), start=2):
            image = readings_of(row["image_id"])
            reading = image.readers.setdefault(row[reader_col] if reader_col else CONSENSUS, Reading())
            for column in class_cols:
                value = row[column]
                if value in ("1", "1.0"):
                    reading.positive.add(_canonical(column))
                elif value not in ("0", "0.0"):
                    image.flag(f"label not 0 or 1: {column!r} = {value!r} ({labels_path.name} row {line})")

    if annotations_path is not None:
        table = _read_table(annotations_path)
        reader_col = _reader_column(table)
        for line, row in enumerate(table.to_dict("records"), start=2):
            image_id = row["image_id"]
            if labels_path is not None and image_id not in this_split:
                orphan = images.setdefault(image_id, ImageReadings(split))
                orphan.flag(f"boxes without labels: no row in {labels_path.name} ({annotations_path.name} row {line})")
                continue
            image = readings_of(image_id)
            reading = image.readers.setdefault(row[reader_col] if reader_col else CONSENSUS, Reading())
            name = _canonical(row.get("class_name", ""))
            if name is None:
                image.flag(f"unknown class: {row.get('class_name')!r} ({annotations_path.name} row {line})")
                continue
            if labels_path is None:
                reading.positive.add(name)
            if name == NO_FINDING:
                continue
            try:
                box = tuple(float(row[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
            except (KeyError, ValueError):
                coords = [row.get(k) for k in ("x_min", "y_min", "x_max", "y_max")]
                image.flag(f"unparseable box: {coords} for {name!r} ({annotations_path.name} row {line})")
                continue
            reading.boxes.append((name, box))
