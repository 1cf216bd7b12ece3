"""The student trainer on the phantom: stream, step, phases, resume, DDP, export and embed.

Every test trains from a real teacher cache: two tiny random timm teachers (a ResNet for
"disease", a ConvNeXt for "anatomy") precomputed over the phantom shards with `precompute`, as
`leader precompute` would. Runs are short; only `test_demo_config_lowers_both_losses` trains the
full configs/demo.yaml.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from leader.errors import LeaderError
from leader.precompute.cache import TeacherCache
from leader.train.config import load_config
from leader.train.loop import train
from leader.train.metrics import read_metrics
from tests.conftest import one_thread, sigterm_when

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
SHORT = ["phases.0.steps=6", "phases.1.steps=6", "run.log_every=1", "run.checkpoint_every=3", "data.batch_size=4"]


@pytest.fixture(autouse=True)
def single_threaded():
    with one_thread():
        yield


def config(shards, cache, *overrides):
    return load_config(DEMO, list(overrides), shards=[str(shards)], caches=[str(cache)])


def without_tensorflow(tmp: Path) -> dict:
    """Environment for a subprocess in which `import tensorflow` fails."""
    blocker = tmp / "no_tensorflow"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['tensorflow'] = None\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)]), "LEADER_PROGRESS": "0",
            "OMP_NUM_THREADS": "1"}


def losses(run: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run) if key in r}


# ---------------------------------------------------------------------------------------------
# The done-when tests


@pytest.fixture(scope="module")
def demo_run(phantom_shards, train_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    with one_thread():
        summary = train(config(phantom_shards, train_cache), out)
    assert summary == {"stopped": False, "segment": 2, "step_in_segment": 0, "global_step": 200,
                       "samples": 200 * 16, "finished": True}
    return out


def test_demo_config_lowers_both_losses(demo_run):
    rows = read_metrics(demo_run)
    disease = [r["loss/disease/image"] for r in rows if r["phase"] == "images"]
    anatomy = [r["loss/anatomy/image"] + r["loss/anatomy/patch"] for r in rows if r["phase"] == "pairs"]
    # Five logged steps at each end of each phase: the branch's loss at least halves.
    assert np.mean(disease[-5:]) < 0.5 * np.mean(disease[:5])
    assert np.mean(anatomy[-5:]) < 0.5 * np.mean(anatomy[:5])
    assert {"config.yaml", "checkpoint.pt", "metrics.jsonl", "train.log", "tensorboard"} <= {p.name for p in demo_run.iterdir()}
    assert rows[-1]["samples_per_s"] > 0


def test_export_loads_with_timm(demo_run, phantom_shards, tmp_path):
    from typer.testing import CliRunner

    from leader.train.commands import app
    from leader.train.embed import embed_items, load_student

    result = CliRunner().invoke(app, ["export", str(demo_run), "--out", str(tmp_path / "export")])
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    model = timm.create_model(cfg["architecture"], pretrained=True, num_classes=0, **cfg["model_args"],
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "export" / "model.safetensors"))).eval()
    from_folder = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    student, _, _ = load_student(demo_run)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), student.backbone(x))
        torch.testing.assert_close(from_folder(x), student.backbone(x))
    # The same weights give embed_items' backbone features.
    rows = [0, 1]
    ours = embed_items(demo_run, phantom_shards, rows=rows)["backbone"]
    assert ours.shape == (2, cfg["num_features"])
    heads = json.loads((tmp_path / "export" / "heads.json").read_text())
    assert heads["teachers"] == {"disease": 96, "anatomy": 64}


def test_embed_writes_every_item_and_matches_the_student(demo_run, phantom_shards, tmp_path):
    from typer.testing import CliRunner

    from leader.shards.manifest import Manifest
    from leader.shards.layout import iter_samples
    from leader.train.commands import app
    from leader.train.embed import embed_items, load_student
    from leader.views import replay_views

    out = tmp_path / "emb.npz"
    result = CliRunner().invoke(app, ["embed", "--checkpoint", str(demo_run), "--shards", str(phantom_shards),
                                      "--out", str(out), "--batch-size", "32"])
    assert result.exit_code == 0, result.output
    saved = np.load(out)
    n = Manifest.load(phantom_shards).n_items
    assert saved["backbone"].shape[0] == saved["disease"].shape[0] == saved["anatomy"].shape[0] == n
    assert (saved["disease"].shape[1], saved["anatomy"].shape[1]) == (96, 64)
    assert saved["keys"][1].endswith("#p0") and np.isfinite(saved["backbone"]).all()

    # Rows in any order come back aligned with the request; an image row equals a direct forward.
    first = next(iter(iter_samples(phantom_shards)))
    picked = embed_items(demo_run, phantom_shards, rows=[2, 0], heads=("backbone", "disease"))
    np.testing.assert_allclose(picked["disease"], saved["disease"][[2, 0]], atol=1e-5)
    student, student_input, _ = load_student(demo_run)
    img = torch.from_numpy(first.image())[None, None]
    pixels = replay_views(img, np.array([[0, 0, 0, 1, 0, 0, 0, 0, 1, 1]], np.float32), 64)
    with torch.no_grad():
        direct = student.backbone(student_input.normalise(pixels)).numpy()
    np.testing.assert_allclose(picked["backbone"][1], direct[0], atol=1e-5)


def test_killed_and_resumed_run_follows_the_uninterrupted_curve(phantom_shards, train_cache, tmp_path):
    reference = tmp_path / "reference"
    train(config(phantom_shards, train_cache, *SHORT), reference)

    # The killed run is its own process, with TensorFlow unimportable: the trainer never needs it.
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "leader.train", "train", "--config", str(DEMO), "--out", str(killed),
           "--shards", str(phantom_shards), "--cache", str(train_cache), *sum((["--set", s] for s in SHORT), [])]
    proc = subprocess.Popen(cmd, env=without_tensorflow(tmp_path), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while max(losses(killed), default=0) < 4:       # step 3's checkpoint is on disk once step 4 is logged
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["state"]["global_step"] == 3

    train(config(phantom_shards, train_cache, *SHORT), killed, resume=True)
    expected, got = losses(reference), losses(killed)
    assert sorted(got) == list(range(1, 13))
    assert [got[s] for s in sorted(got)] == [expected[s] for s in sorted(got)]      # bit for bit


def test_sigterm_checkpoints_and_resume_completes_the_same_run(phantom_shards, train_cache, tmp_path):
    overrides = (*SHORT, "phases.1.steps=2", "optim.ema_decay=0.9")     # the weight average resumes too
    reference = tmp_path / "reference"
    train(config(phantom_shards, train_cache, *overrides), reference)

    stopped = tmp_path / "stopped"
    with sigterm_when(lambda: bool(losses(stopped))):            # after the first logged step
        summary = train(config(phantom_shards, train_cache, *overrides), stopped)
    assert summary["stopped"] and 1 <= summary["global_step"] < 8
    assert torch.load(stopped / "checkpoint.pt", weights_only=True)["state"]["global_step"] == summary["global_step"]

    train(config(phantom_shards, train_cache, *overrides), stopped, resume=True)
    assert losses(stopped) == losses(reference)
    averages = [torch.load(run / "checkpoint.pt", weights_only=True)["weight_average"] for run in (stopped, reference)]
    assert averages[0]["updates"] == averages[1]["updates"] == 8
    for name, value in averages[1]["weights"].items():
        assert torch.equal(averages[0]["weights"][name], value), name


def test_a_weight_average_is_what_the_run_hands_out(phantom_shards, train_cache, tmp_path):
    from leader.train.averaging import WeightAverage
    from leader.train.embed import load_student
    from leader.train.export import export_run

    run = tmp_path / "run"
    with one_thread():
        train(config(phantom_shards, train_cache, *SHORT, "optim.ema_decay=0.5"), run)
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    average, raw = checkpoint["weight_average"]["weights"], checkpoint["model"]
    name = next(k for k in raw if k.startswith("backbone.") and raw[k].is_floating_point() and raw[k].dim() == 4)
    assert not torch.equal(average[name], raw[name])
    student, _, _ = load_student(run)
    assert torch.equal(student.state_dict()[name], average[name])
    from safetensors.torch import load_file

    exported = next(p for p in export_run(run, tmp_path / "export") if p.name == "model.safetensors")
    assert torch.equal(load_file(exported)[name[len("backbone."):]], average[name])

    # One update: the first decay is 1/10, later ones approach the configured decay.
    model = torch.nn.Linear(2, 1)
    average = WeightAverage.start(model, decay=0.99)
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update(model)
    assert torch.allclose(average.weights["weight"], model.weight - 0.1)
    assert average.current_decay() == pytest.approx(2 / 11)
    with pytest.raises(LeaderError, match=r"optim.ema_decay must be 0 \(off\) or in \(0, 1\), got 1.0"):
        load_config(DEMO, ["optim.ema_decay=1"])


def test_compiled_student_trains_the_same_and_saves_plain_weights(phantom_shards, train_cache, tmp_path,
                                                                 monkeypatch):
    """run.compile (torch.compile of the student, the lever for a launch-bound GPU step): the same
    losses as eager, and a checkpoint without torch.compile's `_orig_mod.` key prefix."""
    short = [*SHORT, "phases.0.steps=3", "phases.1.steps=3"]
    with one_thread():
        train(config(phantom_shards, train_cache, *short), tmp_path / "eager")
        compiled_nets = []
        real_compile = torch.compile

        def spy(net, *args, **kwargs):
            compiled_nets.append(net)
            return real_compile(net, *args, **kwargs)

        monkeypatch.setattr(torch, "compile", spy)
        train(config(phantom_shards, train_cache, *short, "run.compile=true"), tmp_path / "compiled")
    assert len(compiled_nets) == 2                      # the student of each phase
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert list(compiled) == list(eager) == list(range(1, 7))
    np.testing.assert_allclose(list(compiled.values()), list(eager.values()), rtol=1e-3)
    checkpoint = torch.load(tmp_path / "compiled" / "checkpoint.pt", weights_only=True)
    assert checkpoint["model"] and not any("_orig_mod" in k for k in checkpoint["model"])


