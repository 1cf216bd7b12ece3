"""JSRT: raw big-endian 12-bit .IMG files plus the two tab-separated case lists."""
from __future__ import annotations

import numpy as np
import pytest

from leader.errors import LeaderError
from leader.shards.datasets import create_dataset

from .fixtures_files import build_with_cli, check_record, collect, reject_reasons, write_raw, write_text

SIDE = 2048

CLNDAT = (
    "JPCLN001.IMG\t5\t15\t53\tmale\t1634\t692\tmalignant\tl.upper lobe\tlung cancer\n"
    "JPCLN002.IMG\t3\t?\t60\tfemale\t700\t900\tbenign\tr.lower lobe\tgranuloma\n"  # size unknown
)
CNNDAT = "JPCNN001.IMG\t37\tfemale\tnon-nodule\nJPCNN002.IMG\t41\tmale\tnon-nodule\nJPCNN003.IMG\t?\tmale\tnon-nodule\n"


def jsrt_raw(seed: int) -> np.ndarray:
    """A 12-bit image stored JSRT's way: high values are dark, so the lungs hold high values."""
    raw = np.full((SIDE, SIDE), 600 + seed, np.uint16)
    raw[400:1600, 300:900] = 3900     # right lung field (dark on a display)
    raw[400:1600, 1150:1750] = 3800   # left lung field
    raw[0, 0], raw[0, 1] = 0, 4095    # the full 12-bit range
    return raw


@pytest.fixture()
def jsrt_root(tmp_path):
    root = tmp_path / "JSRT"
    write_text(root / "CLNDAT_EN.txt", CLNDAT)
    write_text(root / "CNNDAT_EN.TXT", CNNDAT)  # distributed in either case
    write_raw(root / "Nodule154images" / "JPCLN001.IMG", jsrt_raw(1))
    write_raw(root / "Nodule154images" / "JPCLN002.IMG", jsrt_raw(2))
    write_raw(root / "NonNodule93images" / "JPCNN001.IMG", jsrt_raw(3))
    write_raw(root / "NonNodule93images" / "JPCNN003.IMG", np.zeros((64, 64)))  # truncated file
    write_raw(root / "extra" / "JPCLN099.IMG", np.zeros((4, 4)))                 # in neither list
    return root


