"""Input-bound overhead: step time of the full pipeline / step time on batches already on the device.

The full pipeline is the trainer's: shards and cache blocks streamed by DataLoader workers (pinned
memory on CUDA), the host-to-device copy, view replay and the training step. The reference is the
same student stepping on batches that were put on the device beforehand. 1.0 means the input
pipeline costs nothing; the goal on a GPU is at most 1.05.
"""
from __future__ import annotations

import itertools
import time

from benchmarks.harness import Context, Figure, median, step_times, synchronize
from benchmarks.step_rate import device_batches
from leader.train.loader import StreamSpec, phase_batches
from leader.train.sources import open_sources


def pipeline_step_seconds(ctx: Context, trainer) -> tuple[float, int]:
    """Mean seconds per step over the steady part of one epoch of the real pipeline, and the step count."""
    work, p = ctx.workload, ctx.profile
    cfg = work.train_config(num_workers=p.pipeline_workers)
    sources = open_sources(cfg.data.shards, cfg.data.caches, cfg.teachers())
    spec = StreamSpec.for_phase(sources, cfg.phases[0], cfg, world_size=1)
    n = spec.batches_per_epoch
    skip = min(max(1, p.pipeline_workers), n // 2)
    stream = phase_batches(spec, 0, 0, 1, pin_memory=ctx.device.type == "cuda")
    start = None
    try:
        for i, (_, batch) in enumerate(itertools.islice(stream, n)):
            if i == skip:
                synchronize(ctx.device)
                start = time.perf_counter()
            trainer.train_step(batch)
        synchronize(ctx.device)
    finally:
        stream.close()
    return (time.perf_counter() - start) / (n - skip), n - skip


def run(ctx: Context) -> list[Figure]:
    p = ctx.profile
    trainer = ctx.workload.trainer()
    resident = itertools.cycle(device_batches(ctx, 4))
    on_device = median(step_times(lambda: trainer.train_step(next(resident)), ctx.device, p.warmup_steps,
                                  p.timed_steps))
    pipeline, steps = pipeline_step_seconds(ctx, trainer)
    ctx.log(f"overhead: {pipeline * 1000:.1f} ms/step through the pipeline, {on_device * 1000:.1f} ms on device batches")
    detail = {"pipeline_ms_per_step": round(pipeline * 1000, 2), "device_resident_ms_per_step": round(on_device * 1000, 2),
              "pipeline_steps_timed": steps, "workers": p.pipeline_workers, "batch": p.batch_size}
    return [Figure("overhead", f"pipeline / device-resident step time, {p.pipeline_workers} worker(s)",
                   pipeline / on_device, detail, note="goal on a GPU: <= 1.05")]
