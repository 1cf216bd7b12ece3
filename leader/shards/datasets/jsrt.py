"""jsrt: the JSRT database, 247 raw 2048x2048 12-bit radiographs, 154 with one lung nodule each.

Expected ``--root`` layout (the JSRT download as distributed)::

    ROOT/
      CLNDAT_EN.txt     nodule cases   (any letter case, e.g. CNNDAT_EN.TXT)
      CNNDAT_EN.txt     non-nodule cases
      **/JPCLN001.IMG ... JPCNN093.IMG   anywhere below ROOT: flat, All247images/,
                                         Nodule154images/ + NonNodule93images/ ...

``.IMG`` files are headerless 2048x2048 big-endian 16-bit words holding 12-bit values, with
high values dark (the stored quantity is the other way round from a display). `load` reads them
with ``read_raw(..., invert=True)``: stretched from the image's own min..max to uint16 and
inverted, so lungs come out dark and bone bright, as on any other radiograph.

The two text files are tab separated, one case per line:

- CLNDAT_EN: file name, subtlety (1-5), size (mm), age, sex, x, y, malignant/benign, location,
  diagnosis. (x, y) is the nodule centre in pixels of the 2048x2048 image.
- CNNDAT_EN: file name, age, sex, "non-nodule".

Labels: ``nodule`` 1 for CLNDAT cases, 0 for CNNDAT cases. Each nodule gets a square box centred
on (x, y) with side = size_mm / 0.175 (JSRT's pixel spacing is 0.175 mm), i.e. the nodule's
diameter, on the 2048 x 2048 frame. The whole row is kept, with named fields, in ``source_labels``.
Healthy: the non-nodule (CNNDAT) cases, which JSRT lists as images without a nodule.

Splits: no official split; patient-wise (70/15/15), one image per patient, so the image id (file
name without ``.IMG``) stands in for the patient. All 247 images are also annotated in the
cxr-landmarks set (as ``JPCLN001.png`` ...), so each record carries
``extra["also_in"] = ["cxr-landmarks"]``; NODE21 also includes JSRT images (which is not published).

Masks (``--option scr_masks=DIR``): the SCR database (van Ginneken et al.), the lung fields, heart
and clavicles drawn on every JSRT image, as distributed::

    DIR/fold1/masks/{right lung,left lung,heart,right clavicle,left clavicle}/JPCLN001.gif ...
    DIR/fold2/masks/...                (any depth: DIR/scratch/fold1/masks/... is found as well)

The GIFs are 1024x1024 (half JSRT's side) with the object white; they are stored as the masks
``right_lung``, ``left_lung``, ``heart``, ``right_clavicle`` and ``left_clavicle`` (the patient's
sides, as SCR names them) at the stored image's size. An image with some of its GIFs missing is
annotated for the others only; an unreadable GIF, or one of another aspect ratio than the image,
rejects its image; two GIFs for one object of one image are an error. A relative DIR is looked up from
the working directory, then from ``--root``.

Rejected: a listed case whose .IMG cannot be found, an .IMG listed in neither file, and a
CLNDAT row whose size or coordinates cannot be parsed.
"""
from __future__ import annotations

import functools
import itertools
import math
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from leader.errors import LeaderError
from leader.shards.datasets import register_dataset
from leader.shards.datasets._checks import require_root
from leader.shards.imageio import read_raw
from leader.shards.masks import ClassMasks, MaskError
from leader.shards.records import Box, RejectLog, SourceRecord
from leader.shards.vocabulary import patient_split

SIDE = 2048
PIXEL_MM = 0.175
NODULE_FIELDS = ("file_name", "subtlety", "size_mm", "age", "sex", "x", "y", "malignancy", "location", "diagnosis")
NON_NODULE_FIELDS = ("file_name", "age", "sex", "diagnosis")
# SCR's folder names -> mask classes, in bit order.
SCR_OBJECTS = {"right lung": "right_lung", "left lung": "left_lung", "heart": "heart",
               "right clavicle": "right_clavicle", "left clavicle": "left_clavicle"}
