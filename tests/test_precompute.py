"""The precompute loop with real teachers: what lands in the cache, resuming after SIGTERM and
kill -9, RANK/WORLD_SIZE, import teachers' missing items, the audit, and `cache verify`.

The anatomy teacher is an Adam-v2 checkpoint (ResNet-18 at 32 px, to stay fast); one test runs a
tiny SavedModel with CXR Foundation's serving signature.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch  # before tensorflow, always
import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from leader.errors import LeaderError
from leader.io import sha256_file
from leader.precompute.audit import audit_invariance
from leader.precompute.cache import TeacherCache
from leader.precompute.commands import cache_app, precompute_app
from leader.precompute.run import CacheLayout, Execution, precompute, resolve_teacher
from leader.precompute.teachers import create_teacher
from leader.precompute.teachers.base import Teacher
from leader.shards.crop import crop_patch
from leader.shards.manifest import Manifest
from leader.shards.layout import KIND_CODES, SPLIT_CODES, iter_samples, iter_shard_metas
from leader.views import ViewSpec, replay_views
from tests.conftest import one_thread
from tests.teacher_fixtures import make_adam_v2_resnet_checkpoint, make_import_npy_dir, random_embeddings
from tests.test_cache import build_tiny_shards

REPO = Path(__file__).resolve().parents[1]
ADAM_OPTIONS = {"arch": "resnet18", "input_size": 32}
LAYOUT = CacheLayout(views=2, patch_size=48)


def run_adam(shards, path, model, execution=Execution(batch_size=4), **options):
    """`leader precompute --teacher anatomy --model MODEL --views 2 --patch-size 48 --batch-size 4`."""
    with create_teacher("adam", model=model, **ADAM_OPTIONS) as teacher:
        return precompute(shards, "anatomy", teacher, path, LAYOUT, execution, **options)

# A precompute in its own process, as `leader precompute` runs it; a delay per teacher call slows
# it down enough for a test to interrupt it in the middle of a shard.
DRIVER = """
import sys, time
import torch
from leader.precompute.run import CacheLayout, Execution, precompute
from leader.precompute.teachers import create_teacher

shards, cache, model, delay, workers = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
teacher = create_teacher("adam", model=model, arch="resnet18", input_size=32)
embed = teacher.embed
def slow_embed(pixels, bits=8):
    time.sleep(delay)
    return embed(pixels, bits=bits)
teacher.embed = slow_embed
result = precompute(shards, "anatomy", teacher, cache, CacheLayout(views=2, patch_size=48),
                    Execution(batch_size=4, workers=workers))
print("interrupted" if result.interrupted else "finished", result.shards_computed, flush=True)
"""


def start_driver(shards, cache, model, delay=0.0, workers=0, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(shards), str(cache), str(model), str(delay), str(workers)],
                            cwd=REPO, env={**os.environ, "LEADER_PROGRESS": "0", "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def done_flags(cache_path: Path, name="anatomy") -> list[bool]:
    """Read by another process while a run writes them (each chunk is replaced atomically)."""
    return zarr.open_array(str(cache_path / "teachers" / name / "done"), mode="r")[:].tolist()


def assert_same_store(a: Path, b: Path) -> None:
    """Every array of two caches is equal (NaN where NaN), and so are the teacher attributes."""
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    arrays = ["items/key", "items/kind", "items/split", "views/params"]
    teachers = sorted(ga["teachers"].group_keys())
    assert teachers == sorted(gb["teachers"].group_keys())
    for t in teachers:
        arrays += [f"teachers/{t}/{x}" for x in ("emb", "valid", "done", "stats")]
        volatile = ("created", "completed")
        assert {k: v for k, v in ga[f"teachers/{t}"].attrs.items() if k not in volatile} == \
            {k: v for k, v in gb[f"teachers/{t}"].attrs.items() if k not in volatile}
    for name in arrays:
        np.testing.assert_array_equal(ga[name][...], gb[name][...], err_msg=name)


@pytest.fixture(scope="module", autouse=True)
def single_threaded():
    """Tiny models run fastest on one thread; on CI's two shared cores more threads only contend."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "shards"
    build_tiny_shards(out)
    return out


@pytest.fixture(scope="module")
def adam(tmp_path_factory):
    return make_adam_v2_resnet_checkpoint(tmp_path_factory.mktemp("adam") / "adam_v2.pth")


