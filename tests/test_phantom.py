"""The procedural chest X-ray phantom: determinism, patients and splits, annotations, diseases."""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import pickle

import numpy as np
import pytest

from leader.errors import LeaderError
from leader.shards.datasets import create_dataset
from leader.shards.phantom import (
    DEFAULT_PREVALENCE,
    DISEASES,
    LANDMARKS,
    MASK_CLASSES,
    PhantomConfig,
    describe_case,
    generate_case,
    phantom_index,
    render_masks,
    render_sample_grid,
)
from leader.shards.records import RejectLog

SMALL = PhantomConfig(size=128)
ONLY = {d: 0.0 for d in DISEASES}  # a prevalence override with every disease switched off


def image_ids(n: int, seed: int = 0, config: PhantomConfig = SMALL) -> list[str]:
    return [image_id for image_id, _, _ in phantom_index(n, seed, config)]


def test_a_case_is_the_same_bytes_for_the_same_seed_and_differs_for_another():
    first = generate_case("P000003-s1", seed=0, config=SMALL)
    again = generate_case("P000003-s1", seed=0, config=SMALL)
    other = generate_case("P000003-s1", seed=1, config=SMALL)
    assert first.image.dtype == np.uint8 and first.image.shape == (128, 128)
    assert first.image.tobytes() == again.image.tobytes()
    assert (first.labels, first.boxes, first.landmarks, first.anatomy) == (again.labels, again.boxes, again.landmarks, again.anatomy)
    assert first.image.tobytes() != other.image.tobytes()
    assert first.landmarks != other.landmarks


def test_a_case_does_not_depend_on_dataset_size_order_or_process():
    assert phantom_index(7, 0, SMALL) == phantom_index(20, 0, SMALL)[:7]
    ids = image_ids(4)
    forward = [generate_case(i, 0, SMALL).image for i in ids]
    backward = [generate_case(i, 0, SMALL).image for i in reversed(ids)][::-1]
    assert all(np.array_equal(a, b) for a, b in zip(forward, backward))
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        elsewhere = pool.submit(generate_case, ids[2], 0, SMALL).result()
    assert np.array_equal(elsewhere.image, forward[2])


def test_patients_have_several_studies_and_never_cross_splits():
    index = phantom_index(300, 0, SMALL)
    splits: dict[str, set[str]] = {}
    studies: dict[str, int] = {}
    for image_id, patient_id, study in index:
        case = describe_case(image_id, 0, SMALL)
        assert (case.patient_id, case.study, case.view) == (patient_id, study, "PA")
        splits.setdefault(patient_id, set()).add(case.split)
        studies[patient_id] = studies.get(patient_id, 0) + 1
    assert all(len(s) == 1 for s in splits.values())
    per_split = [sum(s == {name} for s in splits.values()) / len(splits) for name in ("train", "val", "test")]
    assert per_split[0] == pytest.approx(0.7, abs=0.15) and min(per_split) > 0.05
    assert max(studies.values()) == 3 and min(studies.values()) == 1
    assert len({image_id for image_id, _, _ in index}) == 300


def test_landmarks_lie_inside_the_image_and_move_with_the_patient():
    cases = [describe_case(i, 0, SMALL) for i in image_ids(40)]
    for case in cases:
        assert list(case.landmarks) == list(LANDMARKS)
        for x, y in case.landmarks.values():
            assert 0 < x < 128 and 0 < y < 128
    positions = np.array([[case.landmarks[name] for name in LANDMARKS] for case in cases])  # (cases, marks, 2)
    spread = positions.std(axis=0)
    assert (spread > 1.8).all() and spread.mean() > 2.5, f"landmarks barely move across patients: {spread.round(1)}"
    right, left = positions[:, LANDMARKS.index("right_lung_apex")], positions[:, LANDMARKS.index("left_lung_apex")]
    assert (right[:, 0] < left[:, 0]).all()  # PA view: the patient's right is on the image's left


def test_every_finding_has_a_box_inside_the_image_and_normal_cases_have_none():
    normal = 0
    for image_id in image_ids(200):
        case = describe_case(image_id, 0, SMALL)
        positive = {d for d, v in case.labels.items() if v}
        assert set(case.labels) == set(DISEASES)
        assert {box.label for box in case.boxes} == positive
        for box in case.boxes:
            assert 0 <= box.x0 < box.x1 <= 128 and 0 <= box.y0 < box.y1 <= 128
        normal += not positive
    assert 0.35 < normal / 200 < 0.6  # the default rates leave about 46% of studies normal


