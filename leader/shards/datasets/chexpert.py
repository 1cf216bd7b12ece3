"""CheXpert (Irvin et al. 2019): 224,316 radiographs of 65,240 patients, 8-bit JPEG.

Expected ``--root`` (the unzipped ``CheXpert-v1.0`` or ``CheXpert-v1.0-small`` folder, as-is)::

    ROOT/
      train.csv      Path,Sex,Age,Frontal/Lateral,AP/PA,<14 observations>
      valid.csv      same columns
      train/patient00001/study1/view1_frontal.jpg ...
      valid/patient64541/study1/view1_frontal.jpg ...

``Path`` values start with the release folder (``CheXpert-v1.0-small/train/...``); that first
component is replaced by ``--root``, whatever the folder is called now. Paths that already start
with ``train/`` or ``valid/`` are used as they are.

Labels: the 14 observations are coded 1.0 (positive), 0.0 (negative), -1.0 (uncertain) or blank
(not mentioned in the report). Uncertain and blank both become None, never 0; ``source_labels``
keeps the raw strings. "Pleural Effusion" maps to ``effusion``.

Healthy: "No Finding" is 1 and no other observation is positive or uncertain (Support Devices
aside: a device is not a finding, and the labeller sets No Finding beside it).

Class sets: ``paper`` is the 5 CheXpert competition diseases (Atelectasis, Cardiomegaly,
Consolidation, Edema, Pleural Effusion), under their harmonised names.

Splits: the official split is kept apart: ``valid.csv`` (radiologist-labelled) is the ``test``
split, and ``val`` is carved patient-wise out of ``train.csv`` (``val_fraction`` of the patients),
so that model selection never sees the test images. ``frontal_only`` (default True) skips lateral
views (``Frontal/Lateral`` = Lateral); they are options, not rejects. The patient id is the
``patientNNNNN`` folder.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path, PurePosixPath
from typing import Iterator

import pandas as pd

from leader.errors import LeaderError
from leader.shards.class_sets import ClassSet
from leader.shards.datasets import register_dataset
from leader.shards.datasets._checks import check_val_fraction, image_file, require_root
from leader.shards.imageio import read_image
from leader.shards.records import RejectLog, SourceRecord
from leader.shards.vocabulary import carve_val, ordered

# The CheXpert labeller's 14 observations; MIMIC-CXR's label file uses the same names.
OBSERVATIONS_TO_VOCABULARY = {
    "No Finding": "no_finding",
    "Enlarged Cardiomediastinum": "enlarged_cardiomediastinum",
    "Cardiomegaly": "cardiomegaly",
    "Lung Opacity": "lung_opacity",
    "Lung Lesion": "lung_lesion",
    "Edema": "edema",
    "Consolidation": "consolidation",
    "Pneumonia": "pneumonia",
    "Atelectasis": "atelectasis",
    "Pneumothorax": "pneumothorax",
    "Pleural Effusion": "effusion",
    "Pleural Other": "pleural_other",
    "Fracture": "fracture",
    "Support Devices": "support_devices",
}
_CODES = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": None, "-1.0": None, "": None}


def code_observation(raw: str) -> int | None:
    """CheXpert coding -> harmonised label: 1 -> 1, 0 -> 0, uncertain (-1) and blank -> None.

    Raises ValueError for anything else, so a damaged row is rejected rather than guessed.
    """
    value = raw.strip()
    if value not in _CODES:
        raise ValueError(f"{raw!r} (expected 1.0, 0.0, -1.0 or blank)")
    return _CODES[value]


def code_observations(row: dict[str, str]) -> tuple[dict[str, int | None], dict[str, str]]:
    """(harmonised labels, raw values) for the 14 observations of one CSV row."""
    labels, raw = {}, {}
    for name, vocab in OBSERVATIONS_TO_VOCABULARY.items():
        try:
            labels[vocab] = code_observation(row[name])
        except ValueError as e:
            raise ValueError(f"unexpected label value: {name!r} = {e}") from None
        raw[name] = row[name]
    return labels, raw


# Observations that are findings: all but No Finding itself and Support Devices.
FINDINGS = tuple(name for name in OBSERVATIONS_TO_VOCABULARY if name not in ("No Finding", "Support Devices"))
COMPETITION_5 = ("atelectasis", "cardiomegaly", "consolidation", "edema", "effusion")


def states_no_finding(raw: dict[str, str]) -> bool:
    """The labeller's positive "No Finding", with no finding positive or uncertain beside it."""
    return code_observation(raw["No Finding"]) == 1 and all(
        code_observation(raw[name]) != 1 and raw[name].strip() not in ("-1", "-1.0") for name in FINDINGS)


