"""Segmentation fine-tuning: Dice and IoU by hand, the UperNet encoder filled from a backbone (and
refusing to run half random), and `leader eval segment` end to end on phantom, ChestX-Det-format
and SIIM-format shards, its metrics read by `eval compare` and `leader report`."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from leader.cli import app
from leader.errors import LeaderError
from leader.evaluate.seg_metrics import (bootstrap_replicates, image_dice, image_iou, overlap_counts, pooled_dice,
                                         pooled_iou, seed_scores)
from tests.conftest import build_phantom

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)                 # tiny networks on a shared 2-core machine
    yield
    torch.set_num_threads(before)


def leader(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def leader_fails(capsys, *args) -> list[str]:
    """Run `leader ARGS` as the console script does; it must exit 2; -> the lines it printed on stderr."""
    from leader.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main([str(a) for a in args])
    assert stopped.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


# --------------------------------------------------------------------------- Dice and IoU by hand


def masks(*rows: str) -> np.ndarray:
    """A (1, 1, H, W) mask drawn as strings, '#' inside."""
    return np.array([[c == "#" for c in row] for row in rows])[None, None]


def test_dice_and_iou_match_hand_computed_values_including_empty_cases():
    truth = np.concatenate([masks("##..", "##..", "....", "...."),      # 4 px
                            masks("....", "....", "....", "...."),      # empty
                            masks("....", "....", "....", "...."),      # empty
                            masks("#...", "....", "....", "....")])     # 1 px
    predicted = np.concatenate([masks("###.", "##..", "....", "...."),  # 5 px, 4 correct
                                masks("....", "....", "....", "...."),  # empty on empty
                                masks("....", "....", "..#.", "...."),  # a false positive on an empty image
                                masks("....", "....", "....", "....")])  # a miss
    counts = overlap_counts(predicted, truth)
    assert counts[:, 0].tolist() == [[4, 5, 4], [0, 0, 0], [0, 1, 0], [0, 0, 1]]
    # Per image: 2*4/(5+4); empty on empty scores 1; one empty side scores 0.
    np.testing.assert_allclose(image_dice(counts)[:, 0], [8 / 9, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(image_iou(counts)[:, 0], [4 / 5, 1.0, 0.0, 0.0])
    # Pooled: every pixel of the set together: 2*4 / (6 + 5), IoU 4 / (6 + 5 - 4).
    assert pooled_dice(counts)[0] == pytest.approx(8 / 11)
    assert pooled_iou(counts)[0] == pytest.approx(4 / 7)
    scores = seed_scores(counts)
    assert scores["dice"] == pytest.approx(8 / 11) and scores["dice_per_image"] == pytest.approx((8 / 9 + 1) / 4)
    # A class with no pixel anywhere has no pooled score, and is left out of the class mean.
    two = np.concatenate([counts, np.zeros_like(counts)], axis=1)
    assert math.isnan(pooled_dice(two)[1]) and seed_scores(two)["dice"] == pytest.approx(8 / 11)
    assert seed_scores(two)["dice_per_image"] == pytest.approx(((8 / 9 + 1) / 4 + 1) / 2)   # empty-empty: 1


def test_bootstrap_replicates_resample_the_same_images_for_every_representation():
    truth = np.concatenate([masks("##..", "##..", "....", "...."), masks("....", "..##", "..##", "...."),
                            masks("#...", "....", "....", "...."), masks("....", "....", "....", "...#")])
    missed = truth.copy()
    missed[3] = False                                            # the same, but image 3's finding is missed
    exact = bootstrap_replicates([overlap_counts(truth, truth)], n_boot=400)["dice"]
    worse = bootstrap_replicates([overlap_counts(missed, truth)], n_boot=400)["dice"]
    assert np.all(exact == 1.0)
    # Paired: a resample that leaves image 3 out scores both the same, one that draws it scores the
    # miss lower. Image 3 is left out of a resample of 4 with probability (3/4)^4 = 0.32.
    assert np.all(worse <= exact) and np.mean(worse == exact) == pytest.approx(0.75 ** 4, abs=0.06)


# --------------------------------------------------------------------------- the UperNet encoder


def seeded_backbone(arch: str, **kwargs):
    import timm

    torch.manual_seed(7)
    return timm.create_model(arch, num_classes=0, **kwargs)


SWIN = ("swin_tiny_patch4_window7_224",
        dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=2, img_size=64))


@pytest.mark.parametrize("arch, kwargs, trained_at, size", [
    ("test_resnet", {}, 64, 64),
    ("test_convnext", {}, 64, 96),
    (*SWIN, 64, 128),                       # a Swin student segmenting at twice its training size
])
def test_every_backbone_weight_arrives_in_the_encoder(arch, kwargs, trained_at, size):
    from leader.evaluate.initialisation import BackboneSource
    from leader.evaluate.upernet import backbone_names, build_upernet

    backbone = seeded_backbone(arch, **kwargs)
    source = BackboneSource("run:student", lambda: backbone, trained_at, arch=arch, kwargs=kwargs)
    model, encoder = build_upernet(source, classes=2, size=size, decoder_channels=16)
    weights = backbone.state_dict()
    for key, tensor in model.encoder.model.state_dict().items():
        name = next(n for n in backbone_names(key) if n in weights)
        assert torch.equal(tensor, weights[name]), key
    assert encoder["loaded"] == len(model.encoder.model.state_dict()) and encoder["weights"] == "run:student"
    # Only the norm after global pooling has no place in a feature pyramid.
    assert all(k.startswith(("head.", "norm.")) for k in encoder["unused_backbone_keys"])
    model.eval()
    assert model(torch.zeros(1, 3, size, size)).shape == (1, 2, size, size)


def test_a_missing_backbone_weight_stops_the_build():
    import segmentation_models_pytorch as smp

    from leader.evaluate.upernet import load_encoder

    weights = seeded_backbone("test_resnet").state_dict()
    del weights["layer2.0.conv1.weight"]
    model = smp.UPerNet(encoder_name="tu-test_resnet", encoder_weights=None, classes=1, decoder_channels=16)
    with pytest.raises(LeaderError, match=r"1 encoder weights have no backbone weight \(layer2.0.conv1.weight\); "
                                          "refusing to train a partly random encoder"):
        load_encoder(model.encoder.model, weights, "run:student")
    weights = seeded_backbone("test_resnet").state_dict()
    weights["layer1.0.conv1.weight"] = weights["layer1.0.conv1.weight"][:1]
    with pytest.raises(LeaderError, match="have another shape"):
        load_encoder(model.encoder.model, weights, "run:student")


def test_sizes_that_upernet_cannot_take_are_refused():
    from leader.evaluate.initialisation import backbone_source
    from leader.evaluate.upernet import build_upernet

    with pytest.raises(LeaderError, match="needs a multiple of 32"):
        build_upernet(backbone_source("timm:test_resnet"), classes=1, size=100)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def seg_shards(tmp_path_factory):
    """A small phantom with large findings, and a checkpoint to start from."""
    import timm

    root = tmp_path_factory.mktemp("seg")
    build_phantom(root / "shards", n=48, size=64, shard_size=24, seed=5,
                  prevalence={"effusion": 0.5, "consolidation": 0.4, "cardiomegaly": 0.4, "nodule": 0.0},
                  split_fractions={"train": 0.6, "val": 0.15, "test": 0.25})
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), root / "init.pth")
    return root


def test_a_short_phantom_run_that_compare_and_report_accept(seg_shards, tmp_path):
    common = ["--shards", seg_shards / "shards", "--fraction", "0.5,1.0", "--seeds", "2", "--size", "64",
              "--epochs", "2", "--batch-size", "8", "--decoder-channels", "16", "--n-boot", "50"]
    output = leader("eval", "segment", "--repr", f"timm:test_resnet:{seg_shards / 'init.pth'}",
                    "--out", tmp_path / "eval" / "seg-init", *common)
    assert "pooled Dice" in output and "mean per-image Dice" in output
    leader("eval", "segment", "--repr", f"random:timm:test_resnet:{seg_shards / 'init.pth'}",
           "--out", tmp_path / "eval" / "seg-random", *common)
    started = json.loads((tmp_path / "eval" / "seg-init" / "metrics.json").read_text())
    random = json.loads((tmp_path / "eval" / "seg-random" / "metrics.json").read_text())
    assert started["protocol"] == random["protocol"] == "segment" and started["primary"] == "dice_mean"
    assert random["representation"] == f"random:timm:test_resnet:{seg_shards / 'init.pth'}"
    assert started["encoder"]["loaded"] > 0 and random["encoder"]["weights"] == "random"
    assert started["target"] == "union" and set(started["classes"]) == {"atelectasis", "cardiomegaly",
                                                                          "consolidation", "effusion", "mass", "nodule",
                                                                          "pneumothorax"}
    for m in (started, random):
        assert set(m["fractions"]) == {"0.5", "1"} and len(m["per_seed"]) == 2
        lo, hi = m["dice_ci95"]
        assert 0 <= lo <= hi <= 1 and 0 <= m["dice_per_image_mean"] <= 1 and 0 <= m["iou_mean"] <= m["dice_mean"] + 1e-9
        assert (tmp_path / "eval" / f"seg-{'init' if m is started else 'random'}" / m["figures"]["overlays"]).is_file()
    # The 50% subsets depend on the seed only: both starting points trained on the same images.
    assert [r["n_train"] for r in started["fractions"]["0.5"]["training"]] == \
        [r["n_train"] for r in random["fractions"]["0.5"]["training"]]
    # Both keep their pooled Dice per bootstrap resample of the same test images: a paired claim reads them.
    from leader.evaluate.claims import judge

    for m in (started, random):
        assert m["paired"]["field"] == "dice_boot" and len(m["dice_boot"]) == 50
        assert np.nanpercentile(m["dice_boot"], [2.5, 97.5]) == pytest.approx(m["dice_ci95"], abs=1e-5)
    verdict = judge({"name": "init beats random", "protocol": "segment", "subject": "timm:*", "beats": "random:*"},
                    [started, random])
    assert "over 50 paired bootstrap resamples" in verdict.detail
    compared = json.loads(leader("eval", "compare", tmp_path / "eval" / "seg-init", tmp_path / "eval" / "seg-random",
                                 "--json"))
    assert compared["metric"] == "dice_mean" and compared["n_a"] == compared["n_b"] == 2
    leader("report", tmp_path / "eval", "--out", tmp_path / "report.md")
    report = (tmp_path / "report.md").read_text()
    assert "segment (dice_mean)" in report and "dice_per_image_mean" in report and "overlays" in report


def test_per_class_targets_and_named_anatomy_classes(seg_shards, tmp_path, capsys):
    leader("eval", "segment", "--shards", seg_shards / "shards", "--repr", "timm:test_resnet", "--out", tmp_path / "lungs",
           "--target", "per-class", "--classes", "right_lung,left_lung", "--size", "64", "--epochs", "1",
           "--batch-size", "8", "--decoder-channels", "16", "--n-boot", "20")
    metrics = json.loads((tmp_path / "lungs" / "metrics.json").read_text())
    assert metrics["classes"] == ["right_lung", "left_lung"] and set(metrics["dice_per_class"]) == {"right_lung", "left_lung"}
    (line,) = leader_fails(capsys, "eval", "segment", "--shards", seg_shards / "shards", "--repr", "timm:test_resnet",
                           "--out", tmp_path / "x", "--classes", "liver")
    assert line.startswith("error: --classes liver: not mask classes of")


def test_a_shard_set_without_masks_says_so_in_one_line(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "csv"
    (root / "img").mkdir(parents=True)
    for i in range(6):
        Image.fromarray((np.random.default_rng(i).random((40, 40)) * 255).astype(np.uint8)).save(root / "img" / f"{i}.png")
    (root / "labels.csv").write_text("path,labels\n" + "".join(f"img/{i}.png,nodule\n" for i in range(6)))
    leader("shards", "build", "csv", "--root", root, "--out", tmp_path / "shards", "--size", "32")
    assert leader_fails(capsys, "eval", "segment", "--shards", tmp_path / "shards", "--repr", "timm:test_resnet",
                        "--out", tmp_path / "seg") == [
        f"error: {tmp_path / 'shards'} has no segmentation masks: it was built before leader stored masks, or its "
        "dataset (csv) has none; rebuild it with `leader shards build` to segment"]


def test_segment_runs_on_chestx_det_and_siim_format_shards(tmp_path):
    from tests.datasets.test_chestx_det import diamond, entry
    from tests.datasets.fixtures_files import radiograph, write_json, write_png
    from tests.datasets.test_siim import rect, siim_rle
    from tests.datasets.fixtures_dicom import phantom, write_csv, write_dicom

    # ChestX-Det: 24 images, a mass and an effusion outlined by polygons on most of them, on the
    # 1024 px frame of the released images (these files are 64 px copies).
    det = tmp_path / "ChestX-Det"
    train, test = [], []
    for i in range(24):
        name = f"{i}.png"
        write_png(det / ("train" if i < 18 else "test") / name, radiograph(64, seed=i))
        mass, effusion = [160 + 16 * (i % 5), 192, 480 + 16 * (i % 5), 544], [480, 576 + 16 * (i % 4), 928, 960]
        e = entry(name, ["Mass", "Effusion"], [mass, effusion], [diamond(mass), diamond(effusion)]) if i % 4 else entry(name)
        (train if i < 18 else test).append(e)
    write_json(det / "ChestX_Det_train.json", train)
    write_json(det / "ChestX_Det_test.json", test)
    leader("shards", "build", "chestx-det", "--root", det, "--out", tmp_path / "det", "--size", "64",
           "--option", "val_fraction=0.3")
    # SIIM: 30 DICOMs (2 of them val by the patient-wise split), a pneumothorax on every other one, stage 2's absolute RLE.
    siim = tmp_path / "siim"
    rows = []
    for i in range(30):
        write_dicom(siim / "dicom-images-train" / f"s{i}" / f"r{i}" / f"1.{i}.dcm", phantom(64, 64, seed=i), view=None)
        rows.append((f"1.{i}", " " + (siim_rle(rect(8, 30, 4 + i, 20 + i), "absolute") if i % 2 else "-1")))
    write_csv(siim / "stage_2_train.csv", ["ImageId", " EncodedPixels"], rows)
    leader("shards", "build", "siim", "--root", siim, "--out", tmp_path / "siim-shards", "--size", "64")

    for shards in ("det", "siim-shards"):
        leader("eval", "segment", "--shards", tmp_path / shards, "--repr", "timm:test_resnet", "--out",
               tmp_path / f"seg-{shards}", "--size", "64", "--epochs", "1", "--batch-size", "4",
               "--decoder-channels", "16", "--n-boot", "20")
        metrics = json.loads((tmp_path / f"seg-{shards}" / "metrics.json").read_text())
        assert 0.0 <= metrics["dice_mean"] <= 1.0 and sum(metrics["n_images"].values()) > 0
    assert json.loads((tmp_path / "seg-det" / "metrics.json").read_text())["classes"][0] == "atelectasis"
    assert json.loads((tmp_path / "seg-siim-shards" / "metrics.json").read_text())["classes"] == ["pneumothorax"]


def test_a_non_square_image_and_its_mask_are_stretched_onto_one_square_alike():
    from leader.evaluate.segment import on_square_canvas

    image = np.zeros((32, 64), np.uint8)
    image[:, :16] = 200                                   # a bright band: the left quarter
    mask = np.zeros((32, 64), np.uint16)
    mask[:, :16] = 1 << 12
    square, packed = on_square_canvas(image, mask)
    assert square.shape == packed.shape == (64, 64) and square.dtype == np.uint8
    assert set(np.unique(packed)) == {0, 1 << 12}
    np.testing.assert_array_equal(packed[:, :16] != 0, True)
    np.testing.assert_array_equal(packed[:, 16:] != 0, False)
    assert square[:, :15].min() > 190 and square[:, 17:].max() < 10


def test_a_class_set_names_mask_classes_in_their_spelling():
    from types import SimpleNamespace

    from leader.evaluate.segment import requested_mask_classes

    manifest = SimpleNamespace(
        dataset="chestx-det", label_names=["nodule", "mass"], source_class_names=["Diffuse Nodule", "Mass"],
        class_sets={"paper": {"names": ["Diffuse Nodule", "Mass"], "labels": "source", "about": ""}},
        mask_classes=["diffuse_nodule", "mass", "right_lung"])
    assert requested_mask_classes(manifest, "paper") == ["diffuse_nodule", "mass"]
    assert requested_mask_classes(manifest, "mass, right_lung") == ["mass", "right_lung"]
    assert requested_mask_classes(manifest, None) is None and requested_mask_classes(manifest, "all") is None
