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


SHARD_FLIPS = 110
CHECKPOINT_FLIPS = 52
EXPORT_FLIPS = 52


def test_every_flipped_bit_in_a_shard_tar_stops_the_trainer_and_the_evaluation_before_a_sample_is_used(
        fault_inputs, tmp_path):
    from leader.shards.layout import DamagedShard, iter_samples
    from leader.shards.manifest import Manifest
    from leader.train.loader import tar_to_samples
    from leader.train.sources import ShardSource

    shards = tmp_path / "shards"
    shutil.copytree(fault_inputs["shards"], shards)
    manifest = Manifest.load(shards)
    entries = {s.name: (i, s) for i, s in enumerate(manifest.shards)}

    def trainer_reads(name: str) -> list:
        """The loader's tar stage on that one shard; every sample it would hand on."""
        i, s = entries[name]
        source = ShardSource(0, manifest.dataset, str(shards / name), i, tuple(s.rows), s.n_samples, 1, s.sha256)
        return [sample for _, samples in tar_to_samples()([source]) for sample in samples]

    def evaluation_reads(name: str) -> list:
        return list(iter_samples(shards, [name]))

    rng = np.random.default_rng(BIT_FLIP_SEED + 1)
    names = sorted(entries)
    counts: Counter = Counter()
    missed = []
    for _ in range(SHARD_FLIPS):
        name = names[int(rng.integers(len(names)))]
        original = flip_random_bit(shards / name, rng)
        try:
            for reader, read in (("trainer", trainer_reads), ("evaluation", evaluation_reads)):
                counts[f"{reader} flips"] += 1
                try:
                    used = read(name)
                except DamagedShard as e:
                    counts[f"{reader} detected"] += str(shards / name) in str(e) and "\n" not in str(e)
                    continue
                missed.append((name, reader, f"{len(used)} samples handed on"))
        finally:
            (shards / name).write_bytes(original)

    summary = (f"shard tar bit flips: {SHARD_FLIPS}; trainer {counts['trainer detected']}/{counts['trainer flips']}, "
               f"evaluation {counts['evaluation detected']}/{counts['evaluation flips']} detected with the shard named")
    print(summary)
    assert not missed and counts["trainer detected"] == counts["evaluation detected"] == SHARD_FLIPS, (summary, missed[:5])
    assert len(trainer_reads(names[0])) == entries[names[0]][1].n_samples      # restored: reads clean again


def test_every_flipped_bit_in_a_checkpoint_is_refused_by_resume_embed_export_and_evaluation(
        fault_inputs, reference_run, tmp_path):
    from leader.errors import LeaderError
    from leader.evaluate.representations import features
    from leader.train.config import load_config
    from leader.train.embed import embed_items
    from leader.train.export import export_run
    from leader.train.loop import train

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    checkpoint = run / "checkpoint.pt"
    shards, cache = fault_inputs["shards"], fault_inputs["cache"]
    cfg = load_config(REPO / "configs" / "demo.yaml", TRAIN_SET, shards=[str(shards)], caches=[str(cache)])
    readers = {
        "resume": lambda: train(cfg, run, resume=True),
        "embed": lambda: embed_items(run, shards, rows=[0]),
        "export": lambda: export_run(run, tmp_path / "export"),
        "evaluation": lambda: features(f"run:{run}", shards, rows=[0]),
    }
    rng = np.random.default_rng(BIT_FLIP_SEED + 2)
    detected: Counter = Counter()
    for flip in range(CHECKPOINT_FLIPS):
        reader = list(readers)[flip % len(readers)]
        original = flip_random_bit(checkpoint, rng)
        try:
            readers[reader]()
        except LeaderError as e:
            detected[reader] += f"checkpoint {checkpoint} is damaged" in str(e) and "\n" not in str(e)
        finally:
            checkpoint.write_bytes(original)

    summary = (f"checkpoint bit flips: {sum(detected.values())}/{CHECKPOINT_FLIPS} refused with the file named ("
               + ", ".join(f"{r} {detected[r]}" for r in readers) + ")")
    print(summary)
    assert sum(detected.values()) == CHECKPOINT_FLIPS, summary
    assert not (tmp_path / "export").exists()                 # nothing was exported from a damaged checkpoint
    export_run(run, tmp_path / "export")                      # restored: it loads again


def test_every_flipped_bit_in_an_export_is_refused_by_its_checksums_and_leaders_readers(reference_run, tmp_path):
    import json

    from leader.checksums import verify_folder
    from leader.errors import LeaderError
    from leader.evaluate.finetune import backbone_source
    from leader.precompute.teachers import create_teacher
    from leader.train.export import export_run, load_heads

    out = tmp_path / "export"
    files = [p for p in export_run(reference_run, out) if p.name != "SHA256SUMS"]
    arch = json.loads((out / "config.json").read_text())["architecture"]
    leader_reads = {   # what leader itself reads of an export (timm reads config.json; `sha256sum -c` covers it)
        "model.safetensors": [lambda: backbone_source(f"timm:{arch}:{out / 'model.safetensors'}"),
                              lambda: create_teacher("timm", model=out / "model.safetensors", arch=arch, input_size=32)],
        "heads.safetensors": [lambda: load_heads(out)],
        "heads.json": [lambda: load_heads(out)],
        "config.json": [],
    }
    rng = np.random.default_rng(BIT_FLIP_SEED + 3)
    counts: Counter = Counter()
    missed = []
    for _ in range(EXPORT_FLIPS):
        file = files[int(rng.integers(len(files)))]
        original = flip_random_bit(file, rng)
        try:
            for read in [verify_folder, *leader_reads[file.name]]:
                counts["checks"] += 1
                try:
                    read(out) if read is verify_folder else read()
                except LeaderError as e:
                    if f"{file} is damaged" in str(e) and "\n" not in str(e):
                        counts["detected"] += 1
                        continue
                missed.append((file.name, getattr(read, "__name__", "reader")))
        finally:
            file.write_bytes(original)
        counts[file.name] += 1

    summary = (f"export bit flips: {EXPORT_FLIPS} ({', '.join(f'{f.name} {counts[f.name]}' for f in files)}); "
               f"{counts['detected']}/{counts['checks']} reads refused them with the file named")
    print(summary)
    assert not missed, (summary, missed[:5])
    assert verify_folder(out) and load_heads(out)                # restored: they read clean again
