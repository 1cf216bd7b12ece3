"""Segmentation masks: polygons rasterised by pixel centres, one bit per class, nearest-neighbour
resizing, and the mask member's checks."""
from __future__ import annotations

import math

import numpy as np
import pytest

from leader.errors import LeaderError
from leader.shards.masks import (
    ClassMasks,
    MaskError,
    decode_masks,
    fill_polygon,
    mask_dtype,
    pack_planes,
    polygon_masks,
    resize_nearest,
    store_masks,
    unpack_planes,
)


def shoelace(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def test_a_rectangle_on_pixel_edges_covers_exactly_its_pixels():
    plane = fill_polygon(np.array([[10, 20], [30, 20], [30, 25], [10, 25]], float), 40, 40)
    assert plane.sum() == 20 * 5
    assert plane[20:25, 10:30].all()


@pytest.mark.parametrize("shape", ["circle", "star", "triangle"])
def test_a_polygons_rasterised_area_matches_its_analytic_area(shape):
    angles = np.linspace(0, 2 * math.pi, 60, endpoint=False)
    if shape == "circle":
        points = np.stack([200 + 150 * np.cos(angles), 210 + 150 * np.sin(angles)], 1)
    elif shape == "star":                          # concave: every other point pulled in
        radius = np.where(np.arange(60) % 2, 60.0, 170.0)
        points = np.stack([256 + radius * np.cos(angles), 256 + radius * np.sin(angles)], 1)
    else:
        points = np.array([[13.3, 40.7], [480.2, 91.9], [211.6, 455.1]])
    plane = fill_polygon(points, 512, 512)
    area = shoelace(points)
    # Sampling pixel centres errs only along the outline: well under a pixel per unit of length.
    perimeter = float(np.linalg.norm(points - np.roll(points, -1, 0), axis=1).sum())
    assert abs(plane.sum() - area) < 0.05 * perimeter
    assert abs(plane.sum() - area) / area < 0.005


def test_polygons_are_clipped_and_counted_or_rejected_when_wholly_outside():
    classes = ("mass", "nodule")
    inside = [[2, 2], [8, 2], [8, 8], [2, 8]]
    overhanging = [[6, 6], [14, 6], [14, 14], [6, 14]]          # the image is 10 px
    layers = polygon_masks(classes, [("mass", inside), ("nodule", overhanging)], classes, 10, 10)
    assert layers.clipped_polygons == 1
    assert layers.planes["mass"].sum() == 36 and layers.planes["nodule"].sum() == 16
    with pytest.raises(MaskError, match=r"polygon 0 \('mass'\) lies wholly outside the 10x10 image"):
        polygon_masks(classes, [("mass", [[11, 0], [20, 0], [15, 5]])], classes, 10, 10)
    with pytest.raises(MaskError, match="needs at least 3"):
        polygon_masks(classes, [("mass", [[1, 1], [5, 5]])], classes, 10, 10)


def test_one_bit_per_class_round_trips_and_16_classes_is_the_limit():
    rng = np.random.default_rng(0)
    for n in (1, 8, 9, 16):
        planes = rng.random((n, 12, 7)) < 0.4
        packed = pack_planes(planes)
        assert packed.dtype == (np.uint8 if n <= 8 else np.uint16)
        assert np.array_equal(unpack_planes(packed, n), planes)
        assert np.array_equal(unpack_planes(packed, n, [n - 1, 0]), planes[[n - 1, 0]])
    with pytest.raises(LeaderError, match="17 mask classes: one bit per class fits at most 16"):
        mask_dtype(17)


def test_nearest_resizing_keeps_labels_and_never_blends_them():
    mask = np.array([[1, 2], [4, 8]], np.uint16)
    assert np.array_equal(resize_nearest(mask, (4, 4)), np.kron(mask, np.ones((2, 2), np.uint16)))
    big = np.kron(mask, np.ones((3, 3), np.uint16))
    assert np.array_equal(resize_nearest(big, (2, 2)), mask)
    assert set(np.unique(resize_nearest(big, (5, 5)))) <= {1, 2, 4, 8}


def test_store_masks_resizes_checks_and_describes():
    classes = ("right_lung", "heart", "left_lung")
    lung = np.zeros((100, 100), bool)
    lung[10:60, 10:40] = True
    png, meta = store_masks(ClassMasks(classes, {"right_lung": lung, "heart": np.zeros((100, 100), bool)}),
                            image_size=(200, 200), stored_size=(50, 50))   # drawn at half the image's side
    assert meta == {"classes": ["right_lung", "heart"], "pixels": {"right_lung": 25 * 15, "heart": 0},
                    "clipped_polygons": 0}
    right, heart, left = decode_masks(png, classes)
    assert np.array_equal(right, lung[1::2, 1::2]) and not heart.any() and not left.any()
    with pytest.raises(MaskError, match="mask of the wrong size: the 'heart' mask is 90x100, the image 200x200"):
        store_masks(ClassMasks(classes, {"heart": np.zeros((100, 90), bool)}), (200, 200), (50, 50))
    with pytest.raises(MaskError, match=r"mask classes \['liver'\] are not among"):
        store_masks(ClassMasks(classes, {"liver": lung}), (100, 100), (50, 50))
    with pytest.raises(LeaderError, match=r"mask classes \['liver'\] are not in this shard set's"):
        decode_masks(png, classes, ["liver"])
