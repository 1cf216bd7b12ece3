"""Silent corruption: flip one random bit of a stored file, then read it the way each stage does.
Every flip must be detected, with the damaged file named, before a single wrong byte is trained on
or evaluated. The counts are printed (pytest -s) and asserted at 100%.

Flips are seeded (BIT_FLIP_SEED), one at a time; each file is restored before the next flip.
"""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from tests.faults.conftest import REPO, TRAIN_SET

BIT_FLIP_SEED = 1901
CACHE_FLIPS = 120


def flip_random_bit(file: Path, rng: np.random.Generator) -> bytes:
    """Flip one random bit of `file` in place; returns the original bytes to restore it."""
    original = file.read_bytes()
    damaged = bytearray(original)
    damaged[int(rng.integers(len(damaged)))] ^= 1 << int(rng.integers(8))
    file.write_bytes(bytes(damaged))
    return original


def chunk_files(cache: Path) -> list[Path]:
    """Every chunk file of every array (zarr v3 keeps chunks under <array>/c/)."""
    return sorted(p for p in cache.rglob("*") if p.is_file() and "c" in p.relative_to(cache).parts)


def array_of(cache: Path, chunk: Path) -> str:
    parts = chunk.relative_to(cache).parts
    return "/".join(parts[:parts.index("c")])


def chunk_rows(cache: Path, chunk: Path) -> tuple[int, int] | None:
    """The item rows a chunk of a row-indexed array holds (None for done flags and statistics)."""
    import zarr

    array = array_of(cache, chunk)
    if array.rsplit("/", 1)[-1] in ("done", "stats"):
        return None
    index = int(chunk.relative_to(cache / array / "c").parts[0])
    stored = zarr.open_array(str(cache / array), mode="r")
    return index * stored.chunks[0], min((index + 1) * stored.chunks[0], stored.shape[0])


def test_every_flipped_bit_in_a_cache_chunk_is_caught_by_the_trainer_the_evaluation_and_verify(fault_inputs, tmp_path):
    from leader.evaluate.representations import teacher_features
    from leader.precompute.cache import DamagedCache, TeacherCache
    from leader.shards.manifest import Manifest
    from leader.train.config import load_config
    from leader.train.loader import JoinCacheBlocks, StreamSpec
    from leader.train.sources import ShardSource, open_sources

    shards = fault_inputs["shards"]
    cache = tmp_path / "cache.zarr"
    shutil.copytree(fault_inputs["cache"], cache)
    manifest = Manifest.load(shards)
    teachers = ["disease", "anatomy"]
    cfg = load_config(REPO / "configs" / "demo.yaml", TRAIN_SET, shards=[str(shards)], caches=[str(cache)])
    spec = StreamSpec.for_phase(open_sources([str(shards)], [str(cache)], teachers), cfg.phases[1], cfg, 1)

    def trainer_reads(rows: tuple[int, int] | None) -> None:
        """What a training run reads: its start-up checks, the statistics `standardize` needs, and
        the block of every shard holding the damaged rows (the whole epoch reads them all)."""
        sources = open_sources([str(shards)], [str(cache)], teachers)
        for name in teachers:
            sources.pooled_stats(name)
        join = JoinCacheBlocks(spec, epoch=0)
        for i, s in enumerate(manifest.shards):
            if rows is not None and s.rows[0] < rows[1] and rows[0] < s.rows[1]:
                join.read_block(ShardSource(0, manifest.dataset, str(manifest.path(s.name)), i, tuple(s.rows),
                                            s.n_samples, 1))

    def evaluation_reads(name: str, rows: tuple[int, int] | None) -> None:
        """`teacher:NAME` features of the damaged rows (of every row for a done flag)."""
        teacher_features(name, shards, np.arange(*(rows or (0, manifest.n_items))), cache)

    def caught(read, file: Path) -> bool:
        try:
            read()
        except DamagedCache as e:
            return str(file) in str(e) and "\n" not in str(e)
        return False

    files = chunk_files(cache)
    assert len(files) > 100 and {array_of(cache, f) for f in files} >= {
        "items/key", "items/kind", "items/split", "views/params", "teachers/disease/emb", "teachers/disease/valid",
        "teachers/disease/done", "teachers/disease/stats", "teachers/anatomy/emb"}
    rng = np.random.default_rng(BIT_FLIP_SEED)
    counts: Counter = Counter()
    by_array: Counter = Counter()
    missed = []
    for _ in range(CACHE_FLIPS):
        file = files[int(rng.integers(len(files)))]
        array, rows = array_of(cache, file), chunk_rows(cache, file)
        original = flip_random_bit(file, rng)
        try:
            # `leader cache verify --deep` runs this over every array.
            checks = {"trainer": caught(lambda: trainer_reads(rows), file),
                      "verify": [d.file for d in TeacherCache.open(cache).damaged_chunks(array)] == [str(file)]}
            if array.split("/")[-1] in ("emb", "valid", "done"):      # what evaluation reads of a teacher
                checks["evaluation"] = caught(lambda: evaluation_reads(array.split("/")[1], rows), file)
        finally:
            file.write_bytes(original)
        by_array[array] += 1
        for reader, ok in checks.items():
            counts[f"{reader} flips"] += 1
            counts[f"{reader} detected"] += ok
        if not all(checks.values()):
            missed.append((str(file), checks))

    summary = (f"cache chunk bit flips: {CACHE_FLIPS - len(missed)}/{CACHE_FLIPS} detected by every reader; "
               + ", ".join(f"{r} {counts[f'{r} detected']}/{counts[f'{r} flips']}" for r in ("trainer", "evaluation", "verify"))
               + f"; flips per array: {dict(sorted(by_array.items()))}")
    print(summary)
    assert not missed, f"{summary}; missed: {missed[:5]}"
    trainer_reads((0, manifest.n_items))      # every file restored: the cache reads clean again
