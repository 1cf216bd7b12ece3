"""Shard building throughput: images/s from a folder of PNGs through the csv adapter, by --workers.

The same folder is built once per worker count, each into a fresh directory; the shards must come
out byte-identical (the builder decides content in record order), which is checked here too.
"""
from __future__ import annotations

import shutil
import time

from benchmarks.harness import Context, Figure
from benchmarks.workload import build_from_folder
from leader.errors import LeaderError


def run(ctx: Context) -> list[Figure]:
    p = ctx.profile
    folder = ctx.workload.originals
    rates: dict[int, float] = {}
    reference: list[str] | None = None
    for workers in p.build_workers:
        out = ctx.workdir / f"shard-build-{workers}"
        start = time.perf_counter()
        manifest = build_from_folder(folder, out, p, workers, csv_name="labels.csv")
        seconds = time.perf_counter() - start
        rates[workers] = manifest.n_samples / seconds
        ctx.log(f"shard_build: {manifest.n_samples} images, {workers} worker(s): {rates[workers]:.1f} images/s")
        digests = [s.sha256 for s in manifest.shards]
        if reference is None:
            reference = digests
        elif digests != reference:
            raise LeaderError(f"shard build with {workers} workers wrote other bytes than with {p.build_workers[0]}")
        shutil.rmtree(out)
    base = p.build_workers[0]
    detail = {f"images_per_s_{w}_workers": round(r, 2) for w, r in rates.items()}
    detail.update(images=p.build_images, original_px=p.original_size, stored_px=p.stored_size)
    return [Figure("shard_build", f"build rate, {w} / {base} worker(s)", rates[w] / rates[base], detail,
                   note=f"{rates[w]:.0f} vs {rates[base]:.0f} images/s; byte-identical shards")
            for w in p.build_workers if w != base]