@pytest.fixture(scope="module")
def reference(shards, adam, tmp_path_factory):
    """The uninterrupted single-process run every other run must reproduce: no worker process, no
    decode thread."""
    path = tmp_path_factory.mktemp("reference") / "cache.zarr"
    result = run_adam(shards, path, adam, Execution(batch_size=4, workers=0, decode_threads=0))
    assert result.complete and result.shards_computed == [0, 1, 2]
    return path


def test_each_row_holds_the_teachers_embedding_of_its_view(shards, adam, reference):
    cache = TeacherCache.open(reference)
    n = cache.n_items
    assert cache.teachers == ["anatomy"] and cache.is_done("anatomy").all()
    assert cache.read_valid("anatomy", 0, n).all()
    emb = cache.read_block("anatomy", 0, n)
    assert emb.shape == (n, 2, 512) and emb.dtype == np.float16 and np.isfinite(emb).all()
    attrs = cache.teacher_attrs("anatomy")
    assert attrs["kind"] == "adam" and attrs["dim"] == 512 and attrs["input_size"] == 32

    # Recompute two rows by hand: view 1 of the 16-bit image, and view 1 of one of its patches.
    teacher = create_teacher("adam", model=adam, **ADAM_OPTIONS)
    assert attrs["fingerprint"] == teacher.fingerprint
    sample = next(s for s in iter_samples(shards) if s.meta["bits"] == 16)
    row = sample.meta["rows"][0]
    params = cache.read_params(row, row + 2)
    image = sample.image().copy()        # decoded PNGs are read-only; torch wants writable arrays
    expected_image = teacher.embed(replay_views(image[None, None], params[0, 1:2], 32), bits=16)
    patch = crop_patch(image, sample.meta["patches"][0]["box"], 48)
    expected_patch = teacher.embed(replay_views(patch[None, None], params[1, 1:2], 32), bits=16)
    np.testing.assert_allclose(emb[row, 1].astype(np.float32), expected_image[0], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(emb[row + 1, 1].astype(np.float32), expected_patch[0], rtol=2e-3, atol=2e-3)
    assert not np.allclose(emb[row, 0], emb[row, 1], atol=1e-2)      # the views really differ

    # Standardisation statistics: train images, view 0.
    keep = (cache.read_kind(0, n) == KIND_CODES["image"]) & (cache.read_split(0, n) == SPLIT_CODES["train"])
    x = emb[keep, 0].astype(np.float64)
    mean, std = cache.stats("anatomy")
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, x.std(axis=0), rtol=1e-4, atol=1e-6)
    assert attrs["stats"] == {"over": "train images, view 0", "n": int(keep.sum())}

    again = run_adam(shards, reference, adam)
    assert again.shards_computed == [] and again.shards_skipped == [0, 1, 2] and again.complete


def test_sigterm_and_kill_9_then_resume_give_the_uninterrupted_store(shards, adam, reference, tmp_path):
    path = tmp_path / "cache.zarr"

    # SIGTERM arrives during the first teacher call of shard 0: the run finishes that shard, then stops.
    teacher = create_teacher("adam", model=adam, **ADAM_OPTIONS)
    embed = teacher.embed

    def embed_then_sigterm(pixels, bits=8):
        os.kill(os.getpid(), signal.SIGTERM)
        return embed(pixels, bits=bits)

    teacher.embed = embed_then_sigterm
    handler_before = signal.getsignal(signal.SIGTERM)
    stopped = precompute(shards, "anatomy", teacher, path, LAYOUT, Execution(batch_size=4))
    assert stopped.interrupted and stopped.shards_computed == [0] and not stopped.complete
    assert done_flags(path) == [True, False, False]
    assert signal.getsignal(signal.SIGTERM) == handler_before        # the handler is removed again

    # kill -9 as soon as shard 1 is done, while shard 2 is being computed, by a run with a worker
    # process: the worker may outlive it by seconds, but must not keep its writer lock.
    run = start_driver(shards, path, adam, delay=0.1, workers=1)
    wait_for(lambda: done_flags(path)[1], what="shard 1")
    run.kill()
    run.wait(timeout=30)
    assert done_flags(path) == [True, True, False]

    result = run_adam(shards, path, adam)
    assert result.shards_skipped == [0, 1] and result.shards_computed == [2] and result.complete
    assert_same_store(path, reference)