SCR_CLASSES = tuple(SCR_OBJECTS.values())


class _RowError(ValueError):
    pass


@register_dataset("jsrt")
class JSRT:
    """JSRT: 247 raw 12-bit 2048x2048 CXRs, 154 with a lung nodule (centre + size)."""

    name = "jsrt"
    label_names = ["nodule"]
    has_boxes = True
    has_landmarks = False
    overlap_note = "All JSRT images are annotated in cxr-landmarks; NODE21 also includes JSRT images"

    def __init__(self, scr_masks: str | None = None):
        self.scr_masks = scr_masks
        self.mask_classes = list(SCR_CLASSES) if scr_masks else []

    def records(self, root: Path | None, rejects: RejectLog, *, seed: int, n: int | None) -> Iterator[SourceRecord]:
        root = require_root(
            root, f"jsrt: --root must be the folder that holds CLNDAT_EN.txt, CNNDAT_EN.txt and the .IMG files; got {root}")
        nodule_file = find_case_insensitive(root, "CLNDAT_EN.txt")
        non_nodule_file = find_case_insensitive(root, "CNNDAT_EN.txt")
        images = index_images(root, rejects)
        if not images:
            raise LeaderError(f"jsrt: found no .IMG files under {root}")
        cases = read_cases(nodule_file, NODULE_FIELDS) + read_cases(non_nodule_file, NON_NODULE_FIELDS)
        masks = index_scr_masks(find_scr_folder(self.scr_masks, root)) if self.scr_masks else {}
        return itertools.islice(self._emit(root, cases, images, masks, rejects, seed), n)

    def _emit(self, root: Path, cases, images: dict[str, Path], masks: dict[str, dict[str, str]], rejects: RejectLog,
              seed: int) -> Iterator[SourceRecord]:
        listed = set()
        for list_name, line, fields in sorted(cases, key=lambda c: c[2]["file_name"].upper()):
            key = fields["file_name"].upper()
            where = f"{list_name}:{line}"
            if key in listed:
                rejects.add(where, f"{list_name} line {line}: {fields['file_name']} is listed twice")
                continue
            listed.add(key)
            file = images.get(key)
            if file is None:
                rejects.add(where, f"{list_name} line {line}: no {fields['file_name']} found under --root")
                continue
            relative = file.relative_to(root).as_posix()
            is_nodule = "subtlety" in fields
            try:
                boxes = [nodule_box(fields)] if is_nodule else []
            except _RowError as e:
                rejects.add(relative, f"{list_name} line {line}: {e}")
                continue
            image_id = file.stem
            yield SourceRecord(
                dataset=self.name,
                image_id=image_id,
                path=relative,
                load=functools.partial(read_raw, str(file), (SIDE, SIDE), "uint16", "big", True),
                patient_id=image_id,
                split=patient_split(self.name, image_id, seed),
                labels={"nodule": int(is_nodule)},
                source_labels=fields,
                boxes=boxes,
                landmarks=None,
                extra={"also_in": ["cxr-landmarks"]},
                healthy=not is_nodule,
                frame=(SIDE, SIDE),
                masks=functools.partial(read_scr_masks, masks[image_id.upper()]) if image_id.upper() in masks else None,
            )
        for key in sorted(set(images) - listed):
            rejects.add(images[key].relative_to(root).as_posix(), "listed in neither CLNDAT_EN.txt nor CNNDAT_EN.txt")


def find_case_insensitive(root: Path, name: str) -> Path:
    for candidate in sorted(root.iterdir()):
        if candidate.name.lower() == name.lower() and candidate.is_file():
            return candidate
    raise LeaderError(
        f"jsrt: expected {name} in {root}; is --root the JSRT folder (CLNDAT_EN.txt, CNNDAT_EN.txt and the .IMG files)?"
    )


