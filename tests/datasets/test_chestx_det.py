"""ChestX-Det: two JSON annotation lists, official train/test, 13 classes with boxes and polygons."""
from __future__ import annotations

import numpy as np
import pytest

from leader.errors import LeaderError
from leader.shards.class_sets import HARMONISED, SOURCE, ClassSelection, select_classes
from leader.shards.datasets import create_dataset
from leader.shards.masks import decode_masks, fill_polygon

from .fixtures_files import build_with_cli, check_record, collect, radiograph, reject_reasons, write_json, write_png


def diamond(box):
    """The outline a reader might draw inside a box: its four edge midpoints."""
    x0, y0, x1, y1 = box
    return [[(x0 + x1) / 2, y0], [x1, (y0 + y1) / 2], [(x0 + x1) / 2, y1], [x0, (y0 + y1) / 2]]


def entry(name, syms=(), boxes=(), polygons=None):
    polygons = [[[1, 1], [9, 1], [5, 9]]] * len(syms) if polygons is None else polygons
    return {"file_name": name, "syms": list(syms), "boxes": [list(b) for b in boxes], "polygons": polygons}


@pytest.fixture()
def chestx_det_root(tmp_path):
    root = tmp_path / "ChestX-Det"
    # Boxes on the released 1024 px images; the fixture's files are 64 px copies.
    train = [
        entry("100.png", ["Nodule", "Effusion"], [[160, 192, 480, 448], [640, 800, 960, 960]]),
        entry("101.png"),
        entry("102.png", ["Diffuse Nodule"], [[80, 80, 960, 960]]),
        entry("103.png", ["Mass", "Mass"], [[16, 16, 144, 144]]),       # syms and boxes disagree
        entry("104.png", ["Lung Worm"], [[16, 16, 144, 144]]),          # unknown class
        entry("105.png", ["Mass"], [["a", 16, 144, 144]]),              # unparseable number
        entry("100.png"),                                               # repeated file name
    ]
    test = [entry("200.png", ["Mass", "Cardiomegaly"], [[320, 320, 800, 800], [480, 640, 960, 960]]), entry("201.png")]
    write_json(root / "ChestX_Det_train.json", train)
    write_json(root / "ChestX_Det_test.json", test)
    # The train zip unpacked into a nested folder, the test zip flat: both layouts are accepted.
    for i, name in enumerate(["100", "101", "102", "103", "104", "105"]):
        write_png(root / "train_data" / "train" / f"{name}.png", radiograph(64, seed=i))
    for i, name in enumerate(["200", "201"]):
        write_png(root / "test" / f"{name}.png", radiograph(64, seed=10 + i))
    return root


def test_records_labels_boxes_and_official_split(chestx_det_root):
    adapter = create_dataset("chestx-det")
    records, rejects = collect("chestx-det", chestx_det_root, adapter=adapter)
    assert sorted(records) == ["100", "101", "102", "200", "201"]
    for r in records.values():
        check_record(r, adapter)
        assert r.extra["also_in"] == ["nih14"]
        assert r.patient_id == r.image_id

    first = records["100"]
    assert first.path == "train_data/train/100.png"
    assert first.labels["nodule"] == 1 and first.labels["effusion"] == 1
    assert first.labels["mass"] == 0 and first.labels["no_finding"] == 0
    assert [(b.label, b.source_label, b.as_list()) for b in first.boxes] == [
        ("nodule", "Nodule", [160, 192, 480, 448]), ("effusion", "Effusion", [640, 800, 960, 960])]
    assert first.frame == (1024, 1024)
    assert first.split in ("train", "val")
    assert first.load().shape == (64, 64)

    assert records["101"].labels["no_finding"] == 1 and sum(records["101"].labels.values()) == 1
    assert records["102"].labels["nodule"] == 1 and records["102"].source_labels == {"syms": ["Diffuse Nodule"]}
    # The vocabulary merges the two nodule classes; the dataset's own names keep them apart.
    assert records["102"].source_classes["Diffuse Nodule"] == 1 and records["102"].source_classes["Nodule"] == 0
    assert first.source_classes["Nodule"] == 1 and len(first.source_classes) == 13
    # An entry listing no finding at all is ChestX-Det's normal image.
    assert {i for i, r in records.items() if r.healthy} == {"101", "201"}
    assert records["200"].split == "test" and records["200"].path == "test/200.png"
    assert set(records["200"].labels) == set(adapter.label_names) and len(adapter.label_names) == 13

    reasons = reject_reasons(rejects)
    assert reasons["train_data/train/103.png"].endswith("2 syms but 1 boxes")
    assert "unknown class 'Lung Worm'" in reasons["train_data/train/104.png"]
    assert "unparseable numbers" in reasons["train_data/train/105.png"]
    assert any("duplicate entry for '100.png'" in r for r in reasons.values())
    assert len(rejects) == 4


