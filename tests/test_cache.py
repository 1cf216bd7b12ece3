"""The teacher cache store: layout, row order, idempotent creation, teacher arrays, locking, CLI.

Embeddings here are written straight through the store's API (no teacher), so these tests are fast;
tests/test_precompute.py runs real teachers into it.
"""
from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from leader.errors import LeaderError
from leader.precompute.cache import TeacherCache, chunk_rows_for, find_problems, store_lock
from leader.precompute.commands import cache_app
from leader.shards.builder import BuildSettings, build_shards
from leader.shards.layout import KIND_CODES, SPLIT_CODES, iter_shard_metas
from leader.shards.datasets import DATASETS, register_dataset
from leader.shards.manifest import Manifest
from leader.shards.records import Box, SourceRecord
from leader.views import IDENTITY, K, ViewSpec, sample_view_params


class TinyChest:
    """24 small synthetic radiographs: non-square originals, one 16-bit image (with a lesion), nodule
    boxes on every third image (diseased patches; two on one image, so shards differ in item count),
    normals (healthy patches, one per lesion of their split), and a landmark for val/test images."""

    name = "tiny-chest"
    label_names = ["nodule"]
    has_boxes = True
    has_landmarks = True
    overlap_note = None

    def records(self, root, rejects, *, seed, n):
        for i in range(n or 24):
            rng = np.random.default_rng([seed, i])
            yy, xx = np.mgrid[0:72, 0:80]
            img = (90 + 60 * np.sin(xx / (4 + i % 5)) * np.cos(yy / 6) + rng.normal(0, 12, yy.shape)).clip(0, 255)
            img = img.astype(np.uint16) * 257 if i == 6 else img.astype(np.uint8)
            sick = i % 3 == 0
            boxes = [Box("nodule", 8 + i, 10, 30 + i, 32)] if sick else []
            if i == 9:      # a second lesion, so that shards hold different item counts
                boxes.append(Box("nodule", 30, 36, 50, 56))
            yield SourceRecord(
                dataset=self.name, image_id=f"case{i:03d}.png", path="", load=lambda img=img: img,
                patient_id=f"P{i // 2:03d}", split=("train", "train", "val", "test")[i % 4],
                labels={"nodule": int(sick)}, boxes=boxes, healthy=not sick,
                landmarks={"carina": (40.0, 30.0)})


if TinyChest.name not in DATASETS:
    register_dataset(TinyChest.name)(TinyChest)


def build_tiny_shards(out, n: int = 24, shard_size: int = 8) -> Manifest:
    return build_shards(BuildSettings(dataset=TinyChest.name, size=64, shard_size=shard_size, seed=0, n=n), out)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "shards"
    build_tiny_shards(out)
    return out


@pytest.fixture(scope="module")
def manifest(shards):
    return Manifest.load(shards)


def expected_item_keys(manifest: Manifest) -> list[str]:
    keys = []
    for key, n in manifest.iter_keys():
        keys += [key] + [f"{key}#p{j}" for j in range(n - 1)]
    return keys


def fake_teacher(fingerprint: str = "a" * 64, dim: int = 6) -> dict:
    return {"kind": "fake", "dim": dim, "input_size": 32, "fingerprint": fingerprint,
            "preprocessing": {"mean": (0.5,), "resize": "bilinear"}}


def fill_teacher(cache: TeacherCache, name: str, shard: int, n_views: int = 2, dim: int = 6) -> np.ndarray:
    """Write row-numbered embeddings into one shard's block, as a precompute would, and flag it."""
    a, b = cache.shard_rows[shard]
    emb = np.arange(a, b)[:, None, None] + np.arange(n_views * dim).reshape(1, n_views, dim) / 100
    emb = emb.astype(np.float32)
    cache.write_block(name, a, emb, np.ones(b - a, bool))
    cache.mark_done(name, shard)
    return emb


