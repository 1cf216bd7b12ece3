"""shenzhen: the Shenzhen chest X-ray set (662 PNGs, about 3000x3000), normal vs tuberculosis.

Expected ``--root`` layout (ChinaSet_AllFiles as distributed, or the folder that contains it)::

    ROOT/
      CXR_png/CHNCXR_0001_0.png ...       the label is the last digit: 0 normal, 1 tuberculosis
      ClinicalReadings/CHNCXR_0001_0.txt  optional: sex/age line, then the radiologist's reading

Labels: ``tuberculosis`` = the file name's last digit, and ``no_finding`` = its opposite (the
0-class images are the set's normal class, and healthy). The reading, when present, is kept verbatim in
``source_labels["clinical_reading"]``.

Splits: no official split; patient-wise (70/15/15). There are no patient ids (one image per
person), so the image id (file name without ``.png``) stands in for the patient. The landmark
dataset (cxr-landmarks) annotates a subset of these images under the same file names; that
adapter flags them.

Every file in CXR_png/ is accounted for: a file whose name does not follow
``CHNCXR_####_{0,1}.png`` is rejected with that reason (e.g. a stray Thumbs.db).
"""
from __future__ import annotations

import functools
import itertools
import re
from pathlib import Path
from typing import Iterator

from leader.errors import LeaderError
from leader.shards.datasets import register_dataset
from leader.shards.datasets._checks import require_root
from leader.shards.imageio import read_image
from leader.shards.records import RejectLog, SourceRecord
from leader.shards.vocabulary import ordered, patient_split

FILE_NAME = re.compile(r"^CHNCXR_(\d{4})_([01])\.png$", re.IGNORECASE)
DATA_DIRS = (".", "ChinaSet_AllFiles")


@register_dataset("shenzhen")
class Shenzhen:
    """Shenzhen: 662 CXRs, normal vs tuberculosis from the file name; patient-wise split."""

    name = "shenzhen"
    label_names = ordered(["tuberculosis", "no_finding"])
    has_boxes = False
    has_landmarks = False
    overlap_note = "cxr-landmarks annotates a subset of the Shenzhen images (same file names)"

    def records(self, root: Path | None, rejects: RejectLog, *, seed: int, n: int | None) -> Iterator[SourceRecord]:
        root = require_root(root, f"shenzhen: --root must be the folder that holds CXR_png/; got {root}")
        for candidate in DATA_DIRS:
            if (root / candidate / "CXR_png").is_dir():
                data_dir = root / candidate
                break
        else:
            raise LeaderError(
                f"shenzhen: expected CXR_png/ (CHNCXR_####_0.png, CHNCXR_####_1.png) in {root} or "
                f"{root}/ChinaSet_AllFiles; is --root the ChinaSet_AllFiles folder?"
            )
        return itertools.islice(self._emit(root, data_dir, rejects, seed), n)

    def _emit(self, root: Path, data_dir: Path, rejects: RejectLog, seed: int) -> Iterator[SourceRecord]:
        readings = data_dir / "ClinicalReadings"
        for file in sorted((data_dir / "CXR_png").iterdir()):
            relative = file.relative_to(root).as_posix()
            match = FILE_NAME.match(file.name)
            if not file.is_file() or not match:
                rejects.add(relative, "file name does not follow CHNCXR_####_{0,1}.png")
                continue
            digit = match.group(2)
            image_id = file.stem
            source_labels = {"file_name_label": digit}
            reading = readings / f"{image_id}.txt"
            if reading.is_file():
                source_labels["clinical_reading"] = reading.read_text(encoding="utf-8", errors="replace").strip()
            yield SourceRecord(
                dataset=self.name,
                image_id=image_id,
                path=relative,
                load=functools.partial(read_image, str(file)),
                patient_id=image_id,
                split=patient_split(self.name, image_id, seed),
                labels={"tuberculosis": int(digit), "no_finding": 1 - int(digit)},
                source_labels=source_labels,
                boxes=[],
                landmarks=None,
                healthy=digit == "0",
            )