def test_cases_become_records_with_nodule_boxes(jsrt_root):
    adapter = create_dataset("jsrt")
    records, rejects = collect("jsrt", jsrt_root, adapter=adapter)
    assert sorted(records) == ["JPCLN001", "JPCNN001", "JPCNN003"]
    for r in records.values():
        check_record(r, adapter)
        assert r.patient_id == r.image_id and r.extra["also_in"] == ["cxr-landmarks"]

    nodule = records["JPCLN001"]
    assert nodule.labels == {"nodule": 1} and nodule.path == "Nodule154images/JPCLN001.IMG"
    (box,) = nodule.boxes
    side = 15 / 0.175  # 85.7 px: the nodule's diameter at JSRT's pixel spacing
    assert (box.x1 - box.x0, box.y1 - box.y0) == pytest.approx((side, side))
    assert ((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2) == pytest.approx((1634, 692))
    assert nodule.source_labels["malignancy"] == "malignant" and nodule.source_labels["diagnosis"] == "lung cancer"

    normal = records["JPCNN001"]
    assert normal.labels == {"nodule": 0} and normal.boxes == []
    assert normal.healthy and not nodule.healthy and nodule.frame == (SIDE, SIDE)
    assert normal.source_labels == {"file_name": "JPCNN001.IMG", "age": "37", "sex": "female", "diagnosis": "non-nodule"}

    reasons = reject_reasons(rejects)
    assert reasons["Nodule154images/JPCLN002.IMG"] == "CLNDAT_EN.txt line 2: size_mm '?' is not a number"
    assert reasons["CNNDAT_EN.TXT:2"] == "CNNDAT_EN.TXT line 2: no JPCNN002.IMG found under --root"
    assert reasons["extra/JPCLN099.IMG"] == "listed in neither CLNDAT_EN.txt nor CNNDAT_EN.txt"
    assert len(rejects) == 3


def test_load_inverts_so_lungs_are_dark(jsrt_root):
    records, _ = collect("jsrt", jsrt_root)
    image = records["JPCLN001"].load()
    assert image.shape == (SIDE, SIDE) and image.dtype == np.uint16
    # Stretched over 0..4095 and inverted: raw 3900 (lung) is dark, raw 601 (mediastinum) bright.
    assert image[1000, 600] == round((1 - 3900 / 4095) * 65535)
    assert image[1000, 1000] == round((1 - 601 / 4095) * 65535)
    with pytest.raises(Exception, match="raw file has 8192 bytes"):
        records["JPCNN003"].load()


def test_missing_case_list_is_one_clear_error(jsrt_root):
    (jsrt_root / "CNNDAT_EN.TXT").unlink()
    with pytest.raises(LeaderError, match="expected CNNDAT_EN.txt"):
        collect("jsrt", jsrt_root)


def test_cli_build(jsrt_root, tmp_path):
    samples, manifest, rejects = build_with_cli("jsrt", jsrt_root, tmp_path / "out", "--max-reject-fraction", "1")
    assert manifest.n_samples == 2 and manifest.has_boxes
    meta = samples["JPCLN001"].meta
    assert meta["orig_size"] == [SIDE, SIDE] and meta["size"] == [64, 64] and meta["bits"] == 16
    assert meta["boxes"][0]["x0"] == pytest.approx((1634 - 15 / 0.175 / 2) * 64 / SIDE, abs=1e-3)
    assert [p["kind"] for p in meta["patches"]] == ["diseased"]
    # The nodule and the normal case fall in different splits here, so the nodule's split has no
    # healthy image: its healthy patch is a reported shortfall.
    assert samples["JPCNN001"].meta["split"] != meta["split"] and samples["JPCNN001"].meta["patches"] == []
    assert manifest.counts["healthy_shortfall"] == 1 and "no healthy counterpart" not in " ".join(manifest.notes)
    assert samples["JPCNN001"].image()[32, 32] > samples["JPCNN001"].image()[30, 18]  # mediastinum brighter than lung
    reasons = {r["path"]: r["reason"] for r in rejects}
    assert "raw file has 8192 bytes" in reasons["NonNodule93images/JPCNN003.IMG"]
    assert len(rejects) == 4


def write_gif(path, mask: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def test_scr_masks_are_stored_when_their_folder_is_given(jsrt_root, tmp_path):
    # SCR's masks are 1024 px for JSRT's 2048 px images, one GIF per object, in two folds.
    right_lung = np.zeros((1024, 1024), bool)
    right_lung[200:800, 150:450] = True           # the raw image's right lung field, at half size
    heart = np.zeros((1024, 1024), bool)
    heart[500:800, 400:700] = True
    scr = tmp_path / "scr"
    write_gif(scr / "scratch" / "fold1" / "masks" / "right lung" / "JPCLN001.gif", right_lung)
    write_gif(scr / "scratch" / "fold1" / "masks" / "heart" / "JPCLN001.gif", heart)
    write_gif(scr / "scratch" / "fold2" / "masks" / "heart" / "JPCNN001.gif", np.zeros((1024, 900), bool))  # wrong shape
    samples, manifest, rejects = build_with_cli("jsrt", jsrt_root, tmp_path / "out", "--max-reject-fraction", "1",
                                                "--option", f"scr_masks={scr}")
    assert manifest.mask_classes == ["right_lung", "left_lung", "heart", "right_clavicle", "left_clavicle"]
    sample = samples["JPCLN001"]
    assert sample.meta["mask"]["classes"] == ["right_lung", "heart"]            # the others were not drawn
    from leader.shards.masks import decode_masks

    stored_lung, stored_heart = decode_masks(sample.mask_png, manifest.mask_classes, ["right_lung", "heart"])
    assert np.array_equal(stored_lung, right_lung[8::16, 8::16])              # 1024 -> 64, nearest
    assert np.array_equal(stored_heart, heart[8::16, 8::16])
    # The mask marks the image's dark lung field (a stored 64 px pixel covers raw rows 32k..32k+31).
    assert sample.image()[stored_lung].mean() < sample.image()[~stored_lung].mean()
    reasons = {r["path"]: r["reason"] for r in rejects}
    assert "mask of the wrong size: the 'heart' mask is 900x1024, the image 2048x2048" in reasons["NonNodule93images/JPCNN001.IMG"]
    with pytest.raises(LeaderError, match="scr_masks=nowhere is not a folder"):
        collect("jsrt", jsrt_root, adapter=create_dataset("jsrt", scr_masks="nowhere"))