def test_lesion_boxes_frame_visible_opacities():
    config = PhantomConfig(size=256, prevalence={**ONLY, "mass": 1.0})
    for image_id in image_ids(6, config=config):
        plain = generate_case(image_id, 0, PhantomConfig(size=256, prevalence=ONLY)).image.astype(float)
        case = generate_case(image_id, 0, config)
        (box,) = case.boxes
        x0, y0, x1, y1 = (int(round(v)) for v in box.as_list())
        added = case.image.astype(float) - plain
        inside = added[y0:y1, x0:x1].mean()
        outside = np.delete(added, np.s_[max(y0 - 4, 0):y1 + 4], axis=0).mean()
        assert inside > 8 and abs(outside) < 1.0


def test_masks_come_from_the_shapes_that_paint_the_findings():
    for image_id in image_ids(60):
        case = generate_case(image_id, 0, SMALL)
        masks = render_masks(image_id, 0, SMALL)
        assert set(masks) == set(MASK_CLASSES) and all(m.shape == (128, 128) for m in masks.values())
        for label in DISEASES:
            boxes = [b for b in case.boxes if b.label == label]
            assert masks[label].any() == bool(boxes)
            if not boxes:
                continue
            # Its box (both boxes, for a bilateral effusion) frames the mask, both measured on the
            # finding's extent; the box is padded by up to a pixel. A plate thinner than the soft
            # edge is measured at half its own peak, on two different grids: its ends may differ
            # by a few pixels.
            rows, cols = np.nonzero(masks[label])
            mask_box = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
            box = np.array([min(b.x0 for b in boxes), min(b.y0 for b in boxes),
                            max(b.x1 for b in boxes), max(b.y1 for b in boxes)])
            np.testing.assert_allclose(mask_box, box, atol=5.0 if label == "atelectasis" else 2.0)
        # The painted lung fields are dark, the heart shadow between them bright.
        lungs = masks["right_lung"] | masks["left_lung"]
        assert case.image[lungs].mean() + 30 < case.image[masks["heart"]].mean()
        assert not (masks["right_lung"] & masks["left_lung"]).any() and not (lungs & masks["heart"]).any()
        # The patient's right lung lies on the image's left.
        assert np.nonzero(masks["right_lung"])[1].mean() + 20 < np.nonzero(masks["left_lung"])[1].mean()
        x, y = (int(v) for v in case.landmarks["right_costophrenic_angle"])
        assert masks["right_lung"][max(y - 4, 0):y + 4, max(x - 4, 0):x + 4].any()


def test_prevalence_is_configurable_per_disease():
    config = PhantomConfig(size=128, prevalence={**ONLY, "nodule": 0.5, "effusion": 0.15})
    labels = [describe_case(i, 0, config).labels for i in image_ids(200, config=config)]
    rate = {d: np.mean([case[d] for case in labels]) for d in DISEASES}
    assert rate["nodule"] == pytest.approx(0.5, abs=0.11)
    assert rate["effusion"] == pytest.approx(0.15, abs=0.08)
    assert all(rate[d] == 0 for d in DISEASES if d not in ("nodule", "effusion"))
    # Unlisted diseases keep their default rate.
    assert PhantomConfig(prevalence={"nodule": 0.9}).prevalence == {**DEFAULT_PREVALENCE, "nodule": 0.9}


def test_cardiomegaly_enlarges_the_heart_past_half_the_thorax():
    healthy = PhantomConfig(size=128, prevalence=ONLY)
    enlarged = PhantomConfig(size=128, prevalence={**ONLY, "cardiomegaly": 1.0})
    for image_id in image_ids(8):
        normal, big = generate_case(image_id, 0, healthy), generate_case(image_id, 0, enlarged)
        assert normal.anatomy["cardiothoracic_ratio"] < 0.5 < big.anatomy["cardiothoracic_ratio"]
        assert big.landmarks["cardiac_apex"][0] > normal.landmarks["cardiac_apex"][0]
        assert normal.landmarks["right_lung_apex"] == big.landmarks["right_lung_apex"]
        assert big.image.mean() > normal.image.mean()  # more heart shadow, less dark lung


