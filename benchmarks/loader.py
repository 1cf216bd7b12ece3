"""Our loader vs the official code's loader: samples/s delivered to the student, by DataLoader workers.

    ours      shards at the stored size -> cache-block join -> decode -> batch (DataLoader workers),
              then the views replayed at the student's resolution on the device
    official  original-size image file -> RGB -> torchvision augmentations -> resize, plus one .npy
              target per sample (DataLoader workers), then copied to the device

Both end with the same thing: a batch of student-resolution pixels and its targets on the device.
Each is timed over one epoch of the same images, after the first round of batches (worker start-up
and the shuffle buffer's fill are not steady state).
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

import torch

from benchmarks.harness import Context, Figure, synchronize
from benchmarks.official import official_loader
from leader.train.loader import StreamSpec, phase_batches
from leader.train.sources import open_sources
from leader.train.step import StudentInput


def steady_rate(batches: Iterator, deliver: Callable[[object], object], n_batches: int, skip: int,
                batch_size: int, device: torch.device) -> float:
    """Samples/s over batches [skip, n_batches) of an epoch, each delivered to the device."""
    start = None
    for i, batch in enumerate(batches):
        if i == skip:
            synchronize(device)
            start = time.perf_counter()
        deliver(batch)
        if i + 1 == n_batches:
            break
    synchronize(device)
    return (n_batches - skip) * batch_size / (time.perf_counter() - start)


def skip_for(workers: int, n_batches: int) -> int:
    return min(max(1, workers), n_batches // 2)


def ours_rate(ctx: Context, workers: int) -> float:
    work, cuda = ctx.workload, ctx.device.type == "cuda"
    cfg = work.train_config(num_workers=workers, batch_size=ctx.profile.loader_batch_size)
    sources = open_sources(cfg.data.shards, cfg.data.caches, cfg.teachers())
    spec = StreamSpec.for_phase(sources, cfg.phases[0], cfg, world_size=1)
    student_input = StudentInput.from_config(cfg.model, sources.patch_size(), cfg.run.channels_last)

    def deliver(item):
        _, batch = item
        targets = {k: v.to(ctx.device, non_blocking=True) for k, v in batch["targets"].items()}
        return student_input.render(batch, ctx.device), targets

    stream = phase_batches(spec, 0, 0, 1, pin_memory=cuda)
    n = spec.batches_per_epoch
    try:
        return steady_rate(stream, deliver, n, skip_for(workers, n), spec.batch_size, ctx.device)
    finally:
        stream.close()


def official_rate(ctx: Context, workers: int) -> float:
    p, work, cuda = ctx.profile, ctx.workload, ctx.device.type == "cuda"
    loader = official_loader(work.training_images(), work.official_targets, p.student.input_size, p.loader_batch_size,
                             workers, pin_memory=cuda)

    def deliver(batch):
        pixels, targets, _ = batch
        return pixels.to(ctx.device, non_blocking=True), targets.to(ctx.device, non_blocking=True)

    n = len(loader)
    return steady_rate(iter(loader), deliver, n, skip_for(workers, n), p.loader_batch_size, ctx.device)


def replay_share(ctx: Context) -> float:
    """Seconds per sample that replaying the views takes, on one batch already decoded (for the note)."""
    work = ctx.workload
    cfg = work.train_config(num_workers=0)
    sources = open_sources(cfg.data.shards, cfg.data.caches, cfg.teachers())
    spec = StreamSpec.for_phase(sources, cfg.phases[0], cfg, world_size=1)
    stream = phase_batches(spec, 0, 0, 1)
    _, batch = next(stream)
    stream.close()
    student_input = StudentInput.from_config(cfg.model, sources.patch_size(), cfg.run.channels_last)
    image = batch["image"].to(ctx.device)
    batch = dict(batch, image=image)
    student_input.render(batch, ctx.device)
    synchronize(ctx.device)
    start = time.perf_counter()
    student_input.render(batch, ctx.device)
    synchronize(ctx.device)
    return (time.perf_counter() - start) / len(batch["keys"])


def run(ctx: Context) -> list[Figure]:
    p = ctx.profile
    ours, theirs = {}, {}
    for workers in p.loader_workers:
        ours[workers] = ours_rate(ctx, workers)
        theirs[workers] = official_rate(ctx, workers)
        ctx.log(f"loader: {workers} worker(s): ours {ours[workers]:.1f}, official {theirs[workers]:.1f} samples/s")
    replay_ms = replay_share(ctx) * 1000
    detail = {**{f"ours_samples_per_s_{w}_workers": round(r, 1) for w, r in ours.items()},
              **{f"official_samples_per_s_{w}_workers": round(r, 1) for w, r in theirs.items()},
              "view_replay_ms_per_sample": round(replay_ms, 3), "original_px": p.original_size,
              "stored_px": p.stored_size, "student_px": p.student.input_size, "batch": p.loader_batch_size}
    figures = [Figure("loader", f"ours / official samples/s, {w} worker(s)", ours[w] / theirs[w], detail,
                      note=f"{ours[w]:.0f} vs {theirs[w]:.0f} samples/s")
               for w in p.loader_workers]
    lo, hi = min(p.loader_workers), max(p.loader_workers)
    if lo != hi:
        for name, rates in (("ours", ours), ("official", theirs)):
            figures.append(Figure("loader", f"{name}: {hi} / {lo} worker(s) samples/s", rates[hi] / rates[lo], detail,
                                  note="scaling with workers"))
    return figures