def test_val_is_carved_from_train_by_patient(chestx_det_root, tmp_path):
    names = [f"{i}.png" for i in range(300)]
    write_json(chestx_det_root / "ChestX_Det_train.json", [entry(n) for n in names])
    records, _ = collect("chestx-det", chestx_det_root)
    splits = [r.split for r in records.values() if r.extra["official_split"] == "train"]
    assert set(splits) == {"train", "val"}
    assert 0.08 < splits.count("val") / len(splits) < 0.22

    # --option val_fraction=0.5 carves more; a fraction outside (0, 1) is refused up front.
    records, _ = collect("chestx-det", chestx_det_root, adapter=create_dataset("chestx-det", val_fraction=0.5))
    halves = [r.split for r in records.values() if r.extra["official_split"] == "train"]
    assert 0.4 < halves.count("val") / len(halves) < 0.6
    with pytest.raises(LeaderError, match="val_fraction must be between 0 and 1"):
        create_dataset("chestx-det", val_fraction=1.5)


def test_missing_annotation_or_image_folder_is_one_clear_error(chestx_det_root):
    (chestx_det_root / "ChestX_Det_test.json").unlink()
    with pytest.raises(LeaderError, match="expected ChestX_Det_test.json"):
        collect("chestx-det", chestx_det_root)
    write_json(chestx_det_root / "ChestX_Det_test.json", [])
    for p in (chestx_det_root / "test").iterdir():
        p.unlink()
    (chestx_det_root / "test").rmdir()
    with pytest.raises(LeaderError, match="test images in one of test_data/test/, test/, test_data/"):
        collect("chestx-det", chestx_det_root)


def test_cli_build(chestx_det_root, tmp_path):
    samples, manifest, rejects = build_with_cli("chestx-det", chestx_det_root, tmp_path / "out", "--max-reject-fraction", "1")
    assert manifest.n_samples == 5 and manifest.has_boxes
    assert manifest.overlap_note.startswith("ChestX-Det images are a subset of NIH")
    stored = samples["200"].meta
    assert stored["split"] == "test"
    assert stored["boxes"][0] == {"label": "mass", "x0": 20.0, "y0": 20.0, "x1": 50.0, "y1": 50.0, "source_label": "Mass"}
    assert [p["kind"] for p in stored["patches"]] == ["diseased", "diseased"]
    # Test has 2 boxes and one normal image: it gives both healthy patches (up to 4 per image).
    assert [p["kind"] for p in samples["201"].meta["patches"]] == ["healthy", "healthy"]
    assert manifest.class_sets["paper"] == {"names": manifest.source_class_names, "labels": "source",
                                            "about": "ChestX-Det's 13 classes"}
    assert len(rejects) == 4


