"""RSNA Pneumonia Detection Challenge (2018): 26,684 training DICOMs, 8-bit MONOCHROME2, 1024x1024.

Expected ``--root`` (the Kaggle ``rsna-pneumonia-detection-challenge`` download, as-is)::

    ROOT/
      stage_2_train_labels.csv            patientId,x,y,width,height,Target (one row per box;
                                          Target 0 rows have empty box columns)
      stage_2_detailed_class_info.csv     optional: patientId,class
                                          (Lung Opacity | No Lung Opacity / Not Normal | Normal)
      stage_2_train_images/<patientId>.dcm

(The stage 1 names, ``stage_1_train_labels.csv`` and ``stage_1_train_images/``, are read when the
stage 2 ones are absent.) The test images have no public labels and are not used.

Labels: ``pneumonia`` and ``lung_opacity`` are both the challenge's Target (the boxes mark lung
opacities read as evidence of pneumonia); ``no_finding`` is set only when the detailed class file
is present (1 for class "Normal"). Boxes are ``pneumonia`` boxes (the challenge's class "Lung
Opacity", kept as their ``source_label``), converted from [x, y, w, h], in the pixels of the
challenge's 1024 x 1024 images (the record's frame; resized copies are scaled).
An image whose rows disagree (Target 0 and 1, a Target 0 row with a box, a box that cannot be
parsed) is rejected whole, since its box set would be incomplete.

Healthy: only class "Normal" of the detailed class file. "No Lung Opacity / Not Normal" images
have other findings; without the file no image is stated healthy, so none gives healthy patches,
and the build says so (``notes``).

Ids: the challenge's ``patientId`` names one image; it is used as the patient id. Split:
patient-wise. Overlap: every RSNA image comes from NIH ChestX-ray14 (``extra.also_in``), so do not
pretrain on NIH and evaluate on RSNA without accounting for it.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterator

import pandas as pd

from leader.errors import LeaderError
from leader.shards.datasets import register_dataset
from leader.shards.datasets._checks import image_file, require_root
from leader.shards.imageio import read_image
from leader.shards.records import Box, RejectLog, SourceRecord
from leader.shards.vocabulary import ordered, patient_split

STAGES = ("stage_2", "stage_1")
NORMAL_CLASS = "Normal"
OPACITY_CLASS = "Lung Opacity"
FRAME = (1024, 1024)   # every challenge DICOM is 1024 x 1024; the boxes are in its pixels


@register_dataset("rsna")
class RSNAPneumonia:
    name = "rsna"
    label_names = ordered(["no_finding", "pneumonia", "lung_opacity"])
    has_boxes = True
    has_landmarks = False
    overlap_note = "RSNA Pneumonia images are a subset of NIH ChestX-ray14 (also_in: nih14)"

    def records(
        self, root: Path | None, rejects: RejectLog, *, seed: int = 0, n: int | None = None
    ) -> Iterator[SourceRecord]:
        root, stage = _find_stage(root)
        labels_file = f"{stage}_train_labels.csv"
        table = pd.read_csv(root / labels_file, dtype=str, keep_default_na=False)
        table.columns = [c.strip() for c in table.columns]
        needed = ["patientId", "x", "y", "width", "height", "Target"]
        if missing := [c for c in needed if c not in table.columns]:
            raise LeaderError(f"rsna: {labels_file} lacks the column(s) {missing}")
        classes = _read_classes(root / f"{stage}_detailed_class_info.csv")
        self.notes = [] if classes is not None else [
            f"rsna: {stage}_detailed_class_info.csv is absent, so no image is stated Normal and none gives healthy patches"]
        rows_of: dict[str, list[tuple[int, list[str]]]] = {}
        for line, row in enumerate(table[needed].itertuples(index=False), start=2):
            rows_of.setdefault(row[0].strip(), []).append((line, [v.strip() for v in row[1:]]))
        yielded = 0
        for patient, rows in rows_of.items():
            if n is not None and yielded >= n:
                return
            relative = f"{stage}_train_images/{patient}.dcm"
            try:
                target, boxes = _target_and_boxes(rows, labels_file)
                labels = {"pneumonia": target, "lung_opacity": target}
                source = {"Target": target}
                if classes is not None:
                    labels["no_finding"], source["class"] = _no_finding(classes.get(patient), target)
            except ValueError as e:
                rejects.add(relative, str(e))
                continue
            path = image_file(root, relative, rejects)
            if path is None:
                continue
            yielded += 1
            yield SourceRecord(
                dataset=self.name,
                image_id=patient,
                path=relative,
                load=functools.partial(read_image, path),
                patient_id=patient,
                split=patient_split(self.name, patient, seed),
                labels=labels,
                source_labels=source,
                boxes=boxes,
                landmarks=None,
                view=_view_position(path),
                extra={"also_in": ["nih14"]},
                healthy=source.get("class") == NORMAL_CLASS,
                frame=FRAME,
            )


def _find_stage(root: Path | None) -> tuple[Path, str]:
    root = require_root(root, f"rsna: --root {root} is not a folder; pass the folder that holds stage_2_train_labels.csv")
    for stage in STAGES:
        if (root / f"{stage}_train_labels.csv").exists():
            return root, stage
    raise LeaderError(
        f"rsna: expected stage_2_train_labels.csv under {root}; is --root the folder that holds it "
        "and stage_2_train_images/?"
    )


def _read_classes(path: Path) -> dict[str, str] | None:
    if not path.exists():
        return None
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table.columns = [c.strip() for c in table.columns]
    if not {"patientId", "class"} <= set(table.columns):
        raise LeaderError(f"rsna: {path.name} should have the columns patientId, class")
    # One row per box, repeating the class: the first row is the image's class.
    classes: dict[str, str] = {}
    for patient, cls in zip(table["patientId"], table["class"]):
        classes.setdefault(patient.strip(), cls.strip())
    return classes


def _target_and_boxes(rows: list[tuple[int, list[str]]], labels_file: str) -> tuple[int, list[Box]]:
    targets = {values[-1] for _, values in rows}
    if targets - {"0", "1"}:
        raise ValueError(f"Target not 0 or 1: {sorted(targets - {'0', '1'})} in {labels_file}")
    if len(targets) != 1:
        raise ValueError(f"rows disagree on Target: 0 and 1 in {labels_file} rows {[line for line, _ in rows]}")
    target = int(targets.pop())
    boxes = []
    for line, (x, y, w, h, _) in rows:
        coords = [x, y, w, h]
        if target == 0:
            if any(coords):
                raise ValueError(f"Target 0 with a box: {coords} ({labels_file} row {line})")
            continue
        try:
            x0, y0, width, height = (float(v) for v in coords)
        except ValueError:
            raise ValueError(f"unparseable box: {coords} with Target 1 ({labels_file} row {line})") from None
        boxes.append(Box("pneumonia", x0, y0, x0 + width, y0 + height, source_label=OPACITY_CLASS))
    return target, boxes


def _no_finding(cls: str | None, target: int) -> tuple[int, str]:
    if cls is None:
        raise ValueError("no detailed class: image missing from the detailed class info file")
    if (cls == OPACITY_CLASS) != (target == 1):
        raise ValueError(f"detailed class contradicts Target: {cls!r} with Target {target}")
    return int(cls == NORMAL_CLASS), cls


def _view_position(path: Path) -> str | None:
    """AP or PA from the DICOM header (a cheap header-only read); None when it cannot be read."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ViewPosition"])
    except Exception:  # the builder's load() reports an unreadable file; the view is optional
        return None
    return str(ds.get("ViewPosition", "")).strip() or None
