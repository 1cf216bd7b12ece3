"""Segmentation masks in shards: one bit per class, one lossless PNG per sample.

    layers = ClassMasks(("heart", "left_lung"), {"heart": plane})      # an adapter's masks, original pixels
    png, meta = store_masks(layers, image_size=(1024, 1024), stored_size=(512, 512))   # the builder
    planes = decode_masks(sample.mask_png, manifest.mask_classes)     # (C, h, w) bool, the evaluation

Layout: bit k of a pixel (value 1 << k) is class k of the manifest's `mask_classes`. Findings
overlap (an effusion under a consolidation), so a pixel may carry several bits. Up to 8 classes
fit a uint8 PNG and up to 16 a uint16 PNG; more is refused. The PNG is the stored image's size,
written by `leader.shards.png` like the image, and lives beside it as the member `<key>.mask.png`.

A sample's metadata says which classes were annotated on it (`meta["mask"]["classes"]`): a class
outside that list is unknown there, not absent (cxr-landmarks draws no heart on Shenzhen images).

Masks are resampled by nearest neighbour only: an interpolated mask would invent labels at its
edges and blend the bits of neighbouring classes into classes that are not there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from leader.errors import LeaderError
from leader.shards.png import decode_png, encode_png

MAX_CLASSES = 16
# Anatomical structures, as the adapters name them; every other mask class marks a finding. The
# default segmentation target is the union of the findings (`finding_classes`).
ANATOMY_CLASSES = ("right_lung", "left_lung", "heart", "right_clavicle", "left_clavicle")
# A mask may be drawn at another resolution than its image (the SCR masks are 1024 px for JSRT's
# 2048 px images); it must cover the same field, so its sides may differ from the image's by the
# rounding of one resampling at most.
ASPECT_TOLERANCE_PX = 1.0


class MaskError(ValueError):
    """A mask that cannot be used; the builder rejects its sample with this reason."""


@dataclass
class ClassMasks:
    """One image's masks as an adapter hands them over.

    classes: the dataset's mask classes in bit order (the same tuple for every record).
    planes: class -> 2-D bool mask, for the classes annotated on this image; all planes one size,
      the image's or another with the same aspect ratio.
    """

    classes: tuple[str, ...]
    planes: dict[str, np.ndarray]
    clipped_polygons: int = 0
    notes: dict = field(default_factory=dict)


def finding_classes(classes: Sequence[str]) -> list[str]:
    """The mask classes that mark findings (not anatomy), in bit order."""
    return [c for c in classes if c not in ANATOMY_CLASSES]


def mask_dtype(n_classes: int) -> np.dtype:
    """uint8 for up to 8 classes, uint16 for up to 16."""
    if n_classes < 1:
        raise LeaderError("a mask needs at least one class")
    if n_classes > MAX_CLASSES:
        raise LeaderError(f"{n_classes} mask classes: one bit per class fits at most {MAX_CLASSES} in a 16-bit PNG")
    return np.dtype(np.uint8 if n_classes <= 8 else np.uint16)


def pack_planes(planes: np.ndarray) -> np.ndarray:
    """(C, H, W) bool -> (H, W) uint8/uint16, bit k set where plane k is."""
    planes = np.asarray(planes, dtype=bool)
    dtype = mask_dtype(planes.shape[0])
    packed = np.zeros(planes.shape[1:], dtype=dtype)
    for k, plane in enumerate(planes):
        packed[plane] |= dtype.type(1 << k)
    return packed


def unpack_planes(packed: np.ndarray, n_classes: int, select: Sequence[int] | None = None) -> np.ndarray:
    """(H, W) packed bits -> (len(select), H, W) bool, planes in the order of `select` (default: all)."""
    select = range(n_classes) if select is None else select
    packed = np.asarray(packed).astype(np.int64, copy=False)
    return np.stack([(packed >> k) & 1 for k in select]).astype(bool) if len(select) else \
        np.zeros((0, *packed.shape), dtype=bool)


def resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D mask to (height, width), pixel centres to pixel centres."""
    height, width = size
    h, w = mask.shape
    if (h, w) == (height, width):
        return mask
    rows = np.minimum(((np.arange(height) + 0.5) * (h / height)).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * (w / width)).astype(np.int64), w - 1)
    return mask[rows[:, None], cols[None, :]]


