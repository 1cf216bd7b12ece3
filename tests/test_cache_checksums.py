"""Checksummed cache chunks: a damaged chunk is named wherever it is read, `cache verify --deep`
lists every one, and `leader precompute --repair` recomputes just the shards they hold.

The caches here are copies of the session's train cache (two tiny timm teachers over the phantom
shards, 2 views), damaged by flipping one bit of a chunk file.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner
from zarr.codecs import ZstdCodec

import leader.precompute.cache as cache_module
from leader.cli import main as leader_main
from leader.errors import LeaderError
from leader.precompute.cache import DamagedCache, TeacherCache, find_problems
from leader.precompute.commands import cache_app
from leader.precompute.run import CacheLayout, Execution, precompute, teacher_statistics
from leader.shards.manifest import Manifest
from tests.conftest import one_thread, tiny_teacher


def flip_bit(file: Path, offset: int, bit: int = 3) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 1 << bit
    file.write_bytes(bytes(data))


def chunk_of(cache_path: Path, array: str, index: int = 0) -> Path:
    """The chunk file holding chunk `index` along the rows of `array`."""
    chunk = cache_path / array / "c" / str(index)          # c/i for 1-D arrays, c/i/0/0 for embeddings
    return chunk if chunk.is_file() else next(f for f in sorted(chunk.rglob("*")) if f.is_file())


@pytest.fixture
def cache_copy(train_cache, tmp_path):
    path = tmp_path / "cache.zarr"
    shutil.copytree(train_cache, path)
    return path


def test_every_array_of_a_new_cache_carries_a_checksum(cache_copy, phantom_shards):
    cache = TeacherCache.open(cache_copy)
    assert cache.unchecked_arrays() == []
    assert all(cache.unchecked_arrays(t) == [] for t in cache.teachers)
    summary = cache.summary()
    assert summary["checksums"] and all(t["checksums"] for t in summary["teachers"].values())
    info = CliRunner().invoke(cache_app, ["info", str(cache_copy)])
    assert "CRC32C checksums on every chunk" in info.output and "no checksums" not in info.output
    assert find_problems(cache, Manifest.load(phantom_shards), deep=True) == []


def test_a_flipped_bit_in_an_embedding_chunk_fails_the_read_naming_file_teacher_and_shard(cache_copy, phantom_shards):
    cache = TeacherCache.open(cache_copy)
    a, b = cache.shard_rows[1]
    chunk_rows = cache._array("teachers/disease/emb").chunks[0]
    index = a // chunk_rows
    file = chunk_of(cache_copy, "teachers/disease/emb", index)
    flip_bit(file, file.stat().st_size // 2)

    with pytest.raises(DamagedCache) as damaged:
        cache.read_block("disease", a, b)
    message = str(damaged.value)
    assert "\n" not in message
    assert message.startswith(f"cache {cache_copy}: teacher 'disease': the embeddings of shard(s) ")
    assert str(file) in message and "CRC32C checksum does not match" in message
    # The cache is not beside its shards here, so the command names both.
    assert f"`leader precompute --teacher disease --shards <its shards> --cache {cache_copy} --repair`" in message
    assert "1" in message.split("shard(s) ")[1].split(" (rows")[0].split(", ")

    # Every reader goes through the same reads: statistics, evaluation features, verify.
    with pytest.raises(DamagedCache, match="teacher 'disease'"):
        teacher_statistics(cache, "disease")
    from leader.evaluate.representations import teacher_features

    with pytest.raises(DamagedCache, match=str(file)):
        teacher_features("disease", phantom_shards, np.arange(a, b), cache_copy)
    problems = find_problems(cache, Manifest.load(phantom_shards))
    assert any(str(file) in p for p in problems)
    cache.read_block("anatomy", a, b)                       # the other teacher is intact


def test_training_stops_in_one_line_naming_the_chunk_even_when_a_loader_worker_meets_it(cache_copy, phantom_shards,
                                                                                      tmp_path):
    from leader.train.config import load_config
    from leader.train.loop import train

    for file in (cache_copy / "teachers/disease/emb/c").iterdir():
        flip_bit(file / "0" / "0", 9)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml",
                      ["data.num_workers=2", "data.batch_size=4", "phases.0.steps=4", "phases.1.steps=2"],
                      shards=[str(phantom_shards)], caches=[str(cache_copy)])
    with one_thread(), pytest.raises(LeaderError) as stopped:
        train(cfg, tmp_path / "run")
    message = str(stopped.value)
    assert "\n" not in message and "DataLoader" not in message
    assert message.startswith(f"cache {cache_copy}: teacher 'disease': the embeddings of shard(s)")
    assert f"{cache_copy}/teachers/disease/emb/c/" in message


def test_verify_deep_names_every_damaged_chunk_of_every_array(cache_copy, phantom_shards):
    damaged = [chunk_of(cache_copy, "items/key"), chunk_of(cache_copy, "teachers/anatomy/done", 2),
               chunk_of(cache_copy, "teachers/disease/stats"), chunk_of(cache_copy, "teachers/anatomy/emb", 1)]
    for file in damaged:
        flip_bit(file, 0, bit=0)
    result = CliRunner().invoke(cache_app, ["verify", str(cache_copy), "--shards", str(phantom_shards),
                                            "--deep", "--json"])
    assert result.exit_code == 1
    problems = json.loads(result.output)["problems"]
    for file in damaged:
        assert sum(str(file) in p for p in problems) == 1, (file, problems)
    assert problems[-1].startswith("4 damaged chunk(s): `leader precompute --teacher anatomy")


def test_repair_recomputes_only_the_damaged_shards_and_restores_the_store(cache_copy, train_cache, phantom_shards,
                                                                        capsys):
    original = TeacherCache.open(train_cache)
    cache = TeacherCache.open(cache_copy, mode="r+")
    manifest = Manifest.load(phantom_shards)
    rows_per_chunk = cache._array("teachers/disease/emb").chunks[0]
    flip_bit(chunk_of(cache_copy, "teachers/disease/emb", 0), 10)           # rows of shard 0 (and 1?)
    chunk_shards = cache.shards_in(0, rows_per_chunk)
    a, b = cache.shard_rows[2]
    nan_rows = cache.read_block("disease", a, a + 1).astype(np.float32)
    nan_rows[0, 0, 0] = np.nan                                               # NaN in a valid row of shard 2
    cache.write_block("disease", a, nan_rows, np.ones(1, bool))

    args = ["precompute", "--teacher", "disease", "--shards", str(phantom_shards), "--cache", str(cache_copy),
            "--kind", "timm", "--model", str(train_cache.parent / "test_resnet.pt"), "--option", "arch=test_resnet",
            "--option", "input_size=32", "--views", "2", "--patch-size", "32", "--batch-size", "64",
            "--decode-threads", "0", "--repair"]
    with one_thread(), pytest.raises(SystemExit) as done:
        leader_main(args)
    out = capsys.readouterr().out
    assert done.value.code in (0, None), out
    assert "teachers/disease/emb/c/0/0/0" in out and "CRC32C checksum does not match" in out
    assert "repair: shards 2 hold NaN/Inf embeddings" in out
    recomputed = sorted(set(chunk_shards) | {2})
    assert f"shards {', '.join(map(str, recomputed))} will be recomputed" in out
    assert f"{len(recomputed)} shards" in out and f"{3 - len(recomputed)} shards were already done" in out

    repaired = TeacherCache.open(cache_copy)
    for teacher in ("disease", "anatomy"):
        for a, b in repaired.shard_rows:
            np.testing.assert_array_equal(repaired.read_block(teacher, a, b), original.read_block(teacher, a, b))
        np.testing.assert_array_equal(repaired.stats(teacher)[0], original.stats(teacher)[0])
    assert find_problems(repaired, manifest, deep=True) == []


def test_a_damaged_shared_array_is_written_again_by_any_teachers_repair(cache_copy, train_cache, phantom_shards):
    flip_bit(chunk_of(cache_copy, "views/params", 0), 7)
    cache = TeacherCache.open(cache_copy)
    with pytest.raises(DamagedCache, match="the shared array views/params .* rewrite it from the shards"):
        cache.read_params(0, 4)

    from leader.precompute.cache import repair_teacher

    report = repair_teacher(TeacherCache.open(cache_copy, mode="r+"), Manifest.load(phantom_shards), "anatomy")
    assert report.shared_rewritten and report.shards_reset == []
    np.testing.assert_array_equal(TeacherCache.open(cache_copy).read_params(0, 40),
                                  TeacherCache.open(train_cache).read_params(0, 40))


def test_a_write_next_to_a_damaged_chunk_is_refused_naming_it(cache_copy):
    cache = TeacherCache.open(cache_copy, mode="r+")
    rows_per_chunk = cache._array("teachers/anatomy/emb").chunks[0]
    # A shard that ends inside a chunk: writing it reads that chunk back to merge the neighbour's rows.
    a, b = next((a, b) for a, b in cache.shard_rows if b % rows_per_chunk)
    file = chunk_of(cache_copy, "teachers/anatomy/emb", (b - 1) // rows_per_chunk)
    flip_bit(file, 5)
    block = np.zeros((b - a, *cache.emb_shape("anatomy")[1:]), np.float32)
    with pytest.raises(DamagedCache, match=str(file)):
        cache.write_block("anatomy", a, block, np.ones(b - a, bool))


def test_a_cache_written_before_checksums_still_loads_and_says_so(phantom_shards, tmp_path, monkeypatch, capsys):
    # What leader wrote before: Blosc alone for embeddings and view parameters, zarr's default elsewhere.
    monkeypatch.setattr(cache_module, "EMB_CODECS", (cache_module.EMB_CODEC,))
    monkeypatch.setattr(cache_module, "SMALL_CODECS", (ZstdCodec(level=0),))
    path = tmp_path / "old.zarr"
    with one_thread():
        precompute(phantom_shards, "anatomy", tiny_teacher(tmp_path, "test_resnet"), path,
                   CacheLayout(views=1, patch_size=32), Execution(batch_size=64, decode_threads=0))
    monkeypatch.undo()
    assert zarr.open_array(str(path / "teachers/anatomy/emb")).compressors[-1].__class__.__name__ == "BloscCodec"

    cache = TeacherCache.open(path)
    assert cache.read_block("anatomy", 0, 3).shape[0] == 3
    assert set(cache.unchecked_arrays()) == {"items/key", "items/kind", "items/split", "views/params"}
    info = CliRunner().invoke(cache_app, ["info", str(path)])
    assert "shared arrays with no checksums" in info.output
    assert "no checksums on teachers/anatomy/emb, teachers/anatomy/valid, teachers/anatomy/done" in info.output
    verify = CliRunner().invoke(cache_app, ["verify", str(path), "--shards", str(phantom_shards), "--deep"])
    assert verify.exit_code == 0 and "note: 8 array(s) carry no checksums" in verify.output

    # A new teacher in an old cache gets checksums of its own.
    with one_thread():
        precompute(phantom_shards, "disease", tiny_teacher(tmp_path, "test_convnext"), path,
                   CacheLayout(views=1, patch_size=32), Execution(batch_size=64, decode_threads=0))
    assert TeacherCache.open(path).unchecked_arrays("disease") == []


def test_repair_is_one_process_and_needs_the_teacher_in_the_cache(cache_copy, phantom_shards, monkeypatch, capsys):
    base = ["precompute", "--teacher", "nobody", "--kind", "timm", "--shards", str(phantom_shards),
            "--cache", str(cache_copy), "--repair"]
    with pytest.raises(SystemExit):
        leader_main(base)
    assert "teacher 'nobody' is not in cache" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LeaderError, match="--repair runs in one process"):
        leader_main(["--debug", *base])