def test_store_layout_rows_and_attrs(shards, manifest, tmp_path):
    spec = ViewSpec(rotation_deg=7.0)
    cache = TeacherCache.create_or_open(tmp_path / "cache.zarr", manifest, n_views=3, view_spec=spec, seed=5, patch_size=48)
    n = manifest.n_items
    root = zarr.open_group(str(tmp_path / "cache.zarr"), mode="r")
    assert root["items/key"].shape == (n,) and root["items/kind"].dtype == np.uint8
    assert root["items/split"].dtype == np.uint8
    assert root["views/params"].shape == (n, 3, K) and root["views/params"].dtype == np.float32

    # Rows are in manifest order: the image, then its patches, shard after shard.
    keys = cache.read_keys(0, n)
    assert keys == expected_item_keys(manifest)
    metas = [m for s in manifest.shards for m in iter_shard_metas(shards / s.name)]
    expected_kinds = np.concatenate([[0] + [KIND_CODES[p["kind"]] for p in m["patches"]] for m in metas])
    expected_splits = np.concatenate([[SPLIT_CODES[m["split"]]] * (1 + len(m["patches"])) for m in metas])
    np.testing.assert_array_equal(cache.read_kind(0, n), expected_kinds)
    np.testing.assert_array_equal(cache.read_split(0, n), expected_splits)
    assert set(np.unique(expected_kinds)) == {0, 1, 2, 3}      # the fixture has every kind of item

    # View parameters come from (seed, item key, view) alone, and view 0 is the identity.
    params = cache.read_params(0, n)
    np.testing.assert_array_equal(params, sample_view_params(spec, 5, keys, 3))
    np.testing.assert_array_equal(params[:, 0], np.broadcast_to(IDENTITY, (n, K)))

    a = root.attrs
    assert a["manifest_fingerprint"] == manifest.fingerprint()
    assert (a["n_items"], a["n_shards"], a["n_views"], a["seed"], a["patch_size"]) == (n, 3, 3, 5, 48)
    assert a["view_spec"] == spec.to_dict() and a["leader_version"] and a["complete"] is True
    assert cache.view_spec == spec and cache.shard_rows == [tuple(s.rows) for s in manifest.shards]
    assert cache.teachers == []
    cache.check_against(manifest)


def test_create_or_open_is_idempotent_and_names_mismatches(shards, manifest, tmp_path):
    path = tmp_path / "cache.zarr"
    first = TeacherCache.create_or_open(path, manifest, n_views=2, view_spec=ViewSpec(), seed=0)
    first.ensure_teacher("anatomy", fake_teacher(), n_views=2)
    fill_teacher(first, "anatomy", 1)
    again = TeacherCache.create_or_open(path, manifest, n_views=2, view_spec=ViewSpec(), seed=0)
    assert again.is_done("anatomy").tolist() == [False, True, False]      # nothing was recreated
    TeacherCache.create_or_open(path, manifest, n_views=1, view_spec=ViewSpec(), seed=0)   # fewer views: fine

    with pytest.raises(LeaderError, match="seed"):
        TeacherCache.create_or_open(path, manifest, n_views=2, view_spec=ViewSpec(), seed=1)
    with pytest.raises(LeaderError, match="view spec"):
        TeacherCache.create_or_open(path, manifest, n_views=2, view_spec=ViewSpec(hflip_p=0.0), seed=0)
    with pytest.raises(LeaderError, match="holds 2 views per item"):
        TeacherCache.create_or_open(path, manifest, n_views=4, view_spec=ViewSpec(), seed=0)

    other = build_tiny_shards(tmp_path / "other", n=16)
    with pytest.raises(LeaderError, match="made for other shards"):
        TeacherCache.create_or_open(path, other, n_views=2, view_spec=ViewSpec(), seed=0)
    with pytest.raises(LeaderError, match="has 3 shards, the manifest 2"):
        again.check_against(other)
    assert any("made for other shards" in p for p in find_problems(again, other))