def index_images(root: Path, rejects: RejectLog) -> dict[str, Path]:
    """Upper-case file name -> path for every .IMG below root; a second copy is rejected."""
    images: dict[str, Path] = {}
    for file in sorted(p for p in root.rglob("*") if p.suffix.upper() == ".IMG" and p.is_file()):
        key = file.name.upper()
        if key in images:
            first = images[key].relative_to(root).as_posix()
            rejects.add(file.relative_to(root).as_posix(), f"a second copy of {file.name} (first: {first})")
            continue
        images[key] = file
    return images


def read_cases(path: Path, fields: tuple[str, ...]) -> list[tuple[str, int, dict]]:
    """(file name of the list, line number, named fields) for each case line."""
    cases = []
    for number, line in enumerate(path.read_text(encoding="latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        # Tab separated in the release; some copies have runs of spaces instead. The last field
        # (diagnosis) may itself contain spaces, so it takes whatever is left.
        parts = line.rstrip().split("\t") if "\t" in line else re.split(r"\s+", line.strip(), maxsplit=len(fields) - 1)
        parts = [p.strip() for p in parts]
        if not parts[0].upper().startswith("JPC"):
            continue  # a header or note line, not a case
        if not parts[0].upper().endswith(".IMG"):
            parts[0] += ".IMG"
        values = parts[: len(fields)] + [""] * (len(fields) - len(parts))
        row = dict(zip(fields, values))
        if len(parts) > len(fields):
            row[fields[-1]] = " ".join(parts[len(fields) - 1:]).strip()
        cases.append((path.name, number, row))
    return cases


def nodule_box(fields: dict) -> Box:
    """A square of the nodule's diameter around its centre, in original pixels."""
    numbers = {}
    for key in ("size_mm", "x", "y"):
        try:
            numbers[key] = float(fields[key])
        except ValueError:
            raise _RowError(f"{key} {fields[key]!r} is not a number") from None
        if not math.isfinite(numbers[key]):
            raise _RowError(f"{key} {fields[key]!r} is not finite")
    half = numbers["size_mm"] / PIXEL_MM / 2
    x, y = numbers["x"], numbers["y"]
    return Box("nodule", x - half, y - half, x + half, y + half)


def find_scr_folder(option: str, root: Path) -> Path:
    folder = Path(option).expanduser()
    if not folder.is_dir() and not folder.is_absolute() and (root / folder).is_dir():
        folder = root / folder
    if not folder.is_dir():
        raise LeaderError(f"jsrt: --option scr_masks={option} is not a folder (expected the SCR folder with fold1/masks/...)")
    return folder


def index_scr_masks(folder: Path) -> dict[str, dict[str, str]]:
    """Upper-case image id -> {mask class: GIF path} for every SCR mask below `folder`."""
    masks: dict[str, dict[str, str]] = {}
    for gif in sorted(p for p in folder.rglob("*") if p.suffix.lower() == ".gif" and p.is_file()):
        name = SCR_OBJECTS.get(gif.parent.name.lower())
        if name is None:
            continue
        per_image = masks.setdefault(gif.stem.upper(), {})
        if name in per_image:
            raise LeaderError(f"jsrt: two SCR {gif.parent.name} masks for {gif.stem}: {per_image[name]} and {gif}")
        per_image[name] = str(gif)
    if not masks:
        raise LeaderError(f"jsrt: no SCR masks under {folder} (expected fold1/masks/right lung/JPCLN001.gif, ...)")
    return masks


def read_scr_masks(files: dict[str, str], height: int, width: int) -> ClassMasks:
    """The SCR GIFs of one image as masks (white = the object)."""
    from PIL import Image

    planes = {}
    for name, file in files.items():
        try:
            with Image.open(file) as gif:
                planes[name] = np.asarray(gif.convert("L")) > 127
        except (OSError, ValueError) as e:
            raise MaskError(f"unreadable SCR mask {file}: {e}") from None
    return ClassMasks(SCR_CLASSES, planes)
