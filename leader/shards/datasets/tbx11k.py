"""tbx11k: TBX11K tuberculosis detection, 512x512 PNGs (RGB, read as grey) with COCO boxes.

Expected ``--root`` layout (the TBX11K download as distributed)::

    ROOT/
      imgs/health/h*.png   imgs/sick/s*.png   imgs/tb/tb*.png   (imgs/test/, imgs/extra/ unused)
      annotations/json/TBX11K_train.json
      annotations/json/TBX11K_val.json

Each JSON is COCO: ``images`` (``id``, ``file_name`` relative to ``imgs/``, e.g.
``tb/tb0003.png``), ``annotations`` (``image_id``, ``category_id``, ``bbox`` = ``[x, y, w, h]``)
and ``categories`` (ActiveTuberculosis, ObsoletePulmonaryTuberculosis, PulmonaryTuberculosis).

Labels, from the image's folder (TBX11K's image-level classes):

==========  ================  ==========  ==========
folder      ``tuberculosis``  ``abnormal``  ``no_finding``
==========  ================  ==========  ==========
health      0                 0           1
sick        0                 1           0
tb          1                 1           0
==========  ================  ==========  ==========

Every box is a ``tuberculosis`` box; its COCO category (active / latent / uncertain TB) is kept in
``source_labels["categories"]`` and as the box's ``source_label``. Boxes are in the pixels of the
image the COCO entry describes (its ``width`` and ``height``, 512 x 512 in the release: the
record's frame; resized copies get their boxes scaled).

Healthy: the ``health`` class only; ``sick`` images are abnormal without TB. A box on a health/
or sick/ image contradicts the folder and the image is rejected, as is an image with a box that
cannot be parsed (a partial set of boxes would let a healthy patch be cut over an unboxed lesion).

Splits: TBX11K's test labels are withheld, so the official ``val`` json (1,800 images, the set
papers report on) becomes ``test``, and ``val`` is carved patient-wise out of the official train
json (option ``val_fraction``, 15% by default). TBX11K has no patient ids: the image id
(``tb/tb0003.png`` -> ``tb/tb0003``) stands in.
"""
from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path, PurePosixPath
from typing import Iterator

from leader.errors import LeaderError
from leader.shards.datasets import register_dataset
from leader.shards.datasets._checks import check_val_fraction, read_json_file, require_root
from leader.shards.imageio import read_image
from leader.shards.records import Box, RejectLog, SourceRecord
from leader.shards.vocabulary import carve_val, ordered

CATEGORIES = ("ActiveTuberculosis", "ObsoletePulmonaryTuberculosis", "PulmonaryTuberculosis")
FOLDER_LABELS = {
    "health": {"tuberculosis": 0, "abnormal": 0, "no_finding": 1},
    "sick": {"tuberculosis": 0, "abnormal": 1, "no_finding": 0},
    "tb": {"tuberculosis": 1, "abnormal": 1, "no_finding": 0},
}
FRAME = (512, 512)   # the released images, when a COCO entry does not give its size
# Official annotation file -> our split ("train" is further carved into train/val).
ANNOTATIONS = {"TBX11K_train.json": "train", "TBX11K_val.json": "test"}


class _ImageError(ValueError):
    pass