def test_interrupted_creation_is_redone_and_foreign_stores_are_refused(manifest, tmp_path):
    path = tmp_path / "cache.zarr"
    TeacherCache.create_or_open(path, manifest, n_views=2, view_spec=ViewSpec(), seed=0)
    zarr.open_group(str(path), mode="r+").attrs["complete"] = False       # as if killed while creating
    with pytest.raises(LeaderError, match="never finished"):
        TeacherCache.open(path)
    cache = TeacherCache.create_or_open(path, manifest, n_views=2, view_spec=ViewSpec(), seed=0)
    assert cache.read_keys(0, manifest.n_items) == expected_item_keys(manifest)

    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(str(foreign), mode="w").create_array("x", shape=(2,), dtype="f4")
    with pytest.raises(LeaderError, match="not a leader teacher cache"):
        TeacherCache.create_or_open(foreign, manifest, n_views=2, view_spec=ViewSpec(), seed=0)
    with pytest.raises(LeaderError, match="no teacher cache"):
        TeacherCache.open(tmp_path / "absent.zarr")


def test_teacher_blocks_flags_and_fingerprint_mismatch(manifest, tmp_path):
    path = tmp_path / "cache.zarr"
    cache = TeacherCache.create_or_open(path, manifest, n_views=2, view_spec=ViewSpec(), seed=0)
    cache.ensure_teacher("disease", fake_teacher(), n_views=2, dtype="float32")
    emb = fill_teacher(cache, "disease", 2)
    a, b = cache.shard_rows[2]
    np.testing.assert_array_equal(cache.read_block("disease", a, b), emb)
    assert np.isnan(cache.read_block("disease", 0, a)).all()            # not written yet
    assert cache.read_valid("disease", 0, b).tolist() == [False] * a + [True] * (b - a)
    assert cache.is_done("disease").tolist() == [False, False, True]
    attrs = cache.teacher_attrs("disease")
    assert {k: attrs[k] for k in ("kind", "role", "fingerprint", "dim", "dtype", "n_views", "input_size")} == \
        {"kind": "fake", "role": "disease", "fingerprint": "a" * 64, "dim": 6, "dtype": "float32", "n_views": 2, "input_size": 32}
    assert attrs["preprocessing"] == {"mean": [0.5], "resize": "bilinear"} and attrs["created"]

    cache.ensure_teacher("disease", fake_teacher(), n_views=2, dtype="float32")    # same teacher: kept
    assert cache.is_done("disease")[2]
    with pytest.raises(LeaderError, match=r"weights sha256 aaaaaaaaaaaa.*bbbbbbbbbbbb.*--overwrite-teacher"):
        cache.ensure_teacher("disease", fake_teacher("b" * 64), n_views=2, dtype="float32")
    with pytest.raises(LeaderError, match="dtype"):
        cache.ensure_teacher("disease", fake_teacher(), n_views=2, dtype="float16")
    cache.ensure_teacher("disease", fake_teacher("b" * 64), n_views=2, dtype="float32", replace_mismatched=True)
    assert not cache.is_done("disease").any() and cache.teacher_attrs("disease")["fingerprint"] == "b" * 64
    with pytest.raises(LeaderError, match="teacher 'nobody' is not in cache"):
        cache.read_block("nobody", 0, 1)


def _rewrite_and_check_own_rows(path: str, shards: list[int], rounds: int, stale_rows) -> None:
    """Write round r into this process's shards, then read them back: a neighbour's unlocked
    read-modify-write of a shared chunk would have put an older round back into some of our rows."""
    cache = TeacherCache.open(path, mode="r+")
    stale = 0
    for r in range(rounds):
        for shard in shards:
            a, b = cache.shard_rows[shard]
            cache.write_block("anatomy", a, np.full((b - a, 2, 6), r, np.float32), np.ones(b - a, bool))
        for shard in shards:
            stale += int((cache.read_block("anatomy", *cache.shard_rows[shard])[:, 0, 0] != r).sum())
    stale_rows.put(stale)


