"""The evaluation suite end to end, through `leader eval ...` and `leader report`.

The bench is a small phantom with two teachers trained inside the test, each on one kind of
knowledge only, saved as plain timm checkpoints and precomputed into the cache by the real
`precompute` through the real `timm` teacher adapter:
- the disease teacher learns the image labels (multi-label BCE on whole training images);
- the anatomy teacher learns which landmark a patch shows (landmark crops of training images);
  it never sees a disease label.
The protocols must then tell them apart: anatomy wins kNN on landmark patches, disease wins AUC.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from leader.evaluate.commands import eval_app, report_command
from tests.conftest import build_phantom, one_thread

ARCH = "test_resnet"          # timm's smallest ResNet: fast at this size on one CPU thread
SIDE = 48                     # teacher input and patch size
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def single_threaded():
    # Tiny convolutions on a shared 2-core machine run many times faster on one thread.
    with one_thread():
        yield


def normalise(views: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) in [0, 1] -> (B, 3, S, S) ImageNet-normalised, as the timm teacher preprocesses."""
    from leader.network_input import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (views.expand(-1, 3, -1, -1) - mean) / std


def train_teacher(inputs: torch.Tensor, targets: torch.Tensor, loss_fn, out: Path, epochs: int, seed: int,
                  keys: list[str] | None = None) -> Path:
    """Train a timm backbone + linear head; save the backbone's state dict (the `timm` teacher's format).

    inputs: (N, 1, S, S) in [0, 1]. With `keys`, every epoch shows each input through a fresh random
    view (the paper's augmentations), which the few training images badly need.
    """
    import timm

    from leader.views import ViewSpec, replay_views, sample_view_params

    torch.manual_seed(seed)
    backbone = timm.create_model(ARCH, num_classes=0)
    head = torch.nn.Linear(backbone.num_features, targets.shape[1] if targets.ndim > 1 else int(targets.max()) + 1)
    optimizer = torch.optim.AdamW([*backbone.parameters(), *head.parameters()], lr=3e-3, weight_decay=0.05)
    for epoch in range(epochs):
        views = inputs if keys is None else replay_views(inputs, sample_view_params(ViewSpec(), epoch, keys, 2)[:, 1], SIDE)
        for batch in torch.randperm(len(inputs)).split(16):
            loss = loss_fn(head(backbone(normalise(views[batch]))), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.save(backbone.state_dict(), out)
    return out


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from leader.precompute.run import CacheLayout, Execution, precompute
    from leader.precompute.teachers import create_teacher
    from leader.shards.crop import crop_patch
    from leader.shards.patches import PatchPlan, landmark_patches
    from leader.shards.layout import iter_samples

    from leader.evaluate.finetune import render_identity

    root = tmp_path_factory.mktemp("eval_bench")
    shards = root / "shards"
    # Findings large enough to see at 64 px, common enough for a 160-image phantom; the small ones
    # (nodule, atelectasis) are absent, so the probes must also report classes they cannot score.
    prevalence = {"cardiomegaly": 0.3, "consolidation": 0.3, "effusion": 0.3, "mass": 0.3, "pneumothorax": 0.3,
                  "nodule": 0.0, "atelectasis": 0.0}
    build_phantom(shards, n=160, size=64, shard_size=40, seed=3, prevalence=prevalence,
                  split_fractions={"train": 0.55, "val": 0.15, "test": 0.3})

    train = [s for s in iter_samples(shards) if s.meta["split"] == "train"]
    images = [s.image() for s in train]
    names = sorted(train[0].meta["labels"])
    labels = torch.tensor([[float(s.meta["labels"][n]) for n in names] for s in train])
    disease = train_teacher(torch.stack([render_identity(img, img.shape[0]) for img in images]), labels,
                            torch.nn.functional.binary_cross_entropy_with_logits, root / "disease.pth",
                            epochs=40, seed=0, keys=[s.key for s in train])

    landmark_ids = {name: i for i, name in enumerate(sorted(train[0].meta["landmarks"]))}
    crops, ids = [], []
    for sample, image in zip(train, images):
        h, w = image.shape
        for patch in landmark_patches(sample.meta["landmarks"], w, h, PatchPlan()):
            crops.append(crop_patch(image, patch["box"], SIDE))
            ids.append(landmark_ids[patch["label"]])
    anatomy = train_teacher(torch.from_numpy(np.stack(crops))[:, None], torch.tensor(ids),
                            torch.nn.functional.cross_entropy, root / "anatomy.pth", epochs=3, seed=1)

    for name, checkpoint in (("disease", disease), ("anatomy", anatomy)):
        with create_teacher("timm", model=checkpoint, arch=ARCH, input_size=SIDE) as teacher:
            precompute(shards, name, teacher, layout=CacheLayout(views=1, patch_size=SIDE), execution=Execution(batch_size=64))
    return root


def invoke(*args) -> str:
    result = runner.invoke(eval_app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def read(path: Path) -> dict:
    return json.loads((path / "metrics.json").read_text())


def assert_png(path: Path) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_anatomy_teacher_separates_landmarks_better(bench):
    shards, out = bench / "shards", bench / "eval"
    for rep in ("disease", "anatomy"):
        invoke("anatomy", "--shards", shards, "--repr", f"teacher:{rep}", "--out", out / f"anatomy-{rep}")
    disease, anatomy = read(out / "anatomy-disease"), read(out / "anatomy-anatomy")
    assert anatomy["knn_accuracy"] > disease["knn_accuracy"] + 0.05
    assert anatomy["knn_accuracy"] > 3 * anatomy["chance"]
    assert anatomy["nmi"] > disease["nmi"]
    assert -1 <= anatomy["silhouette"] <= 1 and len(anatomy["per_fold"]) == 5
    assert len(anatomy["landmarks"]) == 10
    assert_png(out / "anatomy-anatomy" / anatomy["figures"]["tsne"])


def test_disease_teacher_classifies_disease_better(bench):
    shards, out = bench / "shards", bench / "eval"
    for rep in ("disease", "anatomy"):
        invoke("linear-probe", "--shards", shards, "--repr", f"teacher:{rep}", "--out", out / f"probe-{rep}",
               "--fraction", "0.3,1.0", "--seeds", "3", "--n-boot", "200")
    disease, anatomy = read(out / "probe-disease"), read(out / "probe-anatomy")
    assert disease["auc_mean"] > anatomy["auc_mean"]
    assert disease["auc_mean"] > 0.6
    lo, hi = disease["auc_ci95"]
    assert lo < disease["auc_mean"] < hi
    assert set(disease["fractions"]) == {"0.3", "1"} and len(disease["fractions"]["0.3"]["per_seed"]) == 3
    assert_png(out / "probe-disease" / "auc_per_class.png")

    compared = invoke("compare", out / "probe-disease", out / "probe-anatomy", "--json")
    assert json.loads(compared)["a"] == "teacher:disease"


def test_lesion_level_probe_and_both_ensembles(bench):
    shards, out = bench / "shards", bench / "eval"
    invoke("linear-probe", "--shards", shards, "--repr", "teacher:disease", "--level", "lesion",
           "--out", out / "lesion-disease", "--n-boot", "100")
    lesion = read(out / "lesion-disease")
    assert lesion["protocol"] == "linear-probe-lesion" and lesion["classes"]
    assert 0.0 <= lesion["auc_mean"] <= 1.0

    invoke("linear-probe", "--shards", shards, "--repr", "concat:teacher:disease+teacher:anatomy",
           "--out", out / "probe-concat", "--n-boot", "100")
    invoke("linear-probe", "--shards", shards, "--repr", "teacher:disease", "--repr", "teacher:anatomy",
           "--ensemble", "average", "--out", out / "probe-average", "--n-boot", "100")
    concat, average = read(out / "probe-concat"), read(out / "probe-average")
    assert concat["representation"] == "concat:teacher:disease+teacher:anatomy"
    assert average["representation"] == "average:teacher:disease+teacher:anatomy"
    assert average["members"] == ["teacher:disease", "teacher:anatomy"]
    assert concat["auc_mean"] > 0.5 and average["auc_mean"] > 0.5

    result = runner.invoke(eval_app, ["linear-probe", "--shards", str(shards), "--repr", "teacher:disease",
                                      "--repr", "teacher:anatomy", "--out", str(out / "x")])
    assert result.exit_code != 0 and "--ensemble average" in str(result.exception)


def test_a_class_list_changes_the_averaged_set(bench):
    shards, out = bench / "shards", bench / "classes"     # beside eval/, whose one-evaluation-per-cell report comes later
    invoke("linear-probe", "--shards", shards, "--repr", "teacher:disease", "--out", out / "probe-all", "--n-boot", "50")
    invoke("linear-probe", "--shards", shards, "--repr", "teacher:disease", "--out", out / "probe-two",
           "--classes", "effusion,pneumothorax", "--n-boot", "50")
    everything, two = read(out / "probe-all"), read(out / "probe-two")
    assert (everything["class_set"], two["class_set"]) == ("all", "a list")
    assert two["classes"] == ["effusion", "pneumothorax"] and len(everything["classes"]) > 2
    # The same probes per class (fitted jointly, so to the solver's tolerance); the average follows the set.
    for c in two["classes"]:
        assert two["auc_per_class"][c] == pytest.approx(everything["auc_per_class"][c], abs=0.02)
    assert two["auc_mean"] == pytest.approx(np.mean(list(two["auc_per_class"].values())))
    invoke("linear-probe", "--shards", shards, "--repr", "teacher:disease", "--level", "lesion",
           "--out", out / "lesion-two", "--classes", "nodule,mass", "--n-boot", "50")
    lesion = read(out / "lesion-two")
    assert set(lesion["classes"]) | set(lesion["skipped_classes"]) == {"nodule", "mass"}     # a class lacking test boxes is skipped, by name
    result = runner.invoke(eval_app, ["linear-probe", "--shards", str(shards), "--repr", "teacher:disease",
                                      "--classes", "paper", "--out", str(out / "x")])
    assert result.exit_code != 0 and "no class set or class 'paper'" in str(result.exception)


def test_representations_name_what_is_wrong(bench):
    from leader.errors import LeaderError
    from leader.evaluate.representations import features

    X, rows = features("teacher:disease", bench / "shards", kind="landmark", split="test")
    assert X.shape == (len(rows), 96) and X.dtype == np.float32
    both, _ = features("concat:teacher:disease+teacher:anatomy", bench / "shards", rows=rows[:5])
    np.testing.assert_allclose(np.linalg.norm(both, axis=1), 1.0, rtol=1e-5)   # equal-weight unit parts
    with pytest.raises(LeaderError, match=r"holds \['anatomy', 'disease'\]"):
        features("teacher:segmentation", bench / "shards", rows=rows[:2])
    with pytest.raises(LeaderError, match="no teacher cache"):
        features("teacher:disease", bench / "shards", rows=rows[:2], cache=bench / "missing.zarr")


def test_retrieval_scores_and_draws_the_grid(bench):
    shards, out = bench / "shards", bench / "eval"
    output = invoke("retrieval", "--shards", shards, "--repr", "teacher:disease", "--out", out / "retrieval-disease",
                    "--k", "100")
    metrics = read(out / "retrieval-disease")
    assert "precision_at_k_mean" in output
    assert 0.0 <= metrics["precision_at_k_mean"] <= 1.0 and metrics["precision_at_k_std"] >= 0.0
    assert metrics["k"] == 100 and metrics["k_effective"]["max"] < 100       # scaled down on a small gallery
    assert metrics["n_queries"] == len(metrics["per_query"]) > 0
    assert_png(out / "retrieval-disease" / "retrieval_grid.png")


def test_finetune_a_timm_backbone_on_little_data(bench, tmp_path):
    import timm

    checkpoint = tmp_path / "init.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model(ARCH, num_classes=0).state_dict(), checkpoint)
    invoke("finetune", "--shards", bench / "shards", "--repr", f"timm:{ARCH}:{checkpoint}", "--out", tmp_path / "ft",
           "--fraction", "0.5,1.0", "--epochs", "2", "--image-size", "32", "--batch-size", "32", "--n-boot", "50")
    metrics = read(tmp_path / "ft")
    assert metrics["protocol"] == "finetune" and set(metrics["fractions"]) == {"0.5", "1"}
    run = metrics["fractions"]["1"]["training"][0]
    assert 1 <= run["epochs_run"] <= 2 and len(run["val_auc"]) == run["epochs_run"]
    assert 0.0 <= metrics["auc_mean"] <= 1.0
    # The bootstrap replicates behind the CI are kept for paired claims, as the linear probe's are.
    assert metrics["paired"] == {"metric": "auc_mean", "field": "auc_boot", "over": "bootstrap resamples of the test images",
                                 "test": "bootstrap"}
    assert len(metrics["auc_boot"]) == 50
    assert np.nanpercentile(metrics["auc_boot"], [2.5, 97.5]) == pytest.approx(metrics["auc_ci95"], abs=1e-5)
    assert_png(tmp_path / "ft" / "auc_per_class.png")


def test_student_run_is_a_representation(bench, tmp_path):
    from leader.train.config import load_config
    from leader.train.loop import train

    run = tmp_path / "student"
    cfg = load_config(Path(__file__).parents[1] / "configs" / "demo.yaml",
                      ["phases.0.steps=3", "phases.1.steps=3", "run.tensorboard=false", "run.log_every=1"],
                      shards=[str(bench / "shards")])
    train(cfg, run)
    for rep, name in ((f"run:{run}", "backbone"), (f"run:{run}:anatomy", "head")):
        invoke("anatomy", "--shards", bench / "shards", "--repr", rep, "--out", tmp_path / f"anatomy-{name}")
        assert read(tmp_path / f"anatomy-{name}")["representation"] == rep
    invoke("finetune", "--shards", bench / "shards", "--repr", f"run:{run}", "--out", tmp_path / "ft",
           "--epochs", "1", "--n-boot", "20")
    assert read(tmp_path / "ft")["image_size"] == 64                    # the run's own resolution


def test_report_tables_figures_and_claims(bench, tmp_path):
    # Runs after the tests above (file order), so the bench holds their metrics.
    out = bench / "eval"
    claims = tmp_path / "claims.json"
    claims.write_text(json.dumps([
        {"name": "anatomy teacher separates landmarks", "protocol": "anatomy", "subject": "teacher:anatomy",
         "reference": "teacher:disease", "plus": 0.05},
        {"name": "disease teacher classifies", "protocol": "linear-probe", "subject": "teacher:disease",
         "reference": "teacher:anatomy"},
        {"name": "an impossible bar", "protocol": "linear-probe", "subject": "teacher:anatomy", "value": 1.01},
    ]))
    report = tmp_path / "report" / "report.md"
    import typer

    app = typer.Typer()
    app.command()(report_command)
    result = runner.invoke(app, [str(out), "--out", str(report), "--claims", str(claims)])
    assert result.exit_code == 0, result.output
    assert result.output.count("PASS") == 2 and result.output.count("FAIL") == 1
    text = report.read_text()
    assert "| representation | linear-probe (auc_mean)" in text
    for rep in ("teacher:disease", "teacher:anatomy", "concat:teacher:disease+teacher:anatomy"):
        assert f"| `{rep}` |" in text
    links = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert any("tsne" in link for link in links) and any("retrieval_grid" in link for link in links)
    assert "report_figures/linear-probe_auc_per_class.png" in links        # every representation side by side
    assert all((report.parent / link).is_file() and not Path(link).is_absolute() for link in links)
    assert "significant" in text or "n/a" in text

    strict = runner.invoke(app, [str(out), "--out", str(report), "--claims", str(claims), "--strict"])
    assert strict.exit_code == 1
