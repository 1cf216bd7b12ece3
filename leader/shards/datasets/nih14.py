"""NIH ChestX-ray14 (Wang et al. 2017): 112,120 frontal 8-bit PNGs of 30,805 patients.

Expected ``--root`` (the NIH Box release or the Kaggle ``nih-chest-xrays/data`` folder, as-is)::

    ROOT/
      Data_Entry_2017.csv            (or Data_Entry_2017_v2020.csv: any Data_Entry_2017*.csv)
      BBox_List_2017.csv             optional: 984 boxes on 880 images, [x, y, w, h] in pixels
      train_val_list.txt             official split, one image name per line
      test_list.txt
      images/00000001_000.png ...    or images_001/images/*.png ... images_012/images/*.png:
                                     PNGs are found anywhere below ROOT by file name

Labels: the 14 findings plus "No Finding" are all read for every image, so a finding absent from
``Finding Labels`` is a 0, not unknown. A row naming an unknown finding, or "No Finding" together
with a finding, is rejected.

Split: ``test_list.txt`` is test; validation is carved patient-wise out of ``train_val_list.txt``
(``val_fraction`` of the patients, 12.5% by default), so no patient spans train and val. Without
the two split lists every image gets a patient-wise train/val/test split instead. An image in the
CSV but in neither list is rejected.

Boxes: the bounding-box file names the finding "Infiltrate" where the label file says
"Infiltration"; both map to ``infiltration``. Its ``[x, y, w, h]`` become (x0, y0, x1, y1), in the
pixels of the released 1024 x 1024 PNGs (the record's frame): copies resized to another size,
such as torchxrayvision's 512 px files, get their boxes scaled by the builder.

Healthy: an image whose ``Finding Labels`` is exactly "No Finding". A box on such an image
contradicts it, and the builder rejects the image.

Class sets: ``paper`` is the 14 findings, without ``no_finding``.
"""
from __future__ import annotations

import functools
import glob
from pathlib import Path
from typing import Iterator

import pandas as pd

from leader.errors import LeaderError
from leader.shards.class_sets import ClassSet
from leader.shards.datasets import register_dataset
from leader.shards.datasets._checks import check_val_fraction, require_root
from leader.shards.imageio import read_image
from leader.shards.records import Box, RejectLog, SourceRecord
from leader.shards.vocabulary import carve_val, ordered, patient_split

NIH_TO_VOCABULARY = {
    "No Finding": "no_finding",
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Consolidation": "consolidation",
    "Edema": "edema",
    "Effusion": "effusion",
    "Emphysema": "emphysema",
    "Fibrosis": "fibrosis",
    "Hernia": "hernia",
    "Infiltration": "infiltration",
    "Mass": "mass",
    "Nodule": "nodule",
    "Pleural_Thickening": "pleural_thickening",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
}
BOX_NAME_ALIASES = {"Infiltrate": "Infiltration"}
NO_FINDING = "No Finding"
# Every released PNG is 1024 x 1024; BBox_List_2017.csv is given in its pixels.
FRAME = (1024, 1024)


@register_dataset("nih14")
class NIHChestXray14:
    name = "nih14"
    label_names = ordered(NIH_TO_VOCABULARY.values())
    has_boxes = True
    has_landmarks = False
    overlap_note = (
        "RSNA Pneumonia, SIIM-ACR, ChestX-Det and part of COVIDx are drawn from NIH ChestX-ray14 images"
    )
    class_sets = {"paper": ClassSet(tuple(n for n in label_names if n != "no_finding"),
                                    about="the 14 ChestX-ray14 findings, without No Finding")}

    def __init__(self, val_fraction: float = 0.125):
        self.val_fraction = check_val_fraction("nih14", val_fraction)

    def records(
        self, root: Path | None, rejects: RejectLog, *, seed: int = 0, n: int | None = None
    ) -> Iterator[SourceRecord]:
        root = _check_root(root)
        entries = _read_data_entry(root)
        boxes = _read_boxes(root, set(entries["Image Index"]), rejects)
        official = _read_official_split(root)
        images = {p.name: p for p in sorted(root.rglob("*.png"))}
        yielded = 0
        for row in entries.itertuples(index=False):
            if n is not None and yielded >= n:
                return
            record = self._record(row, root, images, boxes, official, rejects, seed)
            if record is not None:
                yielded += 1
                yield record

    def _record(self, row, root, images, boxes, official, rejects, seed) -> SourceRecord | None:
        image_id, findings, patient, view = row
        path = images.get(image_id)
        where = str(path.relative_to(root)) if path else f"images/{image_id}"
        if path is None:
            rejects.add(where, "image file not found under --root")
            return None
        names = [f.strip() for f in findings.split("|") if f.strip()]
        unknown = sorted(set(names) - set(NIH_TO_VOCABULARY))
        if unknown:
            rejects.add(where, f"unknown finding: {unknown} in Data_Entry_2017 'Finding Labels'")
            return None
        if NO_FINDING in names and len(names) > 1:
            rejects.add(where, f"'No Finding' mixed with findings: {findings!r} in Data_Entry_2017")
            return None
        if not patient:
            rejects.add(where, "no patient id: empty 'Patient ID' in Data_Entry_2017")
            return None
        patient_id = patient
        if official is None or image_id not in official:
            if official is not None:
                rejects.add(where, "not in the official split: in neither train_val_list.txt nor test_list.txt")
                return None
            split = patient_split(self.name, patient_id, seed)
        else:
            # train_val_list.txt is the official train split; val is carved from it by patient.
            split = carve_val("test" if official[image_id] == "test" else "train", self.name, patient_id, seed,
                              self.val_fraction)
        labels = {vocab: int(nih in names) for nih, vocab in NIH_TO_VOCABULARY.items()}
        return SourceRecord(
            dataset=self.name,
            image_id=image_id,
            path=where,
            load=functools.partial(read_image, path),
            patient_id=patient_id,
            split=split,
            labels=labels,
            source_labels={"Finding Labels": findings},
            boxes=boxes.get(image_id, []),
            landmarks=None,
            view=view or None,
            healthy=names == [NO_FINDING],
            frame=FRAME,
        )