def test_ranks_writing_neighbouring_shards_never_lose_rows(manifest, tmp_path):
    """Neighbouring shards share a boundary chunk; two processes rewriting them concurrently must
    never see their own rows go back (without the store lock this test sees dozens of stale rows)."""
    path = tmp_path / "cache.zarr"
    cache = TeacherCache.create_or_open(path, manifest, n_views=2, view_spec=ViewSpec(), seed=0)
    cache.ensure_teacher("anatomy", fake_teacher(), n_views=2, dtype="float32")
    chunk = zarr.open_group(str(path), mode="r")["teachers/anatomy/emb"].chunks[0]
    assert any(a % chunk for a, _ in cache.shard_rows[1:])    # some shard starts inside a chunk

    ctx = mp.get_context("fork")
    stale_rows = ctx.Queue()
    rounds = 30
    workers = [ctx.Process(target=_rewrite_and_check_own_rows, args=(str(path), shards, rounds, stale_rows))
               for shards in ([0, 2], [1])]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    assert stale_rows.get(timeout=5) + stale_rows.get(timeout=5) == 0
    stored = cache.read_block("anatomy", 0, manifest.n_items)
    assert (stored == rounds - 1).all() and cache.read_valid("anatomy", 0, manifest.n_items).all()


def test_lock_is_reentrant_within_a_process(tmp_path):
    with store_lock(tmp_path / "c.zarr"):
        with store_lock(tmp_path / "c.zarr"):
            pass


def test_memory_url_store(manifest):
    cache = TeacherCache.create_or_open("memory://leader-test/cache.zarr", manifest, n_views=2,
                                        view_spec=ViewSpec(), seed=0)
    cache.ensure_teacher("anatomy", fake_teacher(), n_views=2)
    emb = fill_teacher(cache, "anatomy", 0)
    reopened = TeacherCache.open("memory://leader-test/cache.zarr")
    a, b = reopened.shard_rows[0]
    np.testing.assert_allclose(reopened.read_block("anatomy", a, b), emb, rtol=1e-3)   # float16
    assert reopened.read_keys(0, 3) == expected_item_keys(manifest)[:3]


def test_chunk_rows_follow_shard_sizes():
    assert chunk_rows_for([20, 21, 19], row_bytes=100) == 10
    assert chunk_rows_for([2500] * 4, row_bytes=4 * 1376 * 2) == 1250
    assert chunk_rows_for([100_000], row_bytes=4 * 2048 * 4) == (16 << 20) // (4 * 2048 * 4)
    assert chunk_rows_for([1], row_bytes=10) == 1


def test_cache_info_and_verify_commands(shards, manifest, tmp_path):
    path = tmp_path / "cache.zarr"
    cache = TeacherCache.create_or_open(path, manifest, n_views=2, view_spec=ViewSpec(), seed=0)
    cache.ensure_teacher("anatomy", fake_teacher(), n_views=2)
    for shard in range(3):
        fill_teacher(cache, "anatomy", shard)
    from leader.precompute.run import finish_teacher

    assert finish_teacher(cache, "anatomy")
    runner = CliRunner()

    info = runner.invoke(cache_app, ["info", str(path)])
    assert info.exit_code == 0, info.output
    assert "anatomy" in info.output and "done 3/3 (100%)" in info.output
    import json

    summary = json.loads(runner.invoke(cache_app, ["info", str(path), "--json"]).output)
    assert summary["teachers"]["anatomy"]["done_fraction"] == 1.0
    assert summary["teachers"]["anatomy"]["bytes_stored"] > 0 and summary["n_items"] == manifest.n_items

    ok = runner.invoke(cache_app, ["verify", str(path), "--shards", str(shards)])
    assert ok.exit_code == 0, ok.output

    a, _ = cache.shard_rows[1]
    broken = cache.read_block("anatomy", a + 3, a + 4)
    broken[0, 1, 2] = np.nan
    cache.write_block("anatomy", a + 3, broken, np.ones(1, bool))
    cache.reset_done("anatomy", 2)
    bad = runner.invoke(cache_app, ["verify", str(path), "--shards", str(shards), "--json"])
    assert bad.exit_code == 1
    problems = json.loads(bad.output)["problems"]
    key = cache.read_keys(a + 3, a + 4)[0]
    assert any("NaN/Inf" in p and f"{a + 3} ({key})" in p for p in problems), problems
    assert any("1 of 3 shards are not done (shards 2)" in p for p in problems), problems
    assert find_problems(cache, manifest) == problems