def test_class_selection_reads_chestx_dets_own_13_classes(chestx_det_root, tmp_path):
    samples, manifest, _ = build_with_cli("chestx-det", chestx_det_root, tmp_path / "out", "--max-reject-fraction", "1")
    # The paper's 13 classes are ChestX-Det's own: the vocabulary has 12 (both nodule classes are `nodule`).
    paper = select_classes(manifest, "paper")
    assert (paper.labels, len(paper.names), paper.preset) == (SOURCE, 13, "paper")
    assert len(manifest.label_names) == 13 and "no_finding" in manifest.label_names
    # An evaluation reads them from source_classes (images) and source_label (lesion patches).
    stored = samples["102"].meta
    assert stored["source_classes"]["Diffuse Nodule"] == 1 and stored["labels"]["nodule"] == 1
    assert [p.get("source_label") for p in stored["patches"] if p["kind"] == "diseased"] == ["Diffuse Nodule"]
    # Explicit lists are of one kind, harmonised or the dataset's own.
    assert select_classes(manifest, "Nodule,Diffuse Nodule") == ClassSelection(["Nodule", "Diffuse Nodule"], SOURCE)
    assert select_classes(manifest, ["nodule", "mass"]) == ClassSelection(["nodule", "mass"], HARMONISED)
    assert select_classes(manifest, "all").names == manifest.label_names
    with pytest.raises(LeaderError, match="mixes harmonised and the dataset's own class names"):
        select_classes(manifest, "nodule,Mass")
    with pytest.raises(LeaderError, match=r"unknown class\(es\) \['Hernia'\]"):
        select_classes(manifest, ["Nodule", "Hernia"])
    with pytest.raises(LeaderError, match="no class set or class 'chexpert5'; class sets: all, paper"):
        select_classes(manifest, "chexpert5")


def test_polygons_become_one_bit_per_class_and_bad_ones_are_rejected(tmp_path):
    from leader.shards.masks import resize_nearest

    # Polygons are in the 1024 px frame of the released images; these files are 96 px copies.
    root = tmp_path / "ChestX-Det"
    overlapping = [[100, 100], [600, 100], [600, 600], [100, 600]]
    past_the_edge = [[700, 700], [1200, 700], [1200, 1200], [700, 1200]]
    train = [
        entry("300.png", ["Mass", "Nodule", "Effusion"], [[100, 100, 600, 600], [300, 300, 800, 800], [700, 700, 1024, 1024]],
              [overlapping, diamond([300, 300, 800, 800]), past_the_edge]),
        entry("301.png"),                                                          # no finding: an empty mask
        entry("302.png", ["Mass"], [[10, 10, 20, 20]], [[[2000, 2000], [2100, 2000], [2050, 2100]]]),   # wholly outside
        entry("303.png", ["Mass"], [[10, 10, 20, 20]], [[[1, 1], [5, 5]]]),                            # two points
        entry("304.png", ["Mass"], [[10, 10, 20, 20]], []),                                             # count differs
    ]
    write_json(root / "ChestX_Det_train.json", train)
    write_json(root / "ChestX_Det_test.json", [])
    for i, name in enumerate(["300", "301", "302", "303", "304"]):
        write_png(root / "train" / f"{name}.png", radiograph(96, seed=i))
    (root / "test").mkdir()
    samples, manifest, rejects = build_with_cli("chestx-det", root, tmp_path / "out", "--max-reject-fraction", "1", size=96)

    def stored(points):          # rasterised in the frame, then resized by nearest neighbour
        return resize_nearest(fill_polygon(np.array(points, float), 1024, 1024), (96, 96))

    assert len(manifest.mask_classes) == 13 and {"nodule", "diffuse_nodule"} <= set(manifest.mask_classes)
    planes = dict(zip(manifest.mask_classes, decode_masks(samples["300"].mask_png, manifest.mask_classes)))
    assert np.array_equal(planes["mass"], stored(overlapping))
    assert np.array_equal(planes["nodule"], stored(diamond([300, 300, 800, 800])))
    assert (planes["mass"] & planes["nodule"]).sum() > 300          # overlapping findings keep both bits
    assert np.array_equal(planes["effusion"], stored(past_the_edge)) and planes["effusion"][-1, -1]   # clipped
    assert samples["300"].meta["mask"]["clipped_polygons"] == 1
    assert not decode_masks(samples["301"].mask_png, manifest.mask_classes).any()
    assert samples["301"].meta["mask"]["classes"] == manifest.mask_classes     # annotated, nothing found

    assert manifest.extra["masks"]["clipped_polygons"] == 1
    assert manifest.extra["masks"]["positive"]["mass"] == 1 and manifest.extra["masks"]["annotated"]["mass"] == 2
    reasons = {r["path"]: r["reason"] for r in rejects}
    assert "polygon 0 ('mass') lies wholly outside the 1024x1024 image" in reasons["train/302.png"]
    assert "has 2 points; a polygon needs at least 3" in reasons["train/303.png"]
    assert reasons["train/304.png"].endswith("1 syms but 0 polygons")
