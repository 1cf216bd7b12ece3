"""MIMIC-CXR-JPG v2 (Johnson et al. 2019): 377,110 JPEGs of 65,379 patients, labelled per study.

Expected ``--root`` (the PhysioNet ``mimic-cxr-jpg/2.0.0`` folder, as-is)::

    ROOT/
      mimic-cxr-2.0.0-split.csv.gz      dicom_id,study_id,subject_id,split (train/validate/test)
      mimic-cxr-2.0.0-metadata.csv.gz   dicom_id,subject_id,study_id,...,ViewPosition,...
      mimic-cxr-2.0.0-chexpert.csv.gz   subject_id,study_id,<14 CheXpert observations>
      files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg ...

Labels come from the CheXpert labeller, one row per study, shared by the study's images, and are
coded exactly as CheXpert's: 1.0 -> 1, 0.0 -> 0, -1.0 (uncertain) and blank -> None. A study that
the label file does not list keeps every label None and says so in ``source_labels``; it is a
record, not a reject. Healthy as CheXpert: "No Finding" = 1 and no finding positive or uncertain
(a study without a label row is not healthy). Splits are the official ``split`` column (``validate`` -> ``val``). The
patient id is ``subject_id``. ``frontal_only`` (default True) keeps ViewPosition PA and AP and
skips the other views by choice (they are not rejects).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterator

import pandas as pd

from leader.errors import LeaderError
from leader.shards.datasets import register_dataset
from leader.shards.datasets._checks import image_file, require_root
from leader.shards.datasets.chexpert import OBSERVATIONS_TO_VOCABULARY, code_observations, states_no_finding
from leader.shards.imageio import read_image
from leader.shards.records import RejectLog, SourceRecord
from leader.shards.vocabulary import ordered

SPLIT_FILE = "mimic-cxr-2.0.0-split.csv.gz"
METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv.gz"
LABEL_FILE = "mimic-cxr-2.0.0-chexpert.csv.gz"
OFFICIAL_SPLITS = {"train": "train", "validate": "val", "test": "test"}
FRONTAL_VIEWS = {"PA", "AP"}
NOT_IN_LABEL_FILE = f"study not in {LABEL_FILE}"


@register_dataset("mimic-cxr")
class MIMICCXR:
    name = "mimic-cxr"
    label_names = ordered(OBSERVATIONS_TO_VOCABULARY.values())
    has_boxes = False
    has_landmarks = False
    overlap_note = None

    def __init__(self, frontal_only: bool = True):
        self.frontal_only = bool(frontal_only)

    def records(
        self, root: Path | None, rejects: RejectLog, *, seed: int = 0, n: int | None = None
    ) -> Iterator[SourceRecord]:
        root = _check_root(root)
        splits = _read(root, SPLIT_FILE, ["dicom_id", "study_id", "subject_id", "split"])
        views = dict(_read(root, METADATA_FILE, ["dicom_id", "ViewPosition"]).itertuples(index=False))
        labels = _read(root, LABEL_FILE, ["subject_id", "study_id", *OBSERVATIONS_TO_VOCABULARY])
        by_study = {(r["subject_id"], r["study_id"]): r for r in labels.to_dict("records")}
        yielded = 0
        for dicom_id, study, subject, official in splits.itertuples(index=False):
            if n is not None and yielded >= n:
                return
            record = self._record(root, dicom_id, study, subject, official, views, by_study, rejects)
            if record is not None:
                yielded += 1
                yield record

    def _record(self, root, dicom_id, study, subject, official, views, by_study, rejects):
        relative = f"files/p{subject[:2]}/p{subject}/s{study}/{dicom_id}.jpg"
        if dicom_id not in views:
            rejects.add(relative, f"not in the metadata: dicom_id {dicom_id} is in {SPLIT_FILE} but not in {METADATA_FILE}")
            return None
        view = views[dicom_id] or None
        if self.frontal_only and view not in FRONTAL_VIEWS:
            return None
        if official not in OFFICIAL_SPLITS:
            rejects.add(relative, f"unknown split: {official!r} in {SPLIT_FILE}")
            return None
        study_row = by_study.get((subject, study))
        if study_row is None:
            labels = {vocab: None for vocab in OBSERVATIONS_TO_VOCABULARY.values()}
            source_labels = {"status": NOT_IN_LABEL_FILE}
        else:
            try:
                labels, source_labels = code_observations(study_row)
            except ValueError as e:
                rejects.add(relative, f"{e} ({LABEL_FILE}, study s{study})")
                return None
        path = image_file(root, relative, rejects)
        if path is None:
            return None
        return SourceRecord(
            dataset=self.name,
            image_id=dicom_id,
            path=relative,
            load=functools.partial(read_image, path),
            patient_id=subject,
            split=OFFICIAL_SPLITS[official],
            labels=labels,
            source_labels=source_labels,
            boxes=[],
            landmarks=None,
            view=view,
            extra={"study_id": study},
            healthy=study_row is not None and states_no_finding(source_labels),
        )


def _check_root(root: Path | None) -> Path:
    root = require_root(root, f"mimic-cxr: --root {root} is not a folder; pass the folder that holds files/ and the CSVs")
    missing = [f for f in (SPLIT_FILE, METADATA_FILE, LABEL_FILE) if not (root / f).exists()]
    if missing:
        raise LeaderError(
            f"mimic-cxr: expected {', '.join(missing)} under {root}; is --root the mimic-cxr-jpg/2.0.0 "
            "folder that holds files/ and the .csv.gz label files?"
        )
    return root


def _read(root: Path, filename: str, columns: list[str]) -> pd.DataFrame:
    # Ids stay strings (subject 10000032, not 1.0000032e7); blank labels stay "" (not mentioned).
    table = pd.read_csv(root / filename, dtype=str, keep_default_na=False)
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise LeaderError(f"mimic-cxr: {filename} lacks the column(s) {missing}")
    return table[columns].apply(lambda col: col.str.strip())
