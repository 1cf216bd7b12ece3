"""PadChest (Bustos et al. 2020): 160,868 images of 67,625 patients, 16-bit PNG (10-12 bits used).

Expected ``--root`` (the BIMCV release, unzipped as-is)::

    ROOT/
      PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz)   or any *.csv(.gz) with the columns
                ImageID, ImageDir, PatientID, Projection, MethodLabel, Labels
      0/<ImageID>.png  1/...  ...  54/...      one folder per ImageDir value (the zip number)

An image not found at ``<ImageDir>/<ImageID>`` is looked up by file name anywhere below ROOT, for
copies that were unzipped into other folder names.

Labels: ``Labels`` is a stringified Python list (``"['pleural effusion', 'cardiomegaly']"``),
parsed with ``ast.literal_eval``; entries are stripped. The list is the full set of findings
extracted from the report, so a mapped vocabulary label absent from it is 0. ``normal`` sets
``no_finding`` = 1. PadChest's finer names fold into the vocabulary (e.g. ``laminar atelectasis``
-> atelectasis, ``pacemaker`` -> support_devices); every raw label, mapped or not, is kept in
``source_labels["Labels"]``. An empty list gives unknown (None) labels. Healthy: the list is
``normal`` and nothing else; any other entry, mapped or not (``scoliosis``, ``exclude``,
``suboptimal study``), is not that statement. ``MethodLabel`` (Physician
or RNN_model) is kept in ``extra``.

Split: patient-wise on ``PatientID`` (PadChest has no official split). ``frontal_only`` (default
True) keeps Projection PA, AP and AP_horizontal and skips laterals and others by choice.
"""
from __future__ import annotations

import ast
import functools
import glob
from pathlib import Path
from typing import Iterator

import pandas as pd

from leader.errors import LeaderError
from leader.shards.datasets import register_dataset
from leader.shards.datasets._checks import require_root
from leader.shards.imageio import read_image
from leader.shards.records import RejectLog, SourceRecord
from leader.shards.vocabulary import ordered, patient_split

_GROUPS = {
    "no_finding": ["normal"],
    "atelectasis": ["atelectasis", "laminar atelectasis", "lobar atelectasis", "segmental atelectasis",
                    "round atelectasis", "total atelectasis", "atelectasis basal"],
    "cardiomegaly": ["cardiomegaly"],
    "consolidation": ["consolidation"],
    "edema": ["pulmonary edema"],
    "effusion": ["pleural effusion", "loculated pleural effusion", "loculated fissural effusion"],
    "emphysema": ["emphysema"],
    "fibrosis": ["pulmonary fibrosis"],
    "hernia": ["hiatal hernia"],
    "infiltration": ["infiltrates"],
    "mass": ["mass", "pulmonary mass", "mediastinal mass", "breast mass", "pleural mass"],
    "nodule": ["nodule", "multiple nodules"],
    "pleural_thickening": ["pleural thickening", "apical pleural thickening"],
    "pneumonia": ["pneumonia", "atypical pneumonia"],
    "pneumothorax": ["pneumothorax"],
    "calcification": ["calcified densities", "calcified granuloma", "calcified adenopathy",
                      "calcified mediastinal adenopathy", "calcified pleural thickening",
                      "calcified pleural plaques"],
    "tuberculosis": ["tuberculosis"],
    "lung_cavity": ["cavitation"],
    "mediastinal_shift": ["mediastinal shift"],
    "rib_fracture": ["rib fracture"],
    "clavicle_fracture": ["clavicle fracture"],
    "fracture": ["rib fracture", "clavicle fracture", "vertebral fracture", "humeral fracture"],
    "support_devices": ["pacemaker", "dual chamber device", "single chamber device", "electrical device",
                        "nsg tube", "endotracheal tube", "tracheostomy tube", "chest drain tube",
                        "central venous catheter", "central venous catheter via subclavian vein",
                        "central venous catheter via jugular vein", "central venous catheter via umbilical vein",
                        "reservoir central venous catheter", "catheter", "picc"],
}
# raw PadChest label (lower case) -> the vocabulary names it sets to 1
PADCHEST_TO_VOCABULARY: dict[str, list[str]] = {}
for _vocab, _names in _GROUPS.items():
    for _name in _names:
        PADCHEST_TO_VOCABULARY.setdefault(_name, []).append(_vocab)

