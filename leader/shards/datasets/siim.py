"""SIIM-ACR Pneumothorax Segmentation (2019): 10,712 training DICOMs (1024x1024) with RLE masks.

Expected ``--root`` (the Kaggle ``siim-acr-pneumothorax-segmentation`` data, as-is)::

    ROOT/
      train-rle.csv                     stage 1: ImageId, EncodedPixels (the second column name has
                                        a leading space: " EncodedPixels")
      stage_2_train.csv                 or stage 2's file (other image ids), same columns
      dicom-images-train/<study UID>/<series UID>/<ImageId>.dcm   (JPEG baseline or uncompressed;
                                        any folder below ROOT is searched for <ImageId>.dcm)

The label file is ``train-rle.csv`` when present, else ``stage_2_train.csv``; ``--option
rle_file=NAME`` picks one. ``EncodedPixels`` is ``-1`` for an image without pneumothorax;
otherwise it is a run-length code of (start, length) pairs over the pixels in column-major order
(down the first column, then the next). An image with several pneumothorax regions has several
rows; their masks are united.

Two forms of the starts exist. Stage 1's file gives each start *relative* to the end of the
previous run; stage 2's is reported to give *absolute* 0-based starts. The form of a file is
detected, not assumed: a row whose starts do not increase can only be relative, and a row whose
relative reading runs past the image can only be absolute. A file with rows of both kinds is
refused. Where every row reads alike in both forms (single runs), the file name decides
(``stage_2_train.csv`` absolute, any other relative). The manifest records the form and the
evidence (``extra.masks.notes``).

Each sample stores its mask (class ``pneumothorax``, empty for ``-1``) as the ``mask.png``
member at the stored image's size. Label ``pneumothorax`` is 1 when any row has a mask, else 0.
Each connected region of the mask (4-connectivity) becomes a ``pneumothorax`` box.
``source_labels["n_masks"]`` counts the rows with a mask. Masks and boxes are in the DICOM's own
pixels (the RLE is decoded at its Rows x Columns).

An image with both ``-1`` and a mask, an undecodable RLE or one that runs past the image, or a
DICOM file without a label row is rejected.

Healthy: none. ``-1`` says "no pneumothorax", not "normal": SIIM's images come from NIH, many with
other findings, and SIIM labels nothing else. So SIIM gives no healthy patches, and the build's
notes report the shortfall. Ids: SIIM de-identified each image on its own, so the ImageId is the
patient id. Split: patient-wise. Overlap: the images come from NIH ChestX-ray14 (``extra.also_in``).
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
from leader.shards.masks import ClassMasks
from leader.shards.records import Box, RejectLog, SourceRecord
from leader.shards.vocabulary import patient_split

LABEL_FILES = ("train-rle.csv", "stage_2_train.csv")     # stage 1, stage 2
ABSOLUTE_BY_NAME = {"stage_2_train.csv"}
NO_MASK = "-1"
MASK_CLASSES = ("pneumothorax",)


@register_dataset("siim")
class SIIMPneumothorax:
    name = "siim"
    label_names = ["pneumothorax"]
    mask_classes = list(MASK_CLASSES)
    has_boxes = True
    has_landmarks = False
    overlap_note = "SIIM-ACR images are drawn from NIH ChestX-ray14 (also_in: nih14)"

    def __init__(self, rle_file: str | None = None):
        self.rle_file = rle_file
        self.mask_notes: dict = {}

    def records(
        self, root: Path | None, rejects: RejectLog, *, seed: int = 0, n: int | None = None
    ) -> Iterator[SourceRecord]:
        root = require_root(root, f"siim: --root {root} is not a folder; pass the folder that holds {LABEL_FILES[0]}")
        label_file = self._label_file(root)
        table = pd.read_csv(label_file, dtype=str, keep_default_na=False)
        table.columns = [c.strip() for c in table.columns]  # " EncodedPixels" -> "EncodedPixels"
        if not {"ImageId", "EncodedPixels"} <= set(table.columns):
            raise LeaderError(f"siim: {label_file.name} should have the columns ImageId, EncodedPixels")
        masks_of: dict[str, list[str]] = {}
        for image_id, rle in zip(table["ImageId"], table["EncodedPixels"]):
            masks_of.setdefault(image_id.strip(), []).append(rle.strip())
        files = {p.stem: p for p in sorted(root.rglob("*.dcm"))}
        if not files:
            raise LeaderError(f"siim: no .dcm files under {root}; expected dicom-images-train/<study>/<series>/<ImageId>.dcm")
        for stem in sorted(files.keys() - masks_of.keys()):
            rejects.add(str(files[stem].relative_to(root)), f"no label row: the image is not in {label_file.name}")
        sizes = functools.lru_cache(maxsize=None)(_image_size)
        form, evidence = detect_rle_form(label_file.name, [
            (image_id, rle, files[image_id]) for image_id, rles in masks_of.items() if image_id in files
            for rle in rles if rle != NO_MASK], sizes)
        self.mask_notes = {"rle_file": label_file.name, "rle_starts": form, "rle_evidence": evidence}
        yielded = 0
        for image_id, rles in masks_of.items():
            if n is not None and yielded >= n:
                return
            path = files.get(image_id)
            if path is None:
                rejects.add(f"{image_id}.dcm", "image file not found under --root")
                continue
            relative = str(path.relative_to(root))
            try:
                boxes, mask, n_masks = _masks(path, rles, form, sizes, label_file.name)
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
                extra={"also_in": ["nih14"]},
                masks=functools.partial(pneumothorax_masks, mask),
            )

    def _label_file(self, root: Path) -> Path:
        if self.rle_file is not None:
            if not (root / self.rle_file).is_file():
                raise LeaderError(f"siim: --option rle_file={self.rle_file} names no file in {root}")
            return root / self.rle_file
        for name in LABEL_FILES:
            if (root / name).is_file():
                return root / name
        raise LeaderError(f"siim: expected {' or '.join(LABEL_FILES)} under {root}; is --root the folder that holds "
                          f"{LABEL_FILES[0]} and dicom-images-train/?")


def pneumothorax_masks(rle: dict | None, height: int, width: int) -> ClassMasks:
    """The stored mask of one image: its united RLE rows, or an empty mask for ``-1``."""
    plane = decode_mask(rle) if rle is not None else np.zeros((height, width), dtype=bool)
    return ClassMasks(MASK_CLASSES, {"pneumothorax": plane})


def _masks(path: Path, rles: list[str], form: str, sizes, label_file: str) -> tuple[list[Box], dict | None, int]:
    drawn = [r for r in rles if r != NO_MASK]
    if not drawn:
        return [], None, 0
    if len(drawn) != len(rles):
        raise ValueError(f"both -1 and a mask: {label_file} says no pneumothorax and draws one")
    height, width = sizes(path)
    mask = np.zeros((height, width), dtype=bool)
    for rle in drawn:
        mask |= decode_siim_rle(rle, height, width, form)
    if not mask.any():
        raise ValueError(f"empty mask: the {label_file} masks have no pixels")
    return mask_boxes(mask, "pneumothorax"), encode_mask(mask), len(drawn)


def _image_size(path: Path) -> tuple[int, int]:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
        return int(ds.Rows), int(ds.Columns)
    except Exception as e:
        raise ValueError(f"unreadable DICOM header: needed for the mask size: {e}") from None


def rle_numbers(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) as written, or ValueError for text that is not (start, length) pairs."""
    try:
        numbers = np.array([int(v) for v in text.split()], dtype=np.int64)
    except ValueError:
        raise ValueError(f"invalid RLE: {text[:40]!r} holds a non-integer") from None
    if not numbers.size or numbers.size % 2:
        raise ValueError(f"invalid RLE: {numbers.size} numbers; expected (start, length) pairs")
    starts, lengths = numbers[0::2], numbers[1::2]
    if (starts < 0).any() or (lengths <= 0).any():
        raise ValueError("invalid RLE: a negative start or an empty run")
    return starts, lengths


