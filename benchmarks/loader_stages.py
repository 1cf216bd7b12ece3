"""Where one DataLoader worker's time goes, per sample, at 512 px stored.

The stages of leader/train/loader.py that touch every sample, each timed alone inside a real
DataLoader worker (so collation sees what a worker sees) over the same shards:

    tar read        the one shard reader without its sha256 check, less the JSON parse
    sha256          the check of the shard's bytes against its manifest (the whole file)
    json            parsing each sample's metadata member
    png decode      the stored PNG -> uint8 pixels (leader.shards.png)
    canvas          placing the image on the batch's fixed square canvas
    collate         stacking a batch, and pickling it for the trip to the training process
                    (tensors move to shared memory then)

Each stage's time is the fastest of `repeats` passes (timeit's rule: the other passes measured
the machine's other jobs). The images are phantom radiographs written as PNGs at 512 px and built
into shards at 512 px (NIH's 1024 px originals are stored at 512). The figures give each stage's
share of the worker's time, Pillow's decode of the same PNGs against leader's, and, when the
student_step benchmark, what the profile's `loader_cores` workers could deliver against the
fastest step's demand (it leaves the per-worker rate in ctx.shared).
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import replace
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from benchmarks.harness import Context, Figure
from benchmarks.workload import build_from_folder, write_image_folder
from leader.shards.layout import iter_shard
from leader.shards.manifest import Manifest
from leader.shards.png import decode_png
from leader.train.loader import collate, place_on_canvas

STORED_PX = 512
STAGES = ("tar read", "sha256", "json", "png decode", "canvas", "collate")
REPEATS = 3


def fastest(fn, repeats: int = REPEATS) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class StageTimes(IterableDataset):
    """Yields one dict: seconds per sample of each stage (and of Pillow's decode), timed in the worker."""

    def __init__(self, shards: list[tuple[str, str]], batch_size: int):
        self.shards, self.batch_size = shards, batch_size

    def __iter__(self):
        shards, batch = self.shards, self.batch_size
        samples = [s for url, _ in shards for s in iter_shard(url)]
        n = len(samples)
        metas = [json.dumps(s.meta).encode() for s in samples]
        images = [decode_png(s.png) for s in samples]
        tuples = [{"key": s.key, "image": image[None], "image_hw": np.array(image.shape, dtype=np.int64),
                   "image_params": np.zeros(10, np.float32), "targets": {"t": np.zeros(256, np.float16)},
                   "valid": {"t": np.bool_(True)}} for s, image in zip(samples, images)]
        read = fastest(lambda: [s for url, _ in shards for s in iter_shard(url)])
        parse = fastest(lambda: [json.loads(m) for m in metas])
        seconds = {
            "tar read": max(0.0, read - parse),
            "sha256": fastest(lambda: [hashlib.sha256(Path(url).read_bytes()).hexdigest() for url, _ in shards]),
            "json": parse,
            "png decode": fastest(lambda: [decode_png(s.png) for s in samples]),
            "canvas": fastest(lambda: [place_on_canvas(image, STORED_PX) for image in images]),
            "collate": fastest(lambda: [ForkingPickler.dumps(collate(tuples[i:i + batch]))
                                        for i in range(0, n - batch + 1, batch)]) * n / (n // batch * batch),
            "pillow decode": fastest(lambda: [np.asarray(Image.open(io.BytesIO(s.png))) for s in samples]),
        }
        yield {**{name: s / n for name, s in seconds.items()}, "png_bytes": float(np.mean([len(s.png) for s in samples]))}


def stage_shards(ctx: Context) -> Manifest:
    """`stage_images` phantom PNGs at 512 px, built into 512 px shards (once per run)."""
    p = ctx.profile
    root = ctx.workdir / "loader-stages"
    if not (root / "shards" / "manifest.json").exists():
        write_image_folder(root / "originals", p.stage_images, STORED_PX, min(p.stage_images, p.distinct_images))
        build_from_folder(root / "originals", root / "shards", replace(p, stored_size=STORED_PX), workers=1,
                          csv_name="labels.csv")
    return Manifest.load(root / "shards")


def run(ctx: Context) -> list[Figure]:
    p = ctx.profile
    manifest = stage_shards(ctx)
    shards = [(str(manifest.path(s.name)), s.sha256) for s in manifest.shards]
    batch = min(p.loader_batch_size, manifest.n_samples)
    loader = DataLoader(StageTimes(shards, batch), batch_size=None, num_workers=1)
    (per_sample,) = list(loader)
    total = sum(per_sample[stage] for stage in STAGES)
    detail = {**{f"{stage.replace(' ', '_')}_ms": round(per_sample[stage] * 1000, 4) for stage in STAGES},
              "worker_ms_per_sample": round(total * 1000, 3),
              "pillow_decode_ms": round(per_sample["pillow decode"] * 1000, 4),
              "samples": manifest.n_samples, "stored_px": STORED_PX, "batch": batch,
              "png_kb": round(per_sample["png_bytes"] / 1000, 1)}
    ctx.shared["loader_stages"] = {"worker_samples_per_s": 1 / total}
    ctx.log(f"loader_stages: {total * 1000:.2f} ms per sample in one worker: "
            + ", ".join(f"{stage} {per_sample[stage] * 1000:.3f}" for stage in STAGES))
    figures = [Figure("loader_stages", f"share of a worker's time per 512 px sample, {stage}", per_sample[stage] / total,
                      detail, note=f"{per_sample[stage] * 1000:.3f} of {total * 1000:.2f} ms")
               for stage in STAGES]
    figures.append(Figure("loader_stages", "PNG decode at 512 px, Pillow / leader", per_sample["pillow decode"]
                          / per_sample["png decode"], detail,
                          note=f"{per_sample['pillow decode'] * 1000:.2f} vs {per_sample['png decode'] * 1000:.2f} ms "
                               "on the shards' PNGs"))
    return figures
