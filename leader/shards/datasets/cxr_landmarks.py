"""cxr-landmarks: the Chest-xray-landmark-dataset (Gaggion et al.), lung and heart contours as points.

Expected ``--root`` layout (the ngaggion/Chest-xray-landmark-dataset repository, with its
``Images/`` folder filled by the repository's preprocessing notebooks)::

    ROOT/
      Images/<id>.png            1024x1024, e.g. JPCLN001.png, CHNCXR_0001_0.png, MCUCXR_0001_0.png
      landmarks/RL/<id>.npy      right lung: 44 (x, y) points, image pixels
      landmarks/LL/<id>.npy      left lung:  50 (x, y) points
      landmarks/H/<id>.npy       heart: 26 (x, y) points; only for JSRT and PadChest images

The points are in the pixels of the 1024 x 1024 images the notebooks write (the record's frame;
resized copies get their landmarks scaled).

"Right" and "left" are the patient's: the right lung lies on the image's left in a PA view. The
rules below use which side the other lung lies on, not a fixed image direction, so they hold
either way round.

Named landmarks derived from the contours (what the anatomy evaluation cuts patches around):

==============================  ====================================================================
name                            rule
==============================  ====================================================================
right/left_lung_apex            the lung contour's highest point (smallest y)
right/left_costophrenic_angle   the lowest-outer corner: the point maximising y + lateral offset,
                                lateral = away from the other lung
right/left_hilum                the most medial point within the middle 30% of the lung's height
cardiac_apex                    the heart's lowest point towards the left lung (max y + offset to LL)
right_cardiophrenic_angle       the heart's lowest point towards the right lung
heart_top                       the heart contour's highest point
==============================  ====================================================================

Images without heart points get the six lung landmarks only. There are no finding labels
(``label_names`` is empty) and no boxes.

Masks: the contours are closed polygons, rasterised into the masks ``right_lung``, ``left_lung``
and ``heart`` (pixel centres inside). An image without heart points has no heart mask: its heart
is unknown, not absent, and the sample's ``mask.classes`` lists only the lungs.

Splits: no official split; patient-wise (70/15/15) with the image id as the patient (the source
sets have one image per patient). Provenance from the file name: ``JPC*`` images are JSRT,
``CHNCXR_*`` Shenzhen, ``MCUCXR_*`` Montgomery, anything else PadChest; records carry it in
``extra["also_in"]`` so that anatomy results can be read against pretraining on those sets.

Rejected: an image without RL or LL points, and a point file that is not an (n, 2) array of the
expected size with finite values.
"""
from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Iterator

import numpy as np

from leader.errors import LeaderError
from leader.shards.datasets import register_dataset
from leader.shards.datasets._checks import require_root
from leader.shards.imageio import read_image
from leader.shards.masks import polygon_masks
from leader.shards.records import RejectLog, SourceRecord
from leader.shards.vocabulary import patient_split

POINTS = {"RL": 44, "LL": 50, "H": 26}
FRAME = (1024, 1024)
HILUM_BAND = (0.35, 0.65)   # fraction of the lung's height, from its top
LANDMARK_NAMES = (
    "right_lung_apex", "left_lung_apex",
    "right_costophrenic_angle", "left_costophrenic_angle",
    "right_hilum", "left_hilum",
    "cardiac_apex", "right_cardiophrenic_angle", "heart_top",
)


MASK_CLASSES = ("right_lung", "left_lung", "heart")


class _PointsError(ValueError):
    pass


@register_dataset("cxr-landmarks")
class CxrLandmarks:
    """Chest-xray-landmark-dataset: 911 CXRs with lung/heart contours -> named anatomical landmarks."""

    name = "cxr-landmarks"
    label_names: list[str] = []
    mask_classes = list(MASK_CLASSES)
    has_boxes = False
    has_landmarks = True
    overlap_note = "Its images come from JSRT, Shenzhen, Montgomery and PadChest (flagged per image in extra.also_in)"

    def records(self, root: Path | None, rejects: RejectLog, *, seed: int, n: int | None) -> Iterator[SourceRecord]:
        root = require_root(root, f"cxr-landmarks: --root must be the dataset folder that holds Images/ and landmarks/; got {root}")
        for needed in ("Images", "landmarks/RL", "landmarks/LL"):
            if not (root / needed).is_dir():
                raise LeaderError(
                    f"cxr-landmarks: expected {needed}/ under {root}; is --root the Chest-xray-landmark-dataset "
                    "folder, with Images/ filled by its preprocessing notebooks?"
                )
        return itertools.islice(self._emit(root, rejects, seed), n)

    def _emit(self, root: Path, rejects: RejectLog, seed: int) -> Iterator[SourceRecord]:
        for image in sorted((root / "Images").iterdir()):
            relative = image.relative_to(root).as_posix()
            if image.suffix.lower() != ".png" or not image.is_file():
                rejects.add(relative, "not a .png image")
                continue
            image_id = image.stem
            try:
                right = load_points(root / "landmarks" / "RL" / f"{image_id}.npy", POINTS["RL"], required=True)
                left = load_points(root / "landmarks" / "LL" / f"{image_id}.npy", POINTS["LL"], required=True)
                heart = load_points(root / "landmarks" / "H" / f"{image_id}.npy", POINTS["H"], required=False)
            except _PointsError as e:
                rejects.add(relative, str(e))
                continue
            yield SourceRecord(
                dataset=self.name,
                image_id=image_id,
                path=relative,
                load=functools.partial(read_image, str(image)),
                patient_id=image_id,
                split=patient_split(self.name, image_id, seed),
                labels={},
                source_labels={},
                boxes=[],
                landmarks=named_landmarks(right, left, heart),
                extra={"also_in": [source_dataset(image_id)], "has_heart": heart is not None},
                frame=FRAME,
                masks=functools.partial(polygon_masks, MASK_CLASSES, *contour_polygons(right, left, heart)),
            )


