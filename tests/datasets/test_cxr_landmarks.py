"""cxr-landmarks: lung/heart point sets (.npy) turned into named anatomical landmarks."""
from __future__ import annotations

import numpy as np
import pytest

from leader.errors import LeaderError
from leader.shards.datasets import create_dataset
from leader.shards.datasets.cxr_landmarks import LANDMARK_NAMES, named_landmarks
from leader.shards.vocabulary import patient_split

from .fixtures_files import build_with_cli, check_record, collect, radiograph, reject_reasons, write_png

SIDE = 96
# Contour corners in a 96-px PA image: the patient's right lung lies on the image's left.
RIGHT_LUNG = [(25, 10), (12, 45), (10, 80), (40, 75), (42, 45)]   # apex, lateral, CP angle, base, hilum
LEFT_LUNG = [(SIDE - x, y) for x, y in RIGHT_LUNG]
HEART = [(48, 48), (66, 78), (36, 74), (38, 55)]                    # top, apex, cardiophrenic, border


def contour(corners, n):
    """n points around a closed polygon, every corner among them, the rest spread along the edges."""
    edges = len(corners)
    per_edge = [n // edges + (i < n % edges) for i in range(edges)]
    points = []
    for i, k in enumerate(per_edge):
        a, b = np.array(corners[i], float), np.array(corners[(i + 1) % edges], float)
        points += [a + (b - a) * t for t in np.arange(k) / k]
    return np.array(points)


def write_case(root, image_id, *, heart=True, right=44, left=50):
    """A 96 px copy of an image whose points, like the dataset's, are on the 1024 px frame."""
    write_png(root / "Images" / f"{image_id}.png", radiograph(SIDE, seed=len(image_id)))
    for organ, corners, n in (("RL", RIGHT_LUNG, right), ("LL", LEFT_LUNG, left), ("H", HEART, 26)):
        if organ == "H" and not heart or n is None:
            continue
        (root / "landmarks" / organ).mkdir(parents=True, exist_ok=True)
        np.save(root / "landmarks" / organ / f"{image_id}.npy", contour(corners, n) * (1024 / SIDE))


def held_out_id(prefix: str) -> str:
    """A PadChest-style id that the patient-wise split (seed 0) puts in val or test."""
    return next(f"{prefix}{i}" for i in range(100) if patient_split("cxr-landmarks", f"{prefix}{i}", 0) != "train")


@pytest.fixture()
def landmarks_root(tmp_path):
    root = tmp_path / "Chest-xray-landmark-dataset"
    write_case(root, "JPCLN001")
    write_case(root, "CHNCXR_0001_0", heart=False)  # Shenzhen: lungs only
    write_case(root, held_out_id("2161827191296"))
    write_case(root, "JPCNN002", left=None)         # no left-lung file
    write_case(root, "MCUCXR_0001_0", right=43)     # wrong number of points
    (root / "Images" / "notes.txt").write_text("a stray file")
    return root


def test_named_landmarks_follow_the_documented_rules():
    marks = named_landmarks(contour(RIGHT_LUNG, 44), contour(LEFT_LUNG, 50), contour(HEART, 26))
    assert marks == {
        "right_lung_apex": (25, 10), "left_lung_apex": (71, 10),
        "right_costophrenic_angle": (10, 80), "left_costophrenic_angle": (86, 80),
        "right_hilum": (42, 45), "left_hilum": (54, 45),
        "cardiac_apex": (66, 78), "right_cardiophrenic_angle": (36, 74), "heart_top": (48, 48),
    }
    assert tuple(marks) == LANDMARK_NAMES
    # Mirror the image (e.g. an AP view stored flipped): the patient's sides still come out right.
    flip = lambda p: np.column_stack([SIDE - p[:, 0], p[:, 1]])
    mirrored = named_landmarks(flip(contour(RIGHT_LUNG, 44)), flip(contour(LEFT_LUNG, 50)), flip(contour(HEART, 26)))
    assert mirrored["right_costophrenic_angle"] == (SIDE - 10, 80) and mirrored["cardiac_apex"] == (SIDE - 66, 78)


def test_records_carry_landmarks_and_provenance(landmarks_root):
    adapter = create_dataset("cxr-landmarks")
    records, rejects = collect("cxr-landmarks", landmarks_root, adapter=adapter)
    padchest = held_out_id("2161827191296")
    assert sorted(records) == sorted(["JPCLN001", "CHNCXR_0001_0", padchest])
    for r in records.values():
        check_record(r, adapter)
        assert r.labels == {} and r.boxes == []

    jsrt = records["JPCLN001"]
    assert set(jsrt.landmarks) == set(LANDMARK_NAMES) and jsrt.extra == {"also_in": ["jsrt"], "has_heart": True}
    shenzhen = records["CHNCXR_0001_0"]
    assert len(shenzhen.landmarks) == 6 and "cardiac_apex" not in shenzhen.landmarks
    assert shenzhen.extra["also_in"] == ["shenzhen"] and records[padchest].extra["also_in"] == ["padchest"]
    assert jsrt.load().shape == (SIDE, SIDE)

    assert reject_reasons(rejects) == {
        "Images/JPCNN002.png": "no LL landmarks (expected landmarks/LL/JPCNN002.npy)",
        "Images/MCUCXR_0001_0.png": "landmarks/RL/MCUCXR_0001_0.npy has shape (43, 2); expected (44, 2)",
        "Images/notes.txt": "not a .png image",
    }


def test_wrong_root_is_one_clear_error(tmp_path):
    (tmp_path / "Images").mkdir()
    with pytest.raises(LeaderError, match="expected landmarks/RL/"):
        collect("cxr-landmarks", tmp_path)


def test_cli_build_makes_landmark_patches_for_held_out_images(landmarks_root, tmp_path):
    samples, manifest, rejects = build_with_cli("cxr-landmarks", landmarks_root, tmp_path / "out", "--max-reject-fraction", "1")
    assert manifest.has_landmarks and not manifest.has_boxes and manifest.label_names == []
    assert set(manifest.landmark_names) == set(LANDMARK_NAMES)
    held_out = samples[held_out_id("2161827191296")].meta
    assert held_out["split"] in ("val", "test")
    assert held_out["landmarks"]["right_costophrenic_angle"] == pytest.approx([10 * 64 / SIDE, 80 * 64 / SIDE], abs=1e-3)
    assert [p["label"] for p in held_out["patches"]] == list(LANDMARK_NAMES)
    assert {p["kind"] for p in held_out["patches"]} == {"landmark"}
    for s in samples.values():
        assert (s.meta["patches"] == []) == (s.meta["split"] == "train")
    assert len(rejects) == 3


def test_contours_become_lung_and_heart_masks(landmarks_root, tmp_path):
    from leader.shards.masks import decode_masks, fill_polygon, resize_nearest

    samples, manifest, _ = build_with_cli("cxr-landmarks", landmarks_root, tmp_path / "out", "--max-reject-fraction", "1",
                                          size=SIDE)
    assert manifest.mask_classes == ["right_lung", "left_lung", "heart"]
    right, left, heart = decode_masks(samples["JPCLN001"].mask_png, manifest.mask_classes)

    def stored(corners, n):      # rasterised on the 1024 px frame, then resized by nearest neighbour
        return resize_nearest(fill_polygon(contour(corners, n) * (1024 / SIDE), 1024, 1024), (SIDE, SIDE))

    assert np.array_equal(right, stored(RIGHT_LUNG, 44)) and np.array_equal(heart, stored(HEART, 26))
    assert right[:, : SIDE // 2].sum() == right.sum() and left[:, SIDE // 2:].sum() == left.sum()
    # Shenzhen images have no heart contour: their heart is unknown, not empty.
    assert samples["CHNCXR_0001_0"].meta["mask"]["classes"] == ["right_lung", "left_lung"]
    assert manifest.extra["masks"]["annotated"] == {"right_lung": 3, "left_lung": 3, "heart": 2}
