"""Scale: the trainer's host memory for 1k, 100k and 1M items in the manifest. It must stay flat.

Each size gets a synthetic shard set in the real formats (tar shards, keys.txt, manifest.json and a
complete two-teacher cache) with tiny 16 px images, so a million items fit on disk in seconds. A
fresh Python process then does, for each set from the smallest up, what `leader train` does: open
and check the shards and caches, plan the stream, build the student and train a few steps of the
pairs phase. Peak resident memory only ever grows, so its value after each set shows whatever the
trainer keeps per item (or per sample); one process for all sizes pays the imports once.

    python -m benchmarks.scale --child DIR...   # the measured process (prints one JSON line per set)
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import Context, Figure
from leader.errors import LeaderError
from leader.io import atomic_write_json, atomic_write_text
from leader.shards.layout import default_cache_path
from leader.shards.png import encode_png
from leader.shards.manifest import KEYS_NAME, MANIFEST_NAME, Manifest, ShardEntry

REPO = Path(__file__).resolve().parents[1]
PATCHES_PER_SAMPLE = 9          # each sample: one image and nine diseased patches = 10 items
SAMPLES_PER_SHARD = 100         # 1000 items a shard
SIDE = 16
DIM = 32
VIEWS = 2
TEACHERS = ("disease", "anatomy")


def sample_meta(key: str, row: int) -> dict:
    patches = [{"box": [2.0, 2.0, 10.0, 10.0], "kind": "diseased", "label": "nodule"}] * PATCHES_PER_SAMPLE
    return {"key": key, "dataset": "synthetic", "image_id": key.split("/", 1)[1], "path": "", "split": "train",
            "patient_id": key, "view": "PA", "orig_size": [SIDE, SIDE], "size": [SIDE, SIDE], "scale": 1.0,
            "bits": 8, "labels": {"nodule": 1}, "source_labels": {}, "boxes": [], "landmarks": None,
            "patches": patches, "rows": [row, row + 1 + PATCHES_PER_SAMPLE], "extra": {}}


def write_synthetic_set(out: Path, n_items: int) -> Manifest:
    """A complete shard set of n_items items (rounded to whole shards) in leader's formats."""
    import hashlib

    import webdataset as wds

    items_per_sample = 1 + PATCHES_PER_SAMPLE
    n_shards = max(1, n_items // (items_per_sample * SAMPLES_PER_SHARD))
    out.mkdir(parents=True, exist_ok=True)
    png = encode_png((np.arange(SIDE * SIDE).reshape(SIDE, SIDE) % 251).astype(np.uint8), 1)
    entries, keys, row = [], [], 0
    for s in range(n_shards):
        name = f"shard-{s:06d}.tar"
        first_row, shard_keys = row, []
        buf = io.BytesIO()
        with wds.TarWriter(buf, encoder=False, mtime=0) as sink:
            for j in range(SAMPLES_PER_SHARD):
                key = f"synthetic/{s:06d}_{j:04d}"
                sink.write({"__key__": key, "json": json.dumps(sample_meta(key, row)).encode(), "png": png})
                shard_keys.append(key)
                row += items_per_sample
        data = buf.getvalue()
        (out / name).write_bytes(data)
        entries.append(ShardEntry(name, SAMPLES_PER_SHARD, row - first_row, (first_row, row), shard_keys[0],
                                  shard_keys[-1], hashlib.sha256(data).hexdigest()))
        keys += shard_keys
    atomic_write_text(out / KEYS_NAME, "".join(f"{k}\t{items_per_sample}\n" for k in keys))
    manifest = Manifest(root=out, dataset="synthetic", label_names=["nodule"], landmark_names=[], has_boxes=True,
                        has_landmarks=False, overlap_note=None,
                        build={"size": SIDE, "seed": 0, "shard_size": SAMPLES_PER_SHARD, "n": len(keys)},
                        n_samples=len(keys), n_items=row, n_rejects=0, splits={"train": len(keys)},
                        label_counts={"nodule": {"pos": len(keys), "neg": 0, "unknown": 0}}, shards=entries,
                        extra={"synthetic": True})
    atomic_write_json(out / MANIFEST_NAME, manifest.to_dict())
    return Manifest.load(out)


def write_synthetic_cache(manifest: Manifest) -> Path:
    """Both teachers complete in the cache beside the shards (random embeddings, written in big blocks)."""
    from leader.precompute.cache import TeacherCache
    from leader.views import ViewSpec

    path = default_cache_path(manifest.root)
    cache = TeacherCache.create_or_open(path, manifest, n_views=VIEWS, view_spec=ViewSpec(), seed=0, patch_size=8)
    rng = np.random.default_rng(0)
    block = 100_000
    for name in TEACHERS:
        description = {"kind": "synthetic", "fingerprint": "0" * 64, "dim": DIM, "input_size": SIDE,
                       "preprocessing": {"synthetic": True}}
        cache.ensure_teacher(name, description, n_views=VIEWS)
        for a in range(0, manifest.n_items, block):
            n = min(block, manifest.n_items - a)
            cache.write_block(name, a, rng.standard_normal((n, VIEWS, DIM), dtype=np.float32), np.ones(n, dtype=bool))
        for s in range(len(manifest.shards)):
            cache.mark_done(name, s)
    return path


def trainer_child(root: Path, steps: int = 6) -> dict:
    """What `leader train` holds in host memory for this shard set: open, plan, build, train a few steps."""
    import torch

    from benchmarks.harness import peak_rss_mb, proc_status_mb
    from leader.train.config import config_from_dict
    from leader.train.loader import StreamSpec, phase_batches
    from leader.train.loop import Distributed, Trainer
    from leader.train.sources import open_sources

    torch.set_num_threads(1)
    baseline = proc_status_mb("VmRSS")            # after the imports: what any torch process holds
    cfg = config_from_dict({
        "model": {"name": "resnet18", "image_size": 32, "head_hidden": 32,
                  "kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16], "stem_width": 8}},
        "data": {"shards": [str(root)], "batch_size": 16, "num_workers": 0, "shuffle_buffer": 64},
        "phases": [{"name": "pairs", "stream": "pairs", "branches": list(TEACHERS), "steps": 100}],
        "run": {"device": "cpu"},
    })
    start = time.perf_counter()
    sources = open_sources(cfg.data.shards, cfg.data.caches, cfg.teachers())
    spec = StreamSpec.for_phase(sources, cfg.phases[0], cfg, world_size=1)
    open_seconds = time.perf_counter() - start
    trainer = Trainer(cfg, {t: DIM for t in TEACHERS}, sources.patch_size(), torch.device("cpu"))
    net = trainer.net(list(TEACHERS), Distributed())
    stream = phase_batches(spec, 0, 0, 1)
    for _ in range(steps):
        trainer.optimizer_step(net, stream, Distributed())
    stream.close()
    return {"n_items": sources.sets[0].manifest.n_items, "baseline_rss_mb": round(baseline, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "open_and_plan_s": round(open_seconds, 3),
            "tuples_per_epoch": spec.tuples_per_epoch}


def measure(roots: list[Path]) -> list[dict]:
    """Run the trainer child over the sets in the given (ascending) order; one result per set."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "LEADER_PROGRESS": "0"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--child", *map(str, roots)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise LeaderError(f"scale: the trainer process failed:\n{done.stderr[-2000:]}")
    return [json.loads(line) for line in done.stdout.strip().splitlines()[-len(roots):]]


def run(ctx: Context) -> list[Figure]:
    sizes = sorted(ctx.profile.scale_items)
    roots = [ctx.workdir / f"scale-{n}" for n in sizes]
    for n, root in zip(sizes, roots):
        start = time.perf_counter()
        write_synthetic_cache(write_synthetic_set(root, n))
        ctx.log(f"scale: wrote a {n}-item shard set and cache in {time.perf_counter() - start:.1f}s")
    try:
        results = dict(zip(sizes, measure(roots)))
    finally:
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)
    for n, r in results.items():
        ctx.log(f"scale: {n} items: {r}")
    base = sizes[0]
    detail = {f"peak_rss_mb_{n}_items": r["peak_rss_mb"] for n, r in results.items()}
    detail.update({f"open_and_plan_s_{n}_items": r["open_and_plan_s"] for n, r in results.items()})
    detail["baseline_rss_mb"] = results[base]["baseline_rss_mb"]
    return [Figure("scale", f"trainer peak RSS, {n:,} / {base:,} items", results[n]["peak_rss_mb"] / results[base]["peak_rss_mb"],
                   detail, note=f"{results[n]['peak_rss_mb']:.0f} vs {results[base]['peak_rss_mb']:.0f} MB; must stay flat")
            for n in results if n != base]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=Path, nargs="+", required=True,
                        help="shard sets to open as the trainer would, smallest first")
    args = parser.parse_args(argv)
    for root in args.child:
        print(json.dumps(trainer_child(root)), flush=True)


if __name__ == "__main__":
    main()