_PATIENT = re.compile(r"^patient\d+$")
_SPLIT_FILES = (("train.csv", "train"), ("valid.csv", "test"))


@register_dataset("chexpert")
class CheXpert:
    name = "chexpert"
    label_names = ordered(OBSERVATIONS_TO_VOCABULARY.values())
    has_boxes = False
    has_landmarks = False
    overlap_note = None
    class_sets = {"paper": ClassSet(COMPETITION_5, about="the 5 CheXpert competition diseases")}

    def __init__(self, frontal_only: bool = True, val_fraction: float = 0.1):
        check_val_fraction("chexpert", val_fraction)
        self.frontal_only = bool(frontal_only)
        self.val_fraction = float(val_fraction)

    def records(
        self, root: Path | None, rejects: RejectLog, *, seed: int = 0, n: int | None = None
    ) -> Iterator[SourceRecord]:
        root = require_root(root, f"chexpert: --root {root} is not a folder; pass the folder that holds train.csv")
        if not (root / "train.csv").exists():
            raise LeaderError(
                f"chexpert: expected train.csv (and valid.csv) under {root}; is --root the "
                "CheXpert-v1.0(-small) folder?"
            )
        yielded = 0
        for filename, official in _SPLIT_FILES:
            if not (root / filename).exists():
                continue
            table = _read_table(root / filename)
            for line, row in enumerate(table.to_dict("records"), start=2):
                if n is not None and yielded >= n:
                    return
                record = self._record(root, filename, line, row, official, rejects, seed)
                if record is not None:
                    yielded += 1
                    yield record

    def _record(self, root, filename, line, row, official, rejects, seed) -> SourceRecord | None:
        if self.frontal_only and row["Frontal/Lateral"].strip().lower() != "frontal":
            return None
        relative = _relative_path(row["Path"])
        where = str(relative) if relative else f"{filename}:{line}"
        if relative is None:
            rejects.add(where, f"empty Path ({filename} row {line})")
            return None
        patient = next((p for p in relative.parts if _PATIENT.match(p)), None)
        if patient is None:
            rejects.add(where, f"no patient folder: no patientNNNNN in Path {row['Path']!r} ({filename} row {line})")
            return None
        try:
            labels, raw = code_observations(row)
        except ValueError as e:
            rejects.add(where, f"{e} ({filename} row {line})")
            return None
        path = image_file(root, relative, rejects)
        if path is None:
            return None
        split = carve_val(official, self.name, patient, seed, self.val_fraction)
        view = row["AP/PA"].strip() or ("LATERAL" if row["Frontal/Lateral"].strip() == "Lateral" else None)
        return SourceRecord(
            dataset=self.name,
            image_id=str(relative),
            path=str(relative),
            load=functools.partial(read_image, path),
            patient_id=patient,
            split=split,
            labels=labels,
            source_labels=raw,
            boxes=[],
            landmarks=None,
            view=view,
            extra={"sex": row["Sex"].strip(), "age": row["Age"].strip(), "label_file": filename},
            healthy=states_no_finding(raw),
        )


def _read_table(path: Path) -> pd.DataFrame:
    # Strings throughout, blanks kept as "": a blank observation means "not mentioned", not 0.
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table.columns = [c.strip() for c in table.columns]
    needed = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS_TO_VOCABULARY]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise LeaderError(f"chexpert: {path} lacks the column(s) {missing}")
    return table


def _relative_path(value: str) -> PurePosixPath | None:
    """`CheXpert-v1.0-small/train/p/s/v.jpg` -> `train/p/s/v.jpg` (the release folder is --root)."""
    parts = PurePosixPath(value.strip().replace("\\", "/")).parts
    if not parts:
        return None
    if parts[0] not in ("train", "valid", "test") and len(parts) > 1:
        parts = parts[1:]
    return PurePosixPath(*parts)