def contour_polygons(right: np.ndarray, left: np.ndarray, heart: np.ndarray | None) -> tuple[list, tuple]:
    """(polygons, annotated classes) of one image's contours."""
    polygons = [("right_lung", right.tolist()), ("left_lung", left.tolist())]
    if heart is not None:
        polygons.append(("heart", heart.tolist()))
    return polygons, tuple(name for name, _ in polygons)


def source_dataset(image_id: str) -> str:
    upper = image_id.upper()
    if upper.startswith("JPC"):
        return "jsrt"
    if upper.startswith("CHNCXR"):
        return "shenzhen"
    if upper.startswith("MCUCXR"):
        return "montgomery"
    return "padchest"


def load_points(path: Path, expected: int, *, required: bool) -> np.ndarray | None:
    """An (expected, 2) float array of (x, y) points, None when optional and absent, else `_PointsError`."""
    organ = path.parent.name
    if not path.is_file():
        if required:
            raise _PointsError(f"no {organ} landmarks (expected landmarks/{organ}/{path.name})")
        return None
    try:
        points = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise _PointsError(f"landmarks/{organ}/{path.name} is not a readable .npy ({e})") from None
    if points.size != 2 * expected or not np.issubdtype(points.dtype, np.number):
        raise _PointsError(f"landmarks/{organ}/{path.name} has shape {points.shape}; expected ({expected}, 2)")
    points = points.reshape(expected, 2).astype(np.float64)
    if not np.isfinite(points).all():
        raise _PointsError(f"landmarks/{organ}/{path.name} holds non-finite values")
    return points


def named_landmarks(right: np.ndarray, left: np.ndarray, heart: np.ndarray | None) -> dict[str, tuple[float, float]]:
    """The named landmarks of one image from its right-lung, left-lung and (optional) heart points."""
    # +1 when a lung's outer side is towards larger x: away from the other lung.
    right_out = np.sign(right[:, 0].mean() - left[:, 0].mean()) or -1.0
    left_out = -right_out
    out = {}
    for side, lung, outward in (("right", right, right_out), ("left", left, left_out)):
        out[f"{side}_lung_apex"] = _point(lung, np.argmin(lung[:, 1]))
        out[f"{side}_costophrenic_angle"] = _point(lung, np.argmax(lung[:, 1] + outward * lung[:, 0]))
        top, bottom = lung[:, 1].min(), lung[:, 1].max()
        low, high = (top + f * (bottom - top) for f in HILUM_BAND)
        band = np.flatnonzero((lung[:, 1] >= low) & (lung[:, 1] <= high))
        if band.size == 0:  # a degenerate contour: fall back to the points nearest mid height
            band = np.argsort(np.abs(lung[:, 1] - (top + bottom) / 2))[:3]
        out[f"{side}_hilum"] = _point(lung, band[np.argmin(outward * lung[band, 0])])
    if heart is not None:
        # The cardiac apex points to the patient's left: the left lung's outward direction.
        out["cardiac_apex"] = _point(heart, np.argmax(heart[:, 1] + left_out * heart[:, 0]))
        out["right_cardiophrenic_angle"] = _point(heart, np.argmax(heart[:, 1] + right_out * heart[:, 0]))
        out["heart_top"] = _point(heart, np.argmin(heart[:, 1]))
    return {name: out[name] for name in LANDMARK_NAMES if name in out}  # one stable order


def _point(points: np.ndarray, i) -> tuple[float, float]:
    return (round(float(points[i, 0]), 3), round(float(points[i, 1]), 3))