def test_ddp_two_gloo_ranks_with_uneven_shards(phantom_shards, train_cache, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "leader.train", "train", "--config", str(DEMO), "--out", str(out),
           "--shards", str(phantom_shards), "--cache", str(train_cache),
           "--set", "phases.0.steps=3", "--set", "phases.1.steps=3", "--set", "run.log_every=1"]
    result = subprocess.run(cmd, env={**without_tensorflow(tmp_path), "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["state"]["finished"] and state["state"]["samples"] == 6 * 16 * 2
    assert len(state["rng"]) == 2            # one random state per rank


def test_cache_of_other_shards_is_refused(phantom_shards, train_cache, tmp_path):
    from tests.conftest import build_phantom

    other = tmp_path / "other"
    build_phantom(other, n=8, shard_size=8)
    with pytest.raises(LeaderError, match=r"teacher cache .*cache.zarr does not match the shards at .*other: "):
        train(config(other, train_cache), tmp_path / "run")


def test_missing_teacher_and_unfinished_teacher_are_refused(phantom_shards, train_cache, tmp_path):
    with pytest.raises(LeaderError, match="no cache holds teacher 'pathology'"):
        train(config(phantom_shards, train_cache, "phases.1.branches=[disease, pathology]"), tmp_path / "a")
    copy = tmp_path / "cache.zarr"
    shutil.copytree(train_cache, copy)
    cache = TeacherCache.open(copy, mode="r+")
    cache.ensure_teacher("partial", {"kind": "timm", "dim": 8, "fingerprint": "0" * 64, "preprocessing": {},
                                     "input_size": 32}, n_views=1)
    with pytest.raises(LeaderError, match="teacher 'partial' in cache .* is unfinished: 3 shard"):
        train(config(phantom_shards, copy, "phases.1.branches=[partial]"), tmp_path / "b")


# ---------------------------------------------------------------------------------------------
# The stream


def add_teacher(cache_path: Path, name: str, dim: int, views: int, invalid_rows=(), audit=None) -> None:
    """A finished teacher written through the cache's own API, with seeded embeddings.

    Rows in invalid_rows are what an import teacher leaves for items it has no file for: NaN, not valid.
    """
    cache = TeacherCache.open(cache_path, mode="r+")
    cache.ensure_teacher(name, {"kind": "cxr-foundation-import", "dim": dim, "fingerprint": name * 8,
                                "preprocessing": {}, "input_size": None}, n_views=views, replace_mismatched=True)
    emb = np.random.default_rng(0).normal(size=(cache.n_items, views, dim)).astype(np.float32)
    valid = np.ones(cache.n_items, dtype=bool)
    valid[list(invalid_rows)] = False
    emb[~valid] = np.nan
    for shard, (a, b) in enumerate(cache.shard_rows):
        cache.write_block(name, a, emb[a:b], valid[a:b])
        cache.mark_done(name, shard)
    train_images = (cache.read_kind(0, cache.n_items) == 0) & (cache.read_split(0, cache.n_items) == 0) & valid
    cache.write_stats(name, emb[train_images, 0].mean(0), emb[train_images, 0].std(0), {"n": int(train_images.sum())})
    if audit is not None:
        cache.update_teacher_attrs(name, {"audit": {"consistent_families": audit}})


def stream(shards, cache, *overrides, phase=0, world_size=1):
    from leader.train.loader import StreamSpec
    from leader.train.sources import open_sources

    cfg = config(shards, cache, *overrides)
    sources = open_sources(cfg.data.shards, cfg.data.caches, cfg.teachers())
    return StreamSpec.for_phase(sources, cfg.phases[phase], cfg, world_size)


def test_each_rank_streams_as_many_batches_of_the_cached_targets(phantom_shards, train_cache):
    from leader.train.loader import PhaseEpoch, assign_shards, chosen_views

    spec = stream(phantom_shards, train_cache, "data.batch_size=3", phase=1, world_size=2)
    shares = [sum(s.n_tuples for s in shards) for shards in assign_shards(spec, epoch=0)]
    assert len(spec.shards) == 3 and shares[0] != shares[1]           # uneven: 3 shards on 2 ranks
    per_rank = [list(PhaseEpoch(spec, epoch=0, rank=r, world_size=2)) for r in (0, 1)]
    # 25 pairs in train: 13 diseased patches and as many healthy ones, less a shortfall of 1.
    assert len(per_rank[0]) == len(per_rank[1]) == spec.batches_per_epoch == 25 // (2 * 3)

    cache = TeacherCache.open(train_cache)
    row_of = {k: i for i, k in enumerate(cache.read_keys(0, cache.n_items))}
    for batch in per_rank[0] + per_rank[1]:
        assert batch["image"].shape == (3, 1, 64, 64) and batch["image"].dtype == torch.uint8
        for i, (key, patch_key) in enumerate(zip(batch["keys"], batch["patch_keys"])):
            for prefix, item in (("", key), ("patch_", patch_key)):
                r = row_of[item]
                v = chosen_views(spec.seed, 0, [item], spec.n_views)[0]
                np.testing.assert_array_equal(batch[f"{prefix}params"][i] if prefix else batch["image_params"][i],
                                              cache.read_params(r, r + 1)[0, v])
                for t in ("disease", "anatomy"):
                    np.testing.assert_array_equal(batch[f"{prefix}targets"][t][i], cache.read_block(t, r, r + 1)[0, v])


def test_a_resumed_epoch_streams_the_remaining_batches_with_workers(phantom_shards, train_cache):
    from torch.utils.data import DataLoader

    from leader.train.loader import PhaseEpoch

    spec = stream(phantom_shards, train_cache, "data.batch_size=2", "data.num_workers=2", phase=1)

    def keys(start):
        loader = DataLoader(PhaseEpoch(spec, 1, 0, 1, start_batch=start), batch_size=None, num_workers=2)
        return [b["patch_keys"] for b in loader]

    full = keys(0)
    assert len(full) == spec.batches_per_epoch == 25 // 2
    assert keys(3) == full[3:]


def test_a_view0_only_teacher_allows_only_audited_online_augmentation(phantom_shards, train_cache, tmp_path, caplog):
    from leader.train.loader import PhaseEpoch
    from leader.views import IDENTITY, PARAM_NAMES

    copy = tmp_path / "cache.zarr"
    shutil.copytree(train_cache, copy)
    add_teacher(copy, "imported", dim=8, views=1, audit=["hflip", "brightness"])
    add_teacher(copy, "unaudited", dim=8, views=1)
    spec = stream(phantom_shards, copy, "phases.0.branches=[imported]")
    assert spec.n_views == 1 and spec.online_families == ("brightness", "hflip")
    assert "only view 0" in caplog.text
    params = np.concatenate([b["image_params"].numpy() for b in PhaseEpoch(spec, 0, 0, 1)])
    varied = {PARAM_NAMES[i] for i in np.flatnonzero((params != IDENTITY).any(axis=0))}
    assert varied <= {"hflip", "brightness"} and "brightness" in varied

    # Every teacher of the phase must be invariant: the augmented view changes every teacher's input.
    assert stream(phantom_shards, copy, "phases.0.branches=[imported, unaudited]").online_families == ()
    assert stream(phantom_shards, copy, "phases.0.branches=[disease, imported]").online_families == ()
    assert stream(phantom_shards, copy, "phases.0.branches=[imported]", "data.online_augment=false").online_families == ()


def test_rows_without_a_target_are_masked_out_of_the_loss(phantom_shards, train_cache, tmp_path):
    from leader.train.step import masked_mse

    pred = torch.zeros(3, 2)
    target = torch.tensor([[1.0, 1.0], [float("nan"), float("nan")], [3.0, 3.0]])
    assert masked_mse(pred, target, torch.tensor([True, False, True])).item() == pytest.approx((1 + 9) / 2)
    assert masked_mse(pred, target, torch.zeros(3, dtype=torch.bool)).item() == 0

    copy = tmp_path / "cache.zarr"
    shutil.copytree(train_cache, copy)
    add_teacher(copy, "imported", dim=8, views=1, invalid_rows=range(0, 40))
    train(config(phantom_shards, copy, *SHORT, "phases.1.branches=[disease, imported]", "target_norm=standardize"),
          tmp_path / "run")
    assert all(np.isfinite(r["loss"]) for r in read_metrics(tmp_path / "run"))


# ---------------------------------------------------------------------------------------------
# Config and resume rules


def test_config_overrides_are_checked_by_name():
    cfg = load_config(DEMO, ["optim.lr=0.5", "phases.1.steps=7", "model.kwargs.drop_rate=0.1"])
    assert (cfg.optim.lr, cfg.phases[1].steps, cfg.model.kwargs["drop_rate"]) == (0.5, 7, 0.1)
    assert cfg.teachers() == ["disease", "anatomy"]
    with pytest.raises(LeaderError, match="--set optim.lrr: unknown key 'lrr'"):
        load_config(DEMO, ["optim.lrr=1"])
    with pytest.raises(LeaderError, match="phases has no item '5'"):
        load_config(DEMO, ["phases.5.steps=1"])
    with pytest.raises(LeaderError, match=r"phases.0 \(images\): give exactly one of epochs and steps"):
        load_config(DEMO, ["phases.0.epochs=2"])


def test_config_values_take_their_fields_types():
    # YAML 1.1 reads 5e-4 (no dot) as a string; before this check it reached AdamW as "5e-4".
    cfg = load_config(DEMO, ["optim.lr=5e-4", "phases.1.lr=1e-4", "phases.0.steps=2e3", "optim.grad_clip=1"])
    assert (cfg.optim.lr, cfg.phases[1].lr, cfg.phases[0].steps) == (5e-4, 1e-4, 2000)
    assert isinstance(cfg.optim.grad_clip, float) and cfg.phases[0].lr is None
    with pytest.raises(LeaderError, match=r"optim: lr: expected a number, got 'fast'"):
        load_config(DEMO, ["optim.lr=fast"])
    with pytest.raises(LeaderError, match=r"data: batch_size: expected a whole number, got 12.5"):
        load_config(DEMO, ["data.batch_size=12.5"])
    with pytest.raises(LeaderError, match=r"run: compile: expected true or false, got 'sometimes'"):
        load_config(DEMO, ["run.compile=sometimes"])


def test_resume_refuses_a_changed_model_and_other_teacher_dims(demo_run, phantom_shards, train_cache, tmp_path):
    with pytest.raises(LeaderError, match=r"config key model.head_hidden changed \(128 -> 64\): it alters the model"):
        train(config(phantom_shards, train_cache, "model.head_hidden=64"), demo_run, resume=True)
    with pytest.raises(LeaderError, match="already holds a run; pass --resume"):
        train(config(phantom_shards, train_cache), demo_run)

    copy = tmp_path / "cache.zarr"
    shutil.copytree(train_cache, copy)
    add_teacher(copy, "anatomy", dim=32, views=2)
    with pytest.raises(LeaderError, match=r"teacher dimensions .*'anatomy': 32.* differ from the run's heads"):
        train(config(phantom_shards, copy), demo_run, resume=True)


def test_decoded_pixels_keep_their_precision_and_views_span_non_square_images():
    from leader.train.loader import collate, place_on_canvas
    from leader.shards.crop import crop_patch
    from leader.train.step import render_images, render_patches
    from leader.views import IDENTITY, ViewSpec, replay_views, sample_view_params

    # A 16-bit and an 8-bit image in one batch: uint16, with 8-bit values scaled exactly (255 -> 65535).
    wide = (np.linspace(0, 65535, 48 * 64).reshape(48, 64)).astype(np.uint16)
    small = np.full((40, 40), 255, np.uint8)
    tuples = []
    for key, img in (("a", wide), ("b", small)):
        pixels, hw = place_on_canvas(img, 64, key)
        tuples.append({"key": key, "image": pixels, "image_hw": hw, "image_params": IDENTITY,
                       "targets": {"t": np.zeros(2, np.float16)}, "valid": {"t": True}})
    batch = collate(tuples)
    assert batch["image"].dtype == torch.uint16 and batch["image_hw"].tolist() == [[48, 64], [40, 40]]
    assert batch["image"][1, 0, :40, :40].to(torch.int32).eq(65535).all() and batch["image"][1, 0, 40:].to(torch.int32).eq(0).all()

    # The zero padding never shows: a padded image renders as replay_views renders the bare image.
    view = sample_view_params(ViewSpec(), 0, ["a"], 2)[:, 1]
    rendered = render_images(batch["image"], batch["image_hw"], np.concatenate([view, IDENTITY[None]]), 32)
    np.testing.assert_allclose(rendered[0, 0], replay_views(torch.from_numpy(wide)[None, None], view, 32)[0, 0],
                               atol=1e-5)
    np.testing.assert_allclose(rendered[1], 1.0, atol=1e-6)
    box = np.array([[30.0, 30.0, 62.0, 62.0]])                       # past the bottom edge of the 48-row image
    patch = render_patches(batch["image"][:1], batch["image_hw"][:1], box, view, 16, 32)
    bare = replay_views(crop_patch(torch.from_numpy(wide)[None, None], box, 16), view, 32)
    np.testing.assert_allclose(patch, bare, atol=1e-5)
    with pytest.raises(LeaderError, match="exceeds the stored size 32"):
        place_on_canvas(wide, 32, "a")
