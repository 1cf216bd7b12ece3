"""TBX11K: COCO json with [x, y, w, h] boxes, labels from the image folders."""
from __future__ import annotations

import numpy as np
import pytest

from leader.errors import LeaderError
from leader.shards.datasets import create_dataset

from .fixtures_files import build_with_cli, check_record, collect, radiograph, reject_reasons, write_json, write_png

CATEGORIES = [
    {"id": 1, "name": "ActiveTuberculosis", "supercategory": "Tuberculosis"},
    {"id": 2, "name": "ObsoletePulmonaryTuberculosis", "supercategory": "Tuberculosis"},
    {"id": 3, "name": "PulmonaryTuberculosis", "supercategory": "Tuberculosis"},
]


def coco(images, annotations):
    return {
        "info": {}, "licenses": [], "categories": CATEGORIES,
        "images": [{"id": i, "file_name": f, "width": 96, "height": 96} for i, f in images],
        "annotations": [{"id": k, "image_id": i, "category_id": c, "bbox": b, "iscrowd": 0} for k, (i, c, b) in enumerate(annotations)],
    }


@pytest.fixture()
def tbx_root(tmp_path):
    root = tmp_path / "TBX11K"
    names = ["health/h0001.png", "sick/s0001.png", "tb/tb0001.png", "tb/tb0002.png", "health/h0002.png", "tb/tb0003.png", "sick/s0002.png"]
    for i, name in enumerate(names):
        write_png(root / "imgs" / name, radiograph(96, seed=i), rgb=True)  # TBX11K ships RGB PNGs
    train = coco(
        [(1, "health/h0001.png"), (2, "sick/s0001.png"), (3, "tb/tb0001.png"), (4, "health/h0002.png"), (5, "tb/tb0003.png")],
        [
            (3, 1, [10, 20, 30, 25]),
            (3, 2, [50.5, 40, 20, 20]),
            (4, 1, [5, 5, 10, 10]),          # a TB box on a healthy image
            (5, 3, [5, "wide", 10, 10]),     # unparseable bbox
            (99, 1, [5, 5, 10, 10]),         # points at no image
        ],
    )
    val = coco([(1, "tb/tb0002.png"), (2, "sick/s0002.png")], [(1, 3, [0, 0, 40, 40])])
    write_json(root / "annotations" / "json" / "TBX11K_train.json", train)
    write_json(root / "annotations" / "json" / "TBX11K_val.json", val)
    return root


def test_records_from_coco_and_folders(tbx_root):
    adapter = create_dataset("tbx11k")
    records, rejects = collect("tbx11k", tbx_root, adapter=adapter)
    assert sorted(records) == ["health/h0001", "sick/s0001", "sick/s0002", "tb/tb0001", "tb/tb0002"]
    for r in records.values():
        check_record(r, adapter)

    assert records["health/h0001"].labels == {"no_finding": 1, "tuberculosis": 0, "abnormal": 0}
    assert records["sick/s0001"].labels == {"no_finding": 0, "tuberculosis": 0, "abnormal": 1}
    tb = records["tb/tb0001"]
    assert tb.labels == {"no_finding": 0, "tuberculosis": 1, "abnormal": 1}
    assert [b.as_list() for b in tb.boxes] == [[10, 20, 40, 45], [50.5, 40, 70.5, 60]]
    assert {b.label for b in tb.boxes} == {"tuberculosis"}
    assert tb.source_labels == {"folder": "tb", "categories": ["ActiveTuberculosis", "ObsoletePulmonaryTuberculosis"]}
    assert tb.path == "imgs/tb/tb0001.png" and tb.split in ("train", "val")
    assert tb.frame == (96, 96) and [b.source_label for b in tb.boxes] == ["ActiveTuberculosis", "ObsoletePulmonaryTuberculosis"]
    # Only the health class is healthy: sick images are abnormal without TB.
    assert {i for i, r in records.items() if r.healthy} == {"health/h0001"}

    # The official val json is our test split.
    assert records["tb/tb0002"].split == "test" and records["tb/tb0002"].extra["official_split"] == "val"

    image = tb.load()
    assert image.shape == (96, 96) and image.dtype == np.uint8  # RGB read as grey

    reasons = reject_reasons(rejects)
    assert reasons["imgs/health/h0002.png"] == "TBX11K_train.json: 1 TB box(es) on an image in the health/ folder"
    assert "is not [x, y, w, h] numbers" in reasons["imgs/tb/tb0003.png"]
    assert "refers to no image" in reasons["TBX11K_train.json"]
    assert len(rejects) == 3


def test_missing_json_is_one_clear_error(tbx_root):
    (tbx_root / "annotations" / "json" / "TBX11K_val.json").unlink()
    with pytest.raises(LeaderError, match="expected TBX11K_val.json"):
        collect("tbx11k", tbx_root)
    with pytest.raises(LeaderError, match="expected the image folder imgs/"):
        collect("tbx11k", tbx_root / "annotations")


def test_cli_build(tbx_root, tmp_path):
    samples, manifest, rejects = build_with_cli("tbx11k", tbx_root, tmp_path / "out", "--max-reject-fraction", "1")
    assert manifest.n_samples == 5 and manifest.splits["test"] == 2
    assert [p["kind"] for p in samples["tb/tb0001"].meta["patches"]] == ["diseased", "diseased"]
    assert {p["kind"] for p in samples["health/h0001"].meta["patches"]} <= {"healthy"}
    assert samples["sick/s0001"].meta["patches"] == []  # sick is not normal: no healthy patch
    assert samples["sick/s0002"].meta["patches"] == []  # nor where the split has no healthy image
    assert len(rejects) == 3
