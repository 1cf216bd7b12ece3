"""Cache cost: bytes per item and view on disk, the compression ratio, block vs row-by-row reads.

The trainer reads one block per shard per teacher (`TeacherCache.read_block`); this measures why:
rows/s of those block reads against rows/s of single-row reads of the same store.
"""
from __future__ import annotations

import time

import numpy as np

from benchmarks.harness import Context, Figure, directory_bytes
from leader.precompute.cache import TeacherCache


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
    return figures
