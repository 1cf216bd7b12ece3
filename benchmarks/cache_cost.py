"""Cache cost: bytes per item and view on disk, the compression ratio, block vs row-by-row reads,
and what the chunks' CRC32C checksums cost a reader.

The trainer reads one block per shard per teacher (`TeacherCache.read_block`); this measures why:
rows/s of those block reads against rows/s of single-row reads of the same store. The checksum's
cost is the block read rate of one teacher's embeddings stored twice, the same chunks with and
without the CRC32C codec, read in alternating rounds.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import zarr

from benchmarks.harness import Context, Figure, directory_bytes
from leader.precompute.cache import EMB_CODEC, EMB_CODECS, TeacherCache


def read_rates(cache: TeacherCache, name: str, row_reads: int, seed: int = 0) -> tuple[float, float]:
    """(rows/s reading every shard as one block, rows/s reading `row_reads` random single rows)."""
    start = time.perf_counter()
    rows = 0
    for a, b in cache.shard_rows:
        rows += len(cache.read_block(name, a, b))
    block_rate = rows / (time.perf_counter() - start)
    picks = np.random.default_rng(seed).integers(0, cache.n_items, row_reads)
    start = time.perf_counter()
    for r in picks:
        cache.read_block(name, int(r), int(r) + 1)
    return block_rate, row_reads / (time.perf_counter() - start)


def checksum_read_rates(source: zarr.Array, shard_rows: list[tuple[int, int]], workdir: Path, label: str,
                        rounds: int = 15) -> dict[str, float]:
    """Rows per CPU second of block reads (one per shard) of `source` copied into two arrays with
    its chunks: "crc32c" with the checksum codec after Blosc (what leader writes), "none" with Blosc
    alone; "wall_..." the same per wall-clock second.

    The two are read in alternating rounds (the order flips each round), and each rate comes from
    its fastest round, as timeit does. CPU time (of every thread of this process, zarr decodes on
    several) is the cost itself; wall-clock rounds on a shared machine mostly measure the other
    jobs, which are far larger than a checksum's few percent.
    """
    arrays = {}
    for codec, codecs in (("crc32c", EMB_CODECS), ("none", (EMB_CODEC,))):
        arrays[codec] = zarr.create_array(str(workdir / f"checksum-cost-{label}-{codec}.zarr"), shape=source.shape,
                                          chunks=source.chunks, dtype=source.dtype, compressors=codecs,
                                          fill_value=np.nan, overwrite=True)
        for a, b in shard_rows:
            arrays[codec][a:b] = source[a:b]
    wall: dict[str, list[float]] = {codec: [] for codec in arrays}
    cpu: dict[str, list[float]] = {codec: [] for codec in arrays}
    for r in range(rounds):
        for codec in (("crc32c", "none") if r % 2 == 0 else ("none", "crc32c")):
            start, start_cpu = time.perf_counter(), time.process_time()
            for a, b in shard_rows:
                arrays[codec][a:b]
            wall[codec].append(time.perf_counter() - start)
            cpu[codec].append(time.process_time() - start_cpu)
    n = source.shape[0]
    return {**{codec: n / min(times) for codec, times in cpu.items()},
            **{f"wall_{codec}": n / min(times) for codec, times in wall.items()}}


def paper_sized_embeddings(workdir: Path, shards: int = 2, items_per_shard: int = 2500, views: int = 4,
                           dim: int = 1376) -> tuple[zarr.Array, list[tuple[int, int]]]:
    """Random float16 embeddings of CXR Foundation's width in a production layout (shards of 1000
    images hold about 2500 items; 4 views), chunked as the cache chunks them (13.8 MB chunks).
    Random values barely compress, like real embeddings. Returns the array and its shard rows."""
    from leader.precompute.cache import chunk_rows_for

    shard_rows = [(i * items_per_shard, (i + 1) * items_per_shard) for i in range(shards)]
    rows = chunk_rows_for([items_per_shard] * shards, views * dim * 2)
    array = zarr.create_array(str(workdir / "checksum-cost-source.zarr"), shape=(shards * items_per_shard, views, dim),
                              chunks=(rows, views, dim), dtype="float16", compressors=(EMB_CODEC,),
                              fill_value=np.nan, overwrite=True)
    rng = np.random.default_rng(0)
    for a, b in shard_rows:
        array[a:b] = rng.standard_normal((b - a, views, dim)).astype(np.float16)
    return array, shard_rows


def checksum_figure(rates: dict[str, float], what: str, detail: dict) -> Figure:
    ratio = rates["crc32c"] / rates["none"]
    detail = {"rows_per_cpu_s_crc32c": round(rates["crc32c"]), "rows_per_cpu_s_no_checksum": round(rates["none"]),
              "rows_per_s_crc32c": round(rates["wall_crc32c"]), "rows_per_s_no_checksum": round(rates["wall_none"]),
              **detail}
    return Figure("cache_cost", f"block reads per CPU second, CRC32C / no checksum, {what}", ratio, detail,
                  note=f"{rates['crc32c']:,.0f} vs {rates['none']:,.0f} rows per CPU second; wall clock "
                       f"{rates['wall_crc32c']:,.0f} vs {rates['wall_none']:,.0f} rows/s")


def run(ctx: Context) -> list[Figure]:
    path = ctx.workload.cache
    cache = TeacherCache.open(path)
    figures = []
    for name in cache.teachers:
        n, views, dim = cache.emb_shape(name)
        attrs = cache.teacher_attrs(name)
        stored = directory_bytes(path / "teachers" / name / "emb")
        raw = n * views * dim * np.dtype(attrs["dtype"]).itemsize
        block_rate, row_rate = read_rates(cache, name, ctx.profile.row_reads)
        detail = {"bytes_per_item_view": round(stored / (n * views), 1), "compression_ratio": round(raw / stored, 3),
                  "block_read_rows_per_s": round(block_rate), "row_read_rows_per_s": round(row_rate),
                  "items": n, "views": views, "dim": dim, "dtype": attrs["dtype"]}
        figures.append(Figure("cache_cost", f"block / row-by-row read rate, {name}", block_rate / row_rate, detail,
                              note=f"{detail['bytes_per_item_view']:.0f} B/item/view, compression "
                                   f"{detail['compression_ratio']:.2f}x ({dim}-d {attrs['dtype']}, random weights)"))
        figures.append(Figure("cache_cost", f"compression ratio (raw / stored), {name}", raw / stored, detail))
        ctx.log(f"cache_cost: {name}: {detail}")

        source = zarr.open_array(str(path / "teachers" / name / "emb"), mode="r")
        figures.append(checksum_figure(checksum_read_rates(source, cache.shard_rows, ctx.workdir, name), name,
                                       {"items": n, "views": views, "dim": dim, "dtype": attrs["dtype"]}))
        ctx.log(f"cache_cost: {name}: checksum {figures[-1].detail}")
    # The workload's embeddings are narrow and its chunks small, so there the codec's per-chunk
    # overhead dominates; the real disease teacher is 1376-d with 13.8 MB chunks, where the bytes
    # hashed dominate. Both are measured.
    source, shard_rows = paper_sized_embeddings(ctx.workdir)
    figures.append(checksum_figure(checksum_read_rates(source, shard_rows, ctx.workdir, "1376"),
                                   "1376-d float16, production chunks",
                                   {"items": source.shape[0], "views": source.shape[1], "dim": source.shape[2],
                                    "dtype": "float16", "chunk_rows": source.chunks[0]}))
    ctx.log(f"cache_cost: 1376-d: checksum {figures[-1].detail}")
    return figures