def test_two_ranks_write_the_same_store_as_one_process(shards, adam, reference, tmp_path):
    """Rank 1 runs in its own process (RANK/WORLD_SIZE from the environment, as torchrun sets them),
    rank 0 in this one, at the same time, into one store."""
    path = tmp_path / "cache.zarr"
    rank1 = start_driver(shards, path, adam, delay=0.05, RANK="1", WORLD_SIZE="2")
    wait_for(lambda: (path / "teachers" / "anatomy" / "done" / "zarr.json").exists(), what="rank 1 to start")
    rank0 = run_adam(shards, path, adam, Execution(batch_size=4, rank=0, world_size=2))
    out, _ = rank1.communicate(timeout=120)
    assert rank1.returncode == 0, out
    assert rank0.shards_computed == [0, 2] and "finished [1]" in out
    assert_same_store(path, reference)


def test_a_group_renders_exactly_what_each_sample_renders_alone():
    from leader.precompute.run import render_group_views, render_sample_views
    from leader.views import sample_view_params

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (96, 96), dtype=np.uint8) for _ in range(3)]
    boxes = [[[10, 12, 50, 60], [40, 40, 90, 95]], [], [[0, 0, 30, 30]]]
    params = [sample_view_params(ViewSpec(), 0, [f"s{i}/{j}" for j in range(1 + len(b))], 3)
              for i, b in enumerate(boxes)]
    settings = dict(image_size=40, patch_size=48, patch_out=32)
    grouped = render_group_views(images, boxes, params, **settings)
    for image, b, p, together in zip(images, boxes, params, grouped):
        alone = render_sample_views(image, b, p, **settings)
        assert len(alone) == len(together) == 1 + len(b)
        for x, y in zip(alone, together):
            assert x.shape == (3, 1, x.shape[-1], x.shape[-1])
            assert torch.equal(x, y)


