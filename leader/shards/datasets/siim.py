"""SIIM-ACR Pneumothorax Segmentation (2019): 10,712 training DICOMs (1024x1024) with RLE masks.

Expected ``--root`` (the Kaggle ``siim-acr-pneumothorax-segmentation`` stage 1 data, as-is)::

    ROOT/
      train-rle.csv                     ImageId, EncodedPixels   (the second column name has a
                                        leading space: " EncodedPixels")
      dicom-images-train/<study UID>/<series UID>/<ImageId>.dcm   (JPEG baseline or uncompressed)

Masks: ``EncodedPixels`` is ``-1`` for an image without pneumothorax; otherwise it is a run-length
code in SIIM's *relative* form: pairs (offset from the end of the previous run, run length) over
the pixels in column-major order (down the first column, then the next). An image with several
pneumothorax regions has several rows; their masks are united. Label ``pneumothorax`` is 1 when any
row has a mask, else 0. Each connected region of the mask (4-connectivity) becomes a
``pneumothorax`` box in original pixels. The mask itself is kept, JSON-able, in
``extra["mask_rle"]`` = ``{"size": [H, W], "order": "F", "counts": [start, length, ...]}``: ABSOLUTE
0-based starts in column-major order, in the ORIGINAL image's coordinates (``decode_mask`` turns it
back into an array). ``source_labels["n_masks"]`` counts the rows with a mask.

An image with both ``-1`` and a mask, an undecodable RLE, or a DICOM file without a label row is
rejected. Masks and boxes are in the DICOM's own pixels (the RLE is decoded at its Rows x Columns).

Healthy: none. ``-1`` says "no pneumothorax", not "normal": SIIM's images come from NIH, many with
other findings, and SIIM labels nothing else. So SIIM gives no healthy patches, and the build's
notes report the shortfall. Ids: SIIM de-identified each image on its own, so the ImageId is the patient id. Split:
patient-wise. Overlap: the images come from NIH ChestX-ray14 (``extra.also_in``).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from leader.errors import LeaderError
from leader.shards.datasets import register_dataset
from leader.shards.datasets._checks import require_root
from leader.shards.imageio import read_image
from leader.shards.records import Box, RejectLog, SourceRecord
from leader.shards.vocabulary import patient_split

LABEL_FILE = "train-rle.csv"
IMAGE_DIR = "dicom-images-train"
NO_MASK = "-1"


@register_dataset("siim")
class SIIMPneumothorax:
    name = "siim"
    label_names = ["pneumothorax"]
    has_boxes = True
    has_landmarks = False
    overlap_note = "SIIM-ACR images are drawn from NIH ChestX-ray14 (also_in: nih14)"

    def records(
        self, root: Path | None, rejects: RejectLog, *, seed: int = 0, n: int | None = None
    ) -> Iterator[SourceRecord]:
        root = _check_root(root)
        table = pd.read_csv(root / LABEL_FILE, dtype=str, keep_default_na=False)
        table.columns = [c.strip() for c in table.columns]  # " EncodedPixels" -> "EncodedPixels"
        if not {"ImageId", "EncodedPixels"} <= set(table.columns):
            raise LeaderError(f"siim: {LABEL_FILE} should have the columns ImageId, EncodedPixels")
        masks_of: dict[str, list[str]] = {}
        for image_id, rle in zip(table["ImageId"], table["EncodedPixels"]):
            masks_of.setdefault(image_id.strip(), []).append(rle.strip())
        files = {p.stem: p for p in sorted((root / IMAGE_DIR).rglob("*.dcm"))}
        for stem in sorted(files.keys() - masks_of.keys()):
            rejects.add(str(files[stem].relative_to(root)), f"no label row: the image is not in {LABEL_FILE}")
        yielded = 0
        for image_id, rles in masks_of.items():
            if n is not None and yielded >= n:
                return
            path = files.get(image_id)
            if path is None:
                rejects.add(f"{IMAGE_DIR}/{image_id}.dcm", "image file not found under --root")
                continue
            relative = str(path.relative_to(root))
            try:
                boxes, extra, n_masks = _masks(path, rles)
            except ValueError as e:
                rejects.add(relative, str(e))
                continue
            yielded += 1
            yield SourceRecord(
                dataset=self.name,
                image_id=image_id,
                path=relative,
                load=functools.partial(read_image, path),
                patient_id=image_id,
                split=patient_split(self.name, image_id, seed),
                labels={"pneumothorax": int(n_masks > 0)},
                source_labels={"n_masks": n_masks},
                boxes=boxes,
                landmarks=None,
                view=None,
                extra={"also_in": ["nih14"], **extra},
            )


def _check_root(root: Path | None) -> Path:
    root = require_root(root, f"siim: --root {root} is not a folder; pass the folder that holds {LABEL_FILE}")
    missing = [name for name in (LABEL_FILE, IMAGE_DIR) if not (root / name).exists()]
    if missing:
        raise LeaderError(
            f"siim: expected {' and '.join(missing)} under {root}; is --root the folder that holds "
            f"{LABEL_FILE} and {IMAGE_DIR}/?"
        )
    return root


def _masks(path: Path, rles: list[str]) -> tuple[list[Box], dict, int]:
    drawn = [r for r in rles if r != NO_MASK]
    if not drawn:
        return [], {}, 0
    if len(drawn) != len(rles):
        raise ValueError(f"both -1 and a mask: {LABEL_FILE} says no pneumothorax and draws one")
    height, width = _image_size(path)
    mask = np.zeros((height, width), dtype=bool)
    for rle in drawn:
        mask |= decode_siim_rle(rle, height, width)
    if not mask.any():
        raise ValueError(f"empty mask: the {LABEL_FILE} masks have no pixels")
    return mask_boxes(mask, "pneumothorax"), {"mask_rle": encode_mask(mask)}, len(drawn)


def _image_size(path: Path) -> tuple[int, int]:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
        return int(ds.Rows), int(ds.Columns)
    except Exception as e:
        raise ValueError(f"unreadable DICOM header: needed for the mask size: {e}") from None


def decode_siim_rle(text: str, height: int, width: int) -> np.ndarray:
    """SIIM's relative column-major RLE -> (height, width) bool mask. Raises ValueError if invalid."""
    try:
        numbers = [int(v) for v in text.split()]
    except ValueError:
        raise ValueError(f"invalid RLE: {text[:40]!r} holds a non-integer") from None
    if not numbers or len(numbers) % 2:
        raise ValueError(f"invalid RLE: {len(numbers)} numbers; expected (offset, length) pairs")
    flat = np.zeros(height * width, dtype=bool)
    position = 0
    for offset, length in zip(numbers[0::2], numbers[1::2]):
        if offset < 0 or length <= 0:
            raise ValueError(f"invalid RLE: a negative offset or empty run ({offset}, {length})")
        position += offset
        if position + length > flat.size:
            raise ValueError(f"invalid RLE: runs past the end of a {width}x{height} mask")
        flat[position:position + length] = True
        position += length
    return flat.reshape((height, width), order="F")


def encode_mask(mask: np.ndarray) -> dict:
    """(H, W) bool mask -> {"size": [H, W], "order": "F", "counts": [start, length, ...]} (absolute)."""
    flat = np.concatenate([[False], mask.ravel(order="F"), [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(flat))
    starts, stops = edges[0::2], edges[1::2]
    counts = np.stack([starts, stops - starts], axis=1).ravel()
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "order": "F", "counts": counts.tolist()}


def decode_mask(rle: dict) -> np.ndarray:
    """Inverse of `encode_mask`."""
    height, width = rle["size"]
    flat = np.zeros(height * width, dtype=bool)
    counts = rle["counts"]
    for start, length in zip(counts[0::2], counts[1::2]):
        flat[start:start + length] = True
    return flat.reshape((height, width), order="F")


def mask_boxes(mask: np.ndarray, label: str) -> list[Box]:
    """One box per 4-connected region, as pixel edges: a region covering columns 3..5 gives x 3..6."""
    from scipy import ndimage

    regions, _ = ndimage.label(mask)
    return [
        Box(label, float(cols.start), float(rows.start), float(cols.stop), float(rows.stop))
        for rows, cols in ndimage.find_objects(regions)
    ]