def store_masks(layers: ClassMasks, image_size: tuple[int, int], stored_size: tuple[int, int],
                compression: int = 3) -> tuple[bytes, dict]:
    """The mask member of a sample and its metadata; `MaskError` says why a mask cannot be stored.

    image_size: the original image's (H, W); stored_size: the stored image's (h, w).
    """
    unknown = sorted(set(layers.planes) - set(layers.classes))
    if unknown:
        raise MaskError(f"mask classes {unknown} are not among the dataset's {list(layers.classes)}")
    shapes = {np.shape(p) for p in layers.planes.values()}
    if len(shapes) > 1:
        raise MaskError(f"the masks of one image differ in size: {sorted(shapes)}")
    height, width = image_size
    for name, plane in layers.planes.items():
        mh, mw = np.shape(plane) if np.ndim(plane) == 2 else (0, 0)
        # The mask must cover the image's field: its sides scaled to the image agree to a pixel.
        if not (mh and mw and abs(mh * width / mw - height) <= ASPECT_TOLERANCE_PX * max(1.0, height / mh)):
            raise MaskError(f"mask of the wrong size: the {name!r} mask is {mw}x{mh}, the image {width}x{height}")
    dtype = mask_dtype(len(layers.classes))
    packed = np.zeros(stored_size, dtype=dtype)
    pixels = {}
    for k, name in enumerate(layers.classes):
        if name not in layers.planes:
            continue
        plane = resize_nearest(np.asarray(layers.planes[name], dtype=bool), stored_size)
        packed[plane] |= dtype.type(1 << k)
        pixels[name] = int(plane.sum())
    meta = {"classes": [c for c in layers.classes if c in layers.planes], "pixels": pixels,
            "clipped_polygons": int(layers.clipped_polygons)}
    return encode_png(packed, compression), meta


def decode_masks(data: bytes, classes: Sequence[str], select: Sequence[str] | None = None) -> np.ndarray:
    """A `<key>.mask.png` -> (len(select), h, w) bool planes (default: every class, in bit order)."""
    packed = decode_png(data)
    names = list(classes)
    chosen = names if select is None else list(select)
    missing = [c for c in chosen if c not in names]
    if missing:
        raise LeaderError(f"mask classes {missing} are not in this shard set's {names}")
    return unpack_planes(packed, len(names), [names.index(c) for c in chosen])


def new_mask_counts() -> dict:
    """Empty counts of the samples with a mask, their clipped polygons, and per class the samples
    annotated for it and those where it is present (a shard's, then the manifest's)."""
    return {"samples": 0, "clipped_polygons": 0, "annotated": {}, "positive": {}}


def count_masks(counts: dict, mask_meta: dict) -> None:
    """Add one sample's mask metadata to a shard's mask counts."""
    counts["samples"] += 1
    counts["clipped_polygons"] += mask_meta["clipped_polygons"]
    for name in mask_meta["classes"]:
        counts["annotated"][name] = counts["annotated"].get(name, 0) + 1
        if mask_meta["pixels"].get(name):
            counts["positive"][name] = counts["positive"].get(name, 0) + 1


def merge_mask_counts(per_shard: list[dict | None], classes: list[str]) -> dict:
    """The manifest's mask counts from its shards' (None for a shard without), every class listed."""
    total = new_mask_counts()
    for counts in filter(None, per_shard):
        total["samples"] += counts["samples"]
        total["clipped_polygons"] += counts["clipped_polygons"]
        for field_ in ("annotated", "positive"):
            for name, n in counts[field_].items():
                total[field_][name] = total[field_].get(name, 0) + n
    for field_ in ("annotated", "positive"):
        total[field_] = {name: total[field_].get(name, 0) for name in classes}
    return total