def test_images_show_dark_lungs_against_a_bright_mediastinum():
    for image_id in image_ids(10):
        case = generate_case(image_id, 0, PhantomConfig(size=128, prevalence=ONLY))
        m = case.landmarks
        lung = np.mean([m["right_lung_apex"], m["right_costophrenic_angle"], m["right_hilum"]], axis=0)
        heart = np.mean([m["cardiac_apex"], m["right_cardiophrenic_angle"], m["carina"]], axis=0)
        lung_level = case.image[int(lung[1]) - 2:int(lung[1]) + 3, int(lung[0]) - 2:int(lung[0]) + 3].mean()
        heart_level = case.image[int(heart[1]) - 2:int(heart[1]) + 3, int(heart[0]) - 2:int(heart[0]) + 3].mean()
        assert heart_level - lung_level > 60


def test_landmarks_can_be_told_apart_from_a_patch_around_them():
    """1-nearest-neighbour on raw patches, across patients, names the landmark far above chance."""
    patches, names, patients = [], [], []
    for image_id in image_ids(60):
        case = generate_case(image_id, 0, SMALL)
        padded = np.pad(case.image.astype(np.float32), 16)
        for i, (x, y) in enumerate(case.landmarks.values()):
            patch = padded[int(y):int(y) + 32, int(x):int(x) + 32]
            patches.append((patch - patch.mean()) / (patch.std() + 1e-6))
            names.append(i)
            patients.append(case.patient_id)
    X = np.stack(patches).reshape(len(patches), -1)
    names, patients = np.array(names), np.array(patients)
    distance = (X * X).sum(1)[:, None] + (X * X).sum(1)[None, :] - 2.0 * X @ X.T
    distance[patients[:, None] == patients[None, :]] = np.inf  # never match the same patient
    accuracy = (names[distance.argmin(1)] == names).mean()
    assert accuracy > 0.6  # chance is 0.1


def test_sixteen_bit_images_store_twelve_bits_of_the_same_picture():
    eight = generate_case("P000001-s1", 0, PhantomConfig(size=128))
    twelve = generate_case("P000001-s1", 0, PhantomConfig(size=128, bits=16))
    assert twelve.image.dtype == np.uint16 and 255 < twelve.image.max() <= 4095
    assert np.abs(twelve.image / 4095.0 - eight.image / 255.0).max() <= 0.5 / 255 + 0.5 / 4095 + 1e-9
    assert twelve.landmarks == eight.landmarks and twelve.boxes == eight.boxes


def test_the_adapter_yields_records_that_render_lazily_in_any_process():
    adapter = create_dataset("phantom", size=128, prevalence={"nodule": 0.5})
    assert (adapter.name, adapter.label_names, adapter.has_boxes, adapter.has_landmarks) == (
        "phantom", list(DISEASES), True, True)
    rejects = RejectLog()
    records = list(adapter.records(None, rejects, seed=0, n=12))
    assert len(records) == 12 and len(rejects) == 0
    assert len({r.key for r in records}) == 12
    record = records[5]
    case = generate_case(record.image_id, 0, adapter.config)
    assert (record.patient_id, record.split, record.view) == (case.patient_id, case.split, "PA")
    assert record.labels == record.source_labels == case.labels
    assert (record.boxes, record.landmarks) == (case.boxes, case.landmarks)
    assert record.extra["anatomy"]["cardiothoracic_ratio"] == case.anatomy["cardiothoracic_ratio"]
    assert np.array_equal(pickle.loads(pickle.dumps(record.load))(), case.image)
    layers = pickle.loads(pickle.dumps(record.masks))(128, 128)
    assert adapter.mask_classes == list(layers.classes) == list(MASK_CLASSES)
    assert np.array_equal(layers.planes["heart"], render_masks(record.image_id, 0, adapter.config)["heart"])
    assert sum(1 for _ in create_dataset("phantom", size=64).records(None, RejectLog(), seed=0, n=None)) == 1000


def test_bad_settings_are_named_in_the_error():
    with pytest.raises(LeaderError, match="pneumonia"):
        PhantomConfig(prevalence={"pneumonia": 0.1})
    with pytest.raises(LeaderError, match="bits"):
        PhantomConfig(bits=12)
    with pytest.raises(LeaderError, match="split_fractions"):
        PhantomConfig(split_fractions={"train": 0.9, "val": 0.2, "test": 0.0})
    with pytest.raises(LeaderError, match="P12"):
        generate_case("P12", 0, SMALL)
    with pytest.raises(LeaderError, match="colour"):
        create_dataset("phantom", colour=True)


def test_sample_grid_is_a_png(tmp_path):
    out = tmp_path / "grid.png"
    render_sample_grid(out, n=2, seed=0, config=PhantomConfig(size=64))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
