"""Input-bound overhead: step time of the full pipeline / step time on batches already on the device.

The full pipeline is the trainer's: shards and cache blocks streamed by DataLoader workers (pinned
memory on CUDA), the host-to-device copy, view replay and the training step. The reference is the
same student stepping on batches that were put on the device beforehand. 1.0 means the input
pipeline costs nothing; the goal on a GPU is at most 1.05.

The pipeline runs several epochs, each step timed alone. The figure is the median step, which is
the steady state; a second figure gives the mean, which adds each epoch's worker start-up. That
start-up weighs far more on a benchmark's epoch of a thousand images than on a real one of a million.
"""
from __future__ import annotations

import itertools
import statistics
import time

from benchmarks.harness import Context, Figure, median, step_times, synchronize
from benchmarks.step_rate import device_batches
from leader.train.loader import StreamSpec, phase_batches
from leader.train.sources import open_sources


def pipeline_step_times(ctx: Context, trainer) -> list[float]:
    """Seconds per step of the real pipeline over `overhead_epochs` epochs: waiting for the batch,
    then the step, synchronised after each step as leader's loop is (it reads the loss and the
    gradient norm every step)."""
    work, p = ctx.workload, ctx.profile
    cfg = work.train_config(num_workers=p.pipeline_workers)
    sources = open_sources(cfg.data.shards, cfg.data.caches, cfg.teachers())
    spec = StreamSpec.for_phase(sources, cfg.phases[0], cfg, world_size=1)
    stream = phase_batches(spec, 0, 0, 1, pin_memory=ctx.device.type == "cuda")
    times = []
    try:
        last = time.perf_counter()
        for _, batch in itertools.islice(stream, p.overhead_epochs * spec.batches_per_epoch):
            trainer.train_step(batch)
            synchronize(ctx.device)
            now = time.perf_counter()
            times.append(now - last)
            last = now
    finally:
        stream.close()
    return times


def run(ctx: Context) -> list[Figure]:
    p = ctx.profile
    trainer = ctx.workload.trainer()
    resident = itertools.cycle(device_batches(ctx, 4))
    on_device = median(step_times(lambda: trainer.train_step(next(resident)), ctx.device, p.warmup_steps,
                                  p.timed_steps))
    times = pipeline_step_times(ctx, trainer)
    steady = times[max(1, p.pipeline_workers):]           # past the first round: the workers' start-up
    pipeline, mean = median(steady), statistics.fmean(steady)
    ctx.log(f"overhead: {pipeline * 1000:.1f} ms/step through the pipeline (median; mean {mean * 1000:.1f} with "
            f"each epoch's start), {on_device * 1000:.1f} ms on device batches")
    detail = {"pipeline_ms_per_step": round(pipeline * 1000, 2), "pipeline_mean_ms_per_step": round(mean * 1000, 2),
              "device_resident_ms_per_step": round(on_device * 1000, 2), "pipeline_steps_timed": len(steady),
              "epochs": p.overhead_epochs, "workers": p.pipeline_workers, "batch": p.batch_size}
    return [
        Figure("overhead", f"pipeline / device-resident step time, {p.pipeline_workers} worker(s)",
               pipeline / on_device, detail, note="median step; goal on a GPU: <= 1.05"),
        Figure("overhead", "pipeline mean / device-resident step time, epoch starts included",
               mean / on_device, detail,
               note=f"{len(steady)} steps over {p.overhead_epochs} epochs of {p.train_images} images; "
                    "each epoch starts its workers anew"),
    ]
