"""What a dataset adapter hands the shard builder: one `SourceRecord` per image.

Coordinates in records are in the pixels of the record's annotation `frame`: the image size the
dataset's annotations were drawn on (NIH's boxes: 1024 x 1024), or, when the frame is None, the
file as read. The builder scales them to the file actually read, then to the stored image. Labels
use the shared vocabulary, with 1, 0, or None for unknown/uncertain.

`healthy` is the dataset's own positive statement that the image is normal (NIH "No Finding",
TBX11K's health class, ...); only such images give healthy patches. No finding found, or a
finding the vocabulary does not know, is not that statement.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class Box:
    label: str
    x0: float
    y0: float
    x1: float
    y1: float
    # The dataset's own class name where the vocabulary renames or merges it (VinDr "Nodule/Mass",
    # ChestX-Det "Diffuse Nodule"), so that evaluation can score the dataset's own classes.
    source_label: str | None = None

    def as_list(self) -> list[float]:
        return [self.x0, self.y0, self.x1, self.y1]


@dataclass
class SourceRecord:
    dataset: str
    image_id: str
    path: str
    load: Callable[[], np.ndarray]
    patient_id: str
    split: str
    labels: dict[str, int | None]
    source_labels: dict = field(default_factory=dict)
    boxes: list[Box] = field(default_factory=list)
    landmarks: dict[str, tuple[float, float]] | None = None
    view: str | None = None
    extra: dict = field(default_factory=dict)
    healthy: bool = False
    frame: tuple[int, int] | None = None                  # (height, width) the annotations are given in
    source_classes: dict[str, int | None] | None = None   # the dataset's own class names, coded as labels
    # Segmentation masks, for adapters with `mask_classes`: called in a build worker with the
    # annotation frame's (height, width) (the loaded file's when `frame` is None), it returns a
    # `leader.shards.masks.ClassMasks` or raises `MaskError` (the sample is then rejected with that
    # reason). It must pickle, as `load` does.
    masks: Callable[[int, int], object] | None = None

    @property
    def key(self) -> str:
        return sample_key(self.dataset, self.image_id)


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(dataset: str, image_id: str) -> str:
    """`<dataset>/<safe id>`: webdataset splits a member name at its first dot, so ids lose dots.

    When sanitising changes the id, a short hash of the original keeps distinct ids distinct
    (`é.png` and `ü.png` would otherwise both become `_`).
    """
    safe = _UNSAFE.sub("_", image_id)
    if safe != image_id:
        import hashlib

        safe += "_" + hashlib.sha256(image_id.encode("utf-8")).hexdigest()[:8]
    return f"{dataset}/{safe}"


SPLITS = ("train", "val", "test")


class RejectLog:
    """Collects (path, reason) for every input that could not be used. Nothing is dropped silently."""

    def __init__(self) -> None:
        self.entries: list[dict] = []
        self._lock = threading.Lock()

    def add(self, path: str, reason: str, key: str | None = None) -> None:
        entry = {"path": str(path), "reason": str(reason)}
        if key is not None:
            entry["key"] = key
        with self._lock:
            self.entries.append(entry)

    def __len__(self) -> int:
        return len(self.entries)