def absolute_starts(starts: np.ndarray, lengths: np.ndarray, form: str) -> np.ndarray:
    """Absolute 0-based starts of the runs, from starts written in `form` ("relative"/"absolute")."""
    if form == "absolute":
        return starts
    ends = np.cumsum(starts + lengths)          # where each run ends, reading starts as gaps
    return ends - lengths


def fits(starts: np.ndarray, lengths: np.ndarray, form: str, n_pixels: int) -> bool:
    """Whether the runs, read in `form`, lie in order inside an image of n_pixels."""
    begin = absolute_starts(starts, lengths, form)
    end = begin + lengths
    return bool(end[-1] <= n_pixels and (begin[1:] >= end[:-1]).all())


def detect_rle_form(file_name: str, rows: list[tuple[str, str, Path]], sizes) -> tuple[str, str]:
    """("relative" | "absolute", the evidence in words) for the mask rows of one label file.

    rows: (image id, RLE text, DICOM path); sizes(path) -> (height, width). A row read both ways
    either fits in one form only (evidence) or in both (no evidence); undecodable rows are left to
    the decoder, which rejects them.
    """
    only = {"relative": [], "absolute": []}
    for image_id, text, path in rows:
        try:
            starts, lengths = rle_numbers(text)
            height, width = sizes(path)
        except ValueError:
            continue
        ok = {form: fits(starts, lengths, form, height * width) for form in only}
        if ok["relative"] != ok["absolute"]:
            only["relative" if ok["relative"] else "absolute"].append(image_id)
    if only["relative"] and only["absolute"]:
        raise LeaderError(
            f"siim: {file_name} mixes RLE forms: {len(only['relative'])} rows read only with relative starts "
            f"(e.g. {only['relative'][0]}), {len(only['absolute'])} only with absolute starts (e.g. {only['absolute'][0]})")
    for form, ids in only.items():
        if ids:
            return form, f"{len(ids)} mask rows read only with {form} starts (e.g. {ids[0]})"
    form = "absolute" if file_name in ABSOLUTE_BY_NAME else "relative"
    return form, f"every mask row reads alike in both forms; {form} assumed from the file name {file_name}"


def decode_siim_rle(text: str, height: int, width: int, form: str = "relative") -> np.ndarray:
    """SIIM's column-major RLE, starts in `form` -> (height, width) bool mask. ValueError if invalid."""
    starts, lengths = rle_numbers(text)
    if not fits(starts, lengths, form, height * width):
        begin = absolute_starts(starts, lengths, form)
        if begin[-1] + lengths[-1] > height * width:
            raise ValueError(f"invalid RLE: runs past the end of a {width}x{height} mask ({form} starts)")
        raise ValueError(f"invalid RLE: runs overlap or go backwards ({form} starts)")
    flat = np.zeros(height * width, dtype=bool)
    for begin, length in zip(absolute_starts(starts, lengths, form), lengths):
        flat[begin:begin + length] = True
    return flat.reshape((height, width), order="F")


def encode_mask(mask: np.ndarray) -> dict:
    """(H, W) bool mask -> {"size": [H, W], "order": "F", "counts": [start, length, ...]}: absolute
    starts, compact enough to hand a build worker instead of the decoded mask."""
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
