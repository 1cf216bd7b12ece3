"""covidx: COVIDx CXR (COVID-Net), PNG/JPEG images listed in train.txt / test.txt.

Expected ``--root`` layout (the Kaggle / COVID-Net release as distributed)::

    ROOT/
      train.txt   test.txt   [val.txt]       (older releases: train_split.txt, test_split.txt)
      train/<filename>   test/<filename>   [val/<filename>]

Each list line is ``patient_id filename label source``, space separated (releases before
CXR-3 have no source column; a file name containing spaces is taken as the middle tokens).
Labels by release:

=================  ===========  =============  ==============
label              ``covid19``  ``pneumonia``  ``no_finding``
=================  ===========  =============  ==============
positive           1            (not given)    (not given)
negative           0            (not given)    (not given)
COVID-19           1            None           0
pneumonia          0            1              0
normal             0            0              1
=================  ===========  =============  ==============

"negative" (CXR-3/4) pools normal and non-COVID pneumonia, so neither is claimed; a COVID-19
image may or may not show pneumonia, so pneumonia is unknown (None), not 0. Healthy: ``normal``
only (older releases); a "negative" image is not known to be normal.

Splits: the official lists (``val.txt`` where the release has one, else ``val`` is carved
patient-wise out of train: option ``val_fraction``, 15% by default). Patient ids come from the
first column.

Overlap: COVIDx pools other public sets; images whose source is ``rsna`` are RSNA Pneumonia images,
which come from NIH ChestX-ray14, and carry ``extra["also_in"] = ["rsna", "nih14"]``.
"""
from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Iterator

from leader.errors import LeaderError
from leader.shards.datasets import register_dataset
from leader.shards.datasets._checks import check_val_fraction, require_root
from leader.shards.imageio import read_image
from leader.shards.records import RejectLog, SourceRecord
from leader.shards.vocabulary import carve_val, ordered

LABELS = {
    "positive": {"covid19": 1},
    "negative": {"covid19": 0},
    "covid-19": {"covid19": 1, "pneumonia": None, "no_finding": 0},
    "covid19": {"covid19": 1, "pneumonia": None, "no_finding": 0},
    "pneumonia": {"covid19": 0, "pneumonia": 1, "no_finding": 0},
    "normal": {"covid19": 0, "pneumonia": 0, "no_finding": 1},
}
# Sources (lower case) whose images are also in other datasets we pretrain on.
ALSO_IN = {"rsna": ["rsna", "nih14"], "nih": ["nih14"]}
# split -> list file names, newest release first.
LIST_FILES = {
    "train": ("train.txt", "train_split.txt"),
    "val": ("val.txt",),
    "test": ("test.txt", "test_split.txt"),
}


class _LineError(ValueError):
    pass


@register_dataset("covidx")
class COVIDx:
    """COVIDx CXR: COVID-19 vs negative (CXR-3/4) or COVID-19 / pneumonia / normal (older)."""

    name = "covidx"
    label_names = ordered(["covid19", "pneumonia", "no_finding"])
    has_boxes = False
    has_landmarks = False
    overlap_note = "COVIDx pools public sets, including RSNA Pneumonia images (themselves from NIH ChestX-ray14)"

    def __init__(self, val_fraction: float = 0.15):
        self.val_fraction = check_val_fraction("covidx", val_fraction)

    def records(self, root: Path | None, rejects: RejectLog, *, seed: int, n: int | None) -> Iterator[SourceRecord]:
        root = require_root(root, f"covidx: --root must be the folder that holds train.txt, test.txt, train/ and test/; got {root}")
        lists = []
        for split, candidates in LIST_FILES.items():
            found = next((root / c for c in candidates if (root / c).is_file()), None)
            if found is None:
                if split == "val":
                    continue
                raise LeaderError(
                    f"covidx: expected {' or '.join(candidates)} in {root}; is --root the COVIDx folder "
                    "(train.txt, test.txt, train/, test/)?"
                )
            if not (root / split).is_dir():
                raise LeaderError(f"covidx: {found.name} lists images, but the folder {root / split} does not exist")
            lists.append((split, found))
        carve_val_split = "val" not in {split for split, _ in lists}
        return itertools.islice(self._emit(root, lists, carve_val_split, rejects, seed), n)

    def _emit(self, root: Path, lists, carve_val_split: bool, rejects: RejectLog, seed: int) -> Iterator[SourceRecord]:
        for split, list_file in lists:
            lines = list_file.read_text(encoding="utf-8", errors="replace").splitlines()
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    patient_id, filename, label, source = parse_line(line)
                except _LineError as e:
                    rejects.add(f"{list_file.name}:{number}", f"{list_file.name} line {number}: {e}")
                    continue
                final_split = split
                if carve_val_split:
                    final_split = carve_val(split, self.name, patient_id, seed, self.val_fraction)
                source_labels = {"label": label}
                if source is not None:
                    source_labels["source"] = source
                extra = {"official_split": split}
                if source is not None and source.lower() in ALSO_IN:
                    extra["also_in"] = ALSO_IN[source.lower()]
                yield SourceRecord(
                    dataset=self.name,
                    image_id=Path(filename).stem,
                    path=f"{split}/{filename}",
                    load=functools.partial(read_image, str(root / split / filename)),
                    patient_id=patient_id,
                    split=final_split,
                    labels=dict(LABELS[label.lower()]),
                    source_labels=source_labels,
                    boxes=[],
                    landmarks=None,
                    extra=extra,
                    healthy=label.lower() == "normal",
                )


def parse_line(line: str) -> tuple[str, str, str, str | None]:
    """(patient_id, filename, label, source or None) from one list line, or `_LineError`.

    The label is the last token that names a known class; the source, if any, follows it, and the
    file name is everything between the patient id and the label (it may hold spaces).
    """
    tokens = line.split()
    for at in (len(tokens) - 2, len(tokens) - 1):
        if at >= 2 and tokens[at].lower() in LABELS:
            source = tokens[at + 1] if at == len(tokens) - 2 else None
            return tokens[0], " ".join(tokens[1:at]), tokens[at], source
    if len(tokens) < 3:
        raise _LineError(f"expected 'patient_id filename label [source]', got {line.strip()!r}")
    raise _LineError(f"unknown label in {line.strip()!r}; expected one of {sorted(set(LABELS))}")