def test_worker_processes_and_decode_threads_give_the_same_store_and_name_a_damaged_image(shards, adam, reference,
                                                                                          tmp_path):
    """Reading, decoding and rendering in 1 or 2 worker processes, or in this one with 0 or 3 threads
    decoding ahead, lands the same bytes in the store (the reference ran with the default workers)."""
    for workers, threads, render_on_workers in ((0, 0, None), (0, 3, None), (1, None, None), (2, None, None),
                                                (2, None, False)):       # False: rendered here, as on a GPU
        path = tmp_path / f"workers-{workers}-threads-{threads}-{render_on_workers}.zarr"
        result = run_adam(shards, path, adam, Execution(batch_size=4, workers=workers, decode_threads=threads,
                                                        render_on_workers=render_on_workers))
        assert result.complete and result.shards_computed == [0, 1, 2]
        assert_same_store(path, reference)
    with pytest.raises(LeaderError, match="--decode-threads must be 0 or more"):
        Execution(decode_threads=-1)
    with pytest.raises(LeaderError, match="precompute workers must be 0 or more"):
        Execution(workers=-1)

    # A shard whose third image is cut short, as its build wrote it (the manifest records these very
    # bytes, so the shard passes its sha256 check): the thread's failure reaches the loop as one clear line.
    import tarfile

    damaged = tmp_path / "damaged"
    shutil.copytree(shards, damaged)
    first = damaged / Manifest.load(damaged).shards[0].name
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    pngs = [i for i, (m, _) in enumerate(members) if m.name.endswith(".png")]
    victim = pngs[min(2, len(pngs) - 1)]
    member, data = members[victim]
    members[victim] = (member, data[: len(data) // 2])
    with tarfile.open(first, "w") as tar:
        for m, d in members:
            m.size = len(d)
            tar.addfile(m, io.BytesIO(d))
    manifest = json.loads((damaged / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = sha256_file(first)
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    for workers in (0, 2):          # a decode thread's failure, or a worker process's, is the same one line
        with pytest.raises(LeaderError, match=rf"sample '{member.name.split('.')[0]}': its stored image does not decode"):
            run_adam(damaged, tmp_path / f"damaged-{workers}.zarr", adam,
                     Execution(batch_size=4, workers=workers, decode_threads=2))


def test_other_weights_are_refused_verified_and_replaced(shards, adam, reference, tmp_path):
    path = tmp_path / "cache.zarr"
    shutil.copytree(reference, path)
    other = make_adam_v2_resnet_checkpoint(tmp_path / "other.pth", seed=1)
    with pytest.raises(LeaderError, match=r"teacher 'anatomy' in cache .* weights sha256 .*--overwrite-teacher"):
        run_adam(shards, path, other)

    runner = CliRunner()
    args = ["verify", str(path), "--shards", str(shards), "--teacher", "anatomy",
            "--option", "arch=resnet18", "--option", "input_size=32"]
    assert runner.invoke(cache_app, args + ["--model", str(adam)]).exit_code == 0
    mismatch = runner.invoke(cache_app, args + ["--model", str(other)])
    assert mismatch.exit_code == 1
    assert "teacher 'anatomy' was computed with weights sha256" in mismatch.output

    result = run_adam(shards, path, other, overwrite_teacher=True)
    assert result.shards_computed == [0, 1, 2]
    assert TeacherCache.open(path).teacher_attrs("anatomy")["fingerprint"] != \
        TeacherCache.open(reference).teacher_attrs("anatomy")["fingerprint"]


def test_import_teacher_counts_and_reports_missing_items(shards, tmp_path):
    metas = [m for s in Manifest.load(shards).shards for m in iter_shard_metas(shards / s.name)]
    ids = [m["image_id"] for m in metas]
    absent = {ids[4], ids[17]}
    vectors = random_embeddings([Path(i).stem for i in ids if i not in absent], dim=8)
    folder = make_import_npy_dir(tmp_path / "cxr-fm-v1", vectors)
    path = tmp_path / "cache.zarr"

    out = CliRunner().invoke(precompute_app, ["--teacher", "disease", "--kind", "cxr-foundation-import",
                                              "--model", str(folder), "--shards", str(shards), "--cache", str(path)])
    assert out.exit_code == 0, out.output
    n = sum(1 + len(m["patches"]) for m in metas)
    n_patches = n - len(metas)
    line = f"disease: {n_patches + 2} of {n} items have no imported embedding: {n_patches} patches"
    assert line in out.output and "and 2 images" in out.output

    cache = TeacherCache.open(path)
    assert cache.emb_shape("disease") == (n, 1, 8)          # view 0 only
    valid = cache.read_valid("disease", 0, n)
    emb = cache.read_block("disease", 0, n)
    for m in metas:
        row = m["rows"][0]
        assert valid[row] == (m["image_id"] not in absent)
        if valid[row]:
            np.testing.assert_allclose(emb[row, 0], vectors[Path(m["image_id"]).stem], rtol=1e-3, atol=1e-3)
        assert not valid[row + 1:m["rows"][1]].any() and np.isnan(emb[row + 1:m["rows"][1]]).all()
    missing = cache.teacher_attrs("disease")["missing"]
    assert (missing["items"], missing["images"], missing["patches"]) == (n_patches + 2, 2, n_patches)
    assert sorted(missing["examples"]) == sorted(m["key"] for m in metas if m["image_id"] in absent)
    assert missing["summary"].startswith(line)
    assert cache.stats("disease") is not None


class NaNTeacher(Teacher):
    """A teacher whose network has gone bad: every embedding is NaN."""

    kind = "nan"
    dim = 3
    input_size = 16
    fingerprint = "0" * 64
    preprocessing = {}

    def _embed(self, pixels, bits):
        return np.full((pixels.shape[0], self.dim), np.nan, np.float32)


def test_nan_embeddings_stop_the_run_naming_item_and_view(shards, tmp_path):
    first_key = next(iter(Manifest.load(shards).iter_keys()))[0]
    with pytest.raises(LeaderError, match=rf"non-finite .*teacher 'broken', item '{first_key}', view 0"):
        precompute(shards, "broken", NaNTeacher(), tmp_path / "cache.zarr", LAYOUT, Execution(batch_size=4))
    assert not TeacherCache.open(tmp_path / "cache.zarr").is_done("broken").any()


def test_audit_measures_each_family_and_stores_the_result(shards, adam, reference, tmp_path):
    path = tmp_path / "cache.zarr"
    shutil.copytree(reference, path)
    out = CliRunner().invoke(precompute_app, [
        "audit", "--teacher", "anatomy", "--kind", "adam", "--model", str(adam), "--option", "arch=resnet18",
        "--option", "input_size=32", "--shards", str(shards), "--cache", str(path),
        "--n-items", "3", "--views", "3", "--threshold", "0.95", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output[out.output.index("{"):])
    families = result["families"]
    assert {"rotation", "translation", "scale", "shear", "hflip", "brightness", "contrast", "gamma",
            "affine", "photometric"} == set(families)
    for name, r in families.items():
        if r["consistent"] is not None:
            assert -1 <= r["min_cosine"] <= r["mean_cosine"] <= 1 and r["n_views"] >= 1
            assert r["consistent"] == (r["mean_cosine"] >= 0.95)
    assert result["consistent_families"] == [f for f, r in families.items() if r["consistent"]]
    assert TeacherCache.open(path).teacher_attrs("anatomy")["audit"]["families"] == families

    # A family the view spec never moves is reported as not exercised, not as consistent.
    teacher = create_teacher("adam", model=adam, **ADAM_OPTIONS)
    quiet = audit_invariance(shards, teacher, n_items=2, n_views=3, view_spec=ViewSpec(hflip_p=0.0),
                             families=["hflip", "rotation"])
    assert quiet["families"]["hflip"] == {"mean_cosine": None, "min_cosine": None, "n_views": 0, "consistent": None}
    assert quiet["families"]["rotation"]["n_views"] == 4 and "hflip" not in quiet["consistent_families"]


def test_cxr_foundation_savedmodel_precompute(shards, tmp_path):
    from tests.teacher_fixtures import make_cxr_foundation_savedmodel

    model = make_cxr_foundation_savedmodel(tmp_path / "elixr-c", dim=16, input_size=32)
    path = tmp_path / "cache.zarr"
    choice = resolve_teacher("disease", model=str(model))             # the role's default kind: cxr-foundation
    with create_teacher(choice.kind, model=choice.model) as teacher:
        result = precompute(shards, "disease", teacher, path, LAYOUT, Execution(batch_size=8))
    assert result.complete and result.kind == "cxr-foundation"
    cache = TeacherCache.open(path)
    # No client-side resize: images are replayed at their stored 64 px, patches at the patch size.
    sample = next(s for s in iter_samples(shards) if s.meta["bits"] == 16)
    row = sample.meta["rows"][0]
    with create_teacher("cxr-foundation", model=model) as teacher:
        expected = teacher.embed(replay_views(sample.image().copy()[None, None], cache.read_params(row, row + 1)[0, 1:2], 64), bits=16)
    np.testing.assert_allclose(cache.read_block("disease", row, row + 1)[0, 1].astype(np.float32), expected[0],
                               rtol=2e-3, atol=2e-3)


def test_teacher_choice_from_roles_config_and_flags(tmp_path):
    config = tmp_path / "teachers.yaml"
    config.write_text("teachers:\n  anatomy: {kind: timm, model: a.pth, options: {arch: resnet18, input_size: 64}}\n")
    choice = resolve_teacher("anatomy", model="b.pth", options={"input_size": 32}, config=config)
    assert (choice.kind, choice.model, choice.options) == ("timm", "b.pth", {"arch": "resnet18", "input_size": 32})
    assert resolve_teacher("disease").kind == "cxr-foundation" and resolve_teacher("anatomy").kind == "adam"
    with pytest.raises(LeaderError, match="teacher 'lungs' has no default kind"):
        resolve_teacher("lungs")
    config.write_text("teachers:\n  anatomy: {weights: a.pth}\n")
    with pytest.raises(LeaderError, match="teachers.anatomy must be a mapping with kind, model and options"):
        resolve_teacher("anatomy", config=config)


def test_view_ranges_are_chosen_on_the_command_line_and_shared_by_a_caches_teachers(shards, adam, tmp_path):
    path = tmp_path / "cache.zarr"
    args = ["--teacher", "anatomy", "--kind", "adam", "--model", str(adam), "--option", "arch=resnet18",
            "--option", "input_size=32", "--shards", str(shards), "--cache", str(path), "--views", "2",
            "--patch-size", "48", "--batch-size", "4"]
    out = CliRunner().invoke(precompute_app, args + ["--view", "brightness=0.2", "--view", "contrast=0.4"])
    assert out.exit_code == 0, out.output
    spec = TeacherCache.open(path).view_spec
    assert (spec.brightness, spec.contrast, spec.rotation_deg) == (0.2, 0.4, ViewSpec().rotation_deg)
    again = CliRunner().invoke(precompute_app, args + ["--view", "brightness=0.3"])
    assert again.exit_code != 0 and "made with another view spec" in str(again.exception)