# ---------------------------------------------------------------------------------------------
# Polygons (ChestX-Det findings, cxr-landmarks contours)


def check_polygon(points, what: str) -> np.ndarray:
    """(n, 2) float array of (x, y) for a polygon of at least 3 finite points, or `MaskError`."""
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise MaskError(f"{what} is not a list of [x, y] points") from None
    if array.ndim != 2 or array.shape[1] != 2:
        raise MaskError(f"{what} is not a list of [x, y] points (shape {array.shape})")
    if len(array) < 3:
        raise MaskError(f"{what} has {len(array)} points; a polygon needs at least 3")
    if not np.isfinite(array).all():
        raise MaskError(f"{what} has a non-finite coordinate")
    return array


def fill_polygon(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """(height, width) bool: the pixels whose centres lie inside the polygon (even-odd rule).

    Pixel (i, j) spans [j, j + 1) x [i, i + 1), as boxes do, so its centre is (j + 0.5, i + 0.5).
    Each row's edge crossings are sorted and filled pairwise; points may lie outside the image.
    """
    out = np.zeros((height, width), dtype=bool)
    x0, y0 = points[:, 0], points[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    first = max(0, math.ceil(float(y0.min()) - 0.5))
    last = min(height, math.ceil(float(y0.max()) - 0.5))
    if last <= first:
        return out
    rows = np.arange(first, last)
    centre = rows[:, None] + 0.5
    # Half-open on y, so a vertex on a row's centre is counted once.
    crosses = (y0 <= centre) != (y1 <= centre)
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = np.where(crosses, x0 + (centre - y0) * (x1 - x0) / (y1 - y0), np.inf)
    xs.sort(axis=1)
    pairs = xs.shape[1] // 2
    starts, stops = xs[:, 0:2 * pairs:2], xs[:, 1:2 * pairs:2]
    valid = np.isfinite(stops)
    r, c = np.nonzero(valid)
    begin = np.clip(np.ceil(starts[r, c] - 0.5), 0, width).astype(np.int64)
    end = np.clip(np.ceil(stops[r, c] - 0.5), 0, width).astype(np.int64)
    edges = np.zeros((len(rows), width + 1), dtype=np.int32)
    np.add.at(edges, (r, begin), 1)
    np.add.at(edges, (r, end), -1)
    out[first:last] = np.cumsum(edges[:, :width], axis=1) > 0
    return out


def polygon_masks(classes: tuple[str, ...], polygons: Sequence[tuple[str, np.ndarray]], annotated: Sequence[str],
                  height: int, width: int) -> ClassMasks:
    """Rasterise (class, points) polygons in original pixels onto a height x width image.

    `annotated` lists the classes drawn on this image (a class with no polygon is then empty). A
    polygon partly outside the image is clipped and counted; one wholly outside is a `MaskError`.
    """
    planes = {name: np.zeros((height, width), dtype=bool) for name in annotated}
    clipped = 0
    for i, (name, points) in enumerate(polygons):
        points = check_polygon(points, f"polygon {i} ({name!r})")
        (xmin, ymin), (xmax, ymax) = points.min(axis=0), points.max(axis=0)
        if xmax <= 0 or ymax <= 0 or xmin >= width or ymin >= height:
            raise MaskError(f"polygon {i} ({name!r}) lies wholly outside the {width}x{height} image "
                            f"(x {xmin:g}..{xmax:g}, y {ymin:g}..{ymax:g})")
        if xmin < 0 or ymin < 0 or xmax > width or ymax > height:
            clipped += 1
        plane = planes.setdefault(name, np.zeros((height, width), dtype=bool))
        plane |= fill_polygon(points, height, width)
    return ClassMasks(tuple(classes), planes, clipped_polygons=clipped)