@register_dataset("tbx11k")
class TBX11K:
    """TBX11K: 512x512 CXRs, healthy / sick / TB with TB boxes (official val used as test)."""

    name = "tbx11k"
    label_names = ordered(["tuberculosis", "abnormal", "no_finding"])
    has_boxes = True
    has_landmarks = False
    overlap_note = None

    def __init__(self, val_fraction: float = 0.15):
        self.val_fraction = check_val_fraction("tbx11k", val_fraction)

    def records(self, root: Path | None, rejects: RejectLog, *, seed: int, n: int | None) -> Iterator[SourceRecord]:
        root = require_root(root, f"tbx11k: --root must be the TBX11K folder that holds imgs/ and annotations/; got {root}")
        if not (root / "imgs").is_dir():
            raise LeaderError(f"tbx11k: expected the image folder imgs/ (health/, sick/, tb/) under {root}")
        sources = [(name, split, read_coco(root / "annotations" / "json" / name, rejects)) for name, split in ANNOTATIONS.items()]
        return itertools.islice(self._emit(root, sources, rejects, seed), n)

    def _emit(self, root: Path, sources, rejects: RejectLog, seed: int) -> Iterator[SourceRecord]:
        for json_name, official, images in sources:
            for file_name, image_annotations, frame in images:
                path = f"imgs/{file_name}"
                try:
                    folder, boxes, categories = parse_image(file_name, image_annotations)
                except _ImageError as e:
                    rejects.add(path, f"{json_name}: {e}")
                    continue
                image_id = PurePosixPath(file_name).with_suffix("").as_posix()
                split = carve_val(official, self.name, image_id, seed, self.val_fraction)
                yield SourceRecord(
                    dataset=self.name,
                    image_id=image_id,
                    path=path,
                    load=functools.partial(read_image, str(root / "imgs" / file_name)),
                    patient_id=image_id,
                    split=split,
                    labels=dict(FOLDER_LABELS[folder]),
                    source_labels={"folder": folder, "categories": categories},
                    boxes=boxes,
                    landmarks=None,
                    extra={"official_split": "train" if official == "train" else "val"},
                    healthy=folder == "health",
                    frame=frame,
                )


def read_coco(path: Path, rejects: RejectLog) -> list[tuple[str, list[dict], tuple[int, int]]]:
    """(file_name, its annotations, its (height, width)) per image, in the file's image order.

    Structural faults of the whole file are a `LeaderError`; an annotation that points at no image
    is rejected on its own.
    """
    coco = read_json_file(path, "tbx11k", "the TBX11K folder (imgs/ and annotations/json/TBX11K_train.json, "
                                          "TBX11K_val.json)")
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in ("images", "annotations", "categories")):
        raise LeaderError(f"tbx11k: {path} is not COCO: expected lists 'images', 'annotations' and 'categories'")
    categories = {c.get("id"): c.get("name") for c in coco["categories"] if isinstance(c, dict)}
    images: dict = {}
    for image in coco["images"]:
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            rejects.add(path.name, f"{path.name}: image entry without id and file_name: {str(image)[:120]}")
            continue
        images[image["id"]] = (image["file_name"], [], _frame(image))
    for ann in coco["annotations"]:
        owner = images.get(ann.get("image_id")) if isinstance(ann, dict) else None
        if owner is None:
            rejects.add(path.name, f"{path.name}: annotation {str(ann)[:120]} refers to no image")
            continue
        owner[1].append({**ann, "category": categories.get(ann.get("category_id"))})
    return list(images.values())


def _frame(image: dict) -> tuple[int, int]:
    """The size a COCO image entry states, else the release's 512 x 512."""
    height, width = image.get("height"), image.get("width")
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (height, width)):
        return height, width
    return FRAME


def parse_image(file_name: str, annotations: list[dict]) -> tuple[str, list[Box], list[str]]:
    """The image's folder, boxes and box categories, or `_ImageError`."""
    folder = PurePosixPath(file_name).parts[0] if "/" in file_name else ""
    if folder not in FOLDER_LABELS:
        raise _ImageError(f"{file_name!r} is not under health/, sick/ or tb/")
    boxes, categories = [], []
    for ann in annotations:
        category = ann["category"]
        if category not in CATEGORIES:
            raise _ImageError(f"box with unknown category_id {ann.get('category_id')!r}")
        bbox = ann.get("bbox")
        numbers = []
        if isinstance(bbox, list) and len(bbox) == 4:
            try:
                numbers = [float(v) for v in bbox if not isinstance(v, bool)]
            except (TypeError, ValueError):
                numbers = []
        if len(numbers) != 4 or not all(math.isfinite(v) for v in numbers):
            raise _ImageError(f"bbox {bbox!r} is not [x, y, w, h] numbers")
        x, y, w, h = numbers
        boxes.append(Box("tuberculosis", x, y, x + w, y + h, source_label=category))
        categories.append(category)
    if boxes and folder != "tb":
        raise _ImageError(f"{len(boxes)} TB box(es) on an image in the {folder}/ folder")
    return folder, boxes, categories