COLUMNS = ["ImageID", "ImageDir", "PatientID", "Projection", "MethodLabel", "Labels"]
FRONTAL_PROJECTIONS = {"PA", "AP", "AP_horizontal"}


@register_dataset("padchest")
class PadChest:
    name = "padchest"
    label_names = ordered(_GROUPS)
    has_boxes = False
    has_landmarks = False
    overlap_note = "NODE21 draws part of its images from PadChest"

    def __init__(self, frontal_only: bool = True):
        self.frontal_only = bool(frontal_only)

    def records(
        self, root: Path | None, rejects: RejectLog, *, seed: int = 0, n: int | None = None
    ) -> Iterator[SourceRecord]:
        root = require_root(root, f"padchest: --root {root} is not a folder; pass the folder that holds the label CSV")
        csv_path = find_label_csv(root)
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, usecols=lambda c: c.strip() in COLUMNS)
        table.columns = [c.strip() for c in table.columns]
        missing = [c for c in COLUMNS if c not in table.columns]
        if missing:
            raise LeaderError(f"padchest: {csv_path.name} lacks the column(s) {missing}")
        by_name: dict[str, Path] | None = None  # built on the first image not where the CSV says
        yielded = 0
        for line, (image_id, image_dir, patient, projection, method, raw_labels) in enumerate(
            table[COLUMNS].itertuples(index=False), start=2
        ):
            if n is not None and yielded >= n:
                return
            image_id, projection = image_id.strip(), projection.strip()
            if self.frontal_only and projection not in FRONTAL_PROJECTIONS:
                continue
            folder = _folder_name(image_dir)
            where = f"{folder}/{image_id}"
            path = root / folder / image_id
            if not path.is_file():
                if by_name is None:
                    by_name = {p.name: p for p in sorted(root.rglob("*.png"))}
                path = by_name.get(image_id)
                if path is None:
                    rejects.add(where, "image file not found under --root")
                    continue
                where = str(path.relative_to(root))
            try:
                raw = parse_labels(raw_labels)
            except ValueError as e:
                rejects.add(where, f"unparseable Labels: {e} ({csv_path.name} row {line})")
                continue
            if not patient.strip():
                rejects.add(where, f"no patient id: empty PatientID ({csv_path.name} row {line})")
                continue
            yielded += 1
            yield SourceRecord(
                dataset=self.name,
                image_id=image_id,
                path=where,
                load=functools.partial(read_image, path),
                patient_id=patient.strip(),
                split=patient_split(self.name, patient.strip(), seed),
                labels=harmonise(raw),
                source_labels={"Labels": raw},
                boxes=[],
                landmarks=None,
                view=projection or None,
                extra={"MethodLabel": method.strip()},
                healthy=states_normal(raw),
            )


def parse_labels(text: str) -> list[str]:
    """`"['pleural effusion', ' cardiomegaly']"` -> ["pleural effusion", "cardiomegaly"]."""
    text = text.strip()
    if not text:
        return []
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"{text[:80]!r} is not a Python list literal") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{text[:80]!r} is not a list of strings")
    return [v.strip() for v in value if v.strip()]


def states_normal(raw: list[str]) -> bool:
    """PadChest's "normal", alone: any other entry, mapped or not, is a finding or a doubt."""
    return bool(raw) and {name.lower() for name in raw} == {"normal"}


def harmonise(raw: list[str]) -> dict[str, int | None]:
    if not raw:
        return {vocab: None for vocab in _GROUPS}
    positive = {vocab for name in raw for vocab in PADCHEST_TO_VOCABULARY.get(name.lower(), [])}
    return {vocab: int(vocab in positive) for vocab in _GROUPS}


def find_label_csv(root: Path) -> Path:
    named = sorted(glob.glob(str(root / "PADCHEST_chest_x_ray_images_labels_160K*.csv*")))
    if named:
        return Path(named[0])
    for candidate in sorted(list(root.glob("*.csv")) + list(root.glob("*.csv.gz"))):
        header = pd.read_csv(candidate, nrows=0).columns
        if set(COLUMNS) <= {c.strip() for c in header}:
            return candidate
    raise LeaderError(
        f"padchest: expected PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv (or a CSV with columns "
        f"{', '.join(COLUMNS)}) under {root}; is --root the folder that holds the CSV and the image folders?"
    )


def _folder_name(image_dir: str) -> str:
    """ImageDir is the zip number; some exports write it as a float ("12.0")."""
    value = image_dir.strip()
    try:
        return str(int(float(value)))
    except ValueError:
        return value