def _check_root(root: Path | None) -> Path:
    return require_root(root, f"nih14: --root {root} is not a folder; pass the folder that holds images/ and Data_Entry_2017.csv")


def _read_data_entry(root: Path) -> pd.DataFrame:
    candidates = sorted(glob.glob(str(root / "Data_Entry_2017*.csv")))
    if not candidates:
        raise LeaderError(
            f"nih14: expected Data_Entry_2017*.csv under {root}; "
            "is --root the folder that holds images/ and the CSVs?"
        )
    path = Path(candidates[0])
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table.columns = [c.strip() for c in table.columns]
    needed = ["Image Index", "Finding Labels", "Patient ID", "View Position"]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise LeaderError(f"nih14: {path.name} lacks the column(s) {missing}; found {list(table.columns)}")
    return table[needed].apply(lambda col: col.str.strip())


def _read_boxes(root: Path, known_images: set[str], rejects: RejectLog) -> dict[str, list[Box]]:
    path = root / "BBox_List_2017.csv"
    if not path.exists():
        return {}
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    # The release spells the box columns `Bbox [x`, `y`, `w`, `h]` and ends with unnamed empty ones.
    table = table.loc[:, [c for c in table.columns if not c.startswith("Unnamed")]]
    table.columns = [c.strip() for c in table.columns]
    coords = ["Bbox [x", "y", "w", "h]"]
    if not {"Image Index", "Finding Label", *coords} <= set(table.columns):
        raise LeaderError(f"nih14: {path.name} should have columns Image Index, Finding Label, {coords}")
    boxes: dict[str, list[Box]] = {}
    for line, (image_id, finding, *xywh) in enumerate(
        zip(table["Image Index"], table["Finding Label"], *(table[c] for c in coords)), start=2
    ):
        image_id, finding = image_id.strip(), finding.strip()
        finding = BOX_NAME_ALIASES.get(finding, finding)
        where = f"BBox_List_2017.csv:{line}"
        if finding not in NIH_TO_VOCABULARY or finding == NO_FINDING:
            rejects.add(where, f"unknown finding: box for {finding!r} on {image_id}")
            continue
        if image_id not in known_images:
            rejects.add(where, f"box on an unknown image: {image_id} is not in Data_Entry_2017")
            continue
        try:
            x, y, w, h = (float(v) for v in xywh)
        except ValueError:
            rejects.add(where, f"unparseable box: [x, y, w, h] = {xywh} on {image_id}")
            continue
        boxes.setdefault(image_id, []).append(Box(NIH_TO_VOCABULARY[finding], x, y, x + w, y + h))
    return boxes


def _read_official_split(root: Path) -> dict[str, str] | None:
    """image name -> "train_val" | "test"; None when the release's split lists are absent."""
    lists = {"train_val": root / "train_val_list.txt", "test": root / "test_list.txt"}
    present = {k: p for k, p in lists.items() if p.exists()}
    if not present:
        return None
    if len(present) == 1:
        missing = next(p for k, p in lists.items() if k not in present)
        raise LeaderError(f"nih14: found {next(iter(present.values())).name} but not {missing}")
    split = {}
    for name, path in lists.items():
        for line in path.read_text().splitlines():
            if line.strip():
                split[line.strip()] = name
    return split
