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


def pipeline_step_times(ctx: Context, trainer, workers: int, pin_memory: bool) -> list[tuple[float, float]]:
    """(seconds waiting for the batch, seconds of the step) for every step of the real pipeline over
    `overhead_epochs` epochs, synchronised after each step so that each step's time is its own
    (leader's loop waits for the device at log steps only; end_to_end times a pipeline that way).
    The split says whether the input is late or the step is slowed."""
    work, p = ctx.workload, ctx.profile
    cfg = work.train_config(num_workers=workers)
    sources = open_sources(cfg.data.shards, cfg.data.caches, cfg.teachers())
    spec = StreamSpec.for_phase(sources, cfg.phases[0], cfg, world_size=1)
    stream = phase_batches(spec, 0, 0, 1, pin_memory=pin_memory)
    times = []
    try:
        for _ in range(p.overhead_epochs * spec.batches_per_epoch):
            start = time.perf_counter()
            _, batch = next(stream)
            got = time.perf_counter()
            trainer.train_step(batch)
            synchronize(ctx.device)
            times.append((got - start, time.perf_counter() - got))
    finally:
        stream.close()
    return times


def pipeline_figures(ctx: Context, on_device: float, workers: int, pin_memory: bool, headline: bool,
                     times: list[tuple[float, float]]) -> list[Figure]:
    p = ctx.profile
    steady = times[max(1, workers):]                    # past the first round: the workers' start-up
    totals = [wait + step for wait, step in steady]
    pipeline, mean = median(totals), statistics.fmean(totals)
    wait, step = median([w for w, _ in steady]), median([s for _, s in steady])
    how = f"{workers} worker(s){', pinned' if pin_memory else ''}"
    ctx.log(f"overhead: {how}: {pipeline * 1000:.1f} ms/step through the pipeline (median: {wait * 1000:.1f} waiting "
            f"for the batch, {step * 1000:.1f} stepping; mean {mean * 1000:.1f} with each epoch's start), "
            f"{on_device * 1000:.1f} ms on device batches")
    detail = {"pipeline_ms_per_step": round(pipeline * 1000, 2), "pipeline_mean_ms_per_step": round(mean * 1000, 2),
              "wait_for_batch_ms": round(wait * 1000, 2), "step_after_batch_ms": round(step * 1000, 2),
              "device_resident_ms_per_step": round(on_device * 1000, 2), "pipeline_steps_timed": len(steady),
              "epochs": p.overhead_epochs, "workers": workers, "pin_memory": pin_memory, "batch": p.batch_size}
    figures = [Figure("overhead", f"pipeline / device-resident step time, {how}", pipeline / on_device, detail,
                      note=f"median step; {wait * 1000:.1f} ms of it waiting for the batch"
                           + ("; goal on a GPU: <= 1.05" if headline else ""))]
    if headline:
        figures.append(Figure("overhead", "pipeline step / the same step without its wait for the batch",
                              pipeline / step, detail,
                              note="the input's own share, free of the step time's drift between measurements"))
        figures.append(Figure("overhead", "pipeline mean / device-resident step time, epoch starts included",
                              mean / on_device, detail,
                              note=f"{len(steady)} steps over {p.overhead_epochs} epochs of {p.train_images} images; "
                                   "each epoch starts its workers anew"))
    return figures


def run(ctx: Context) -> list[Figure]:
    p, cuda = ctx.profile, ctx.device.type == "cuda"
    trainer = ctx.workload.trainer()
    resident = itertools.cycle(device_batches(ctx, 4))
    before = step_times(lambda: trainer.train_step(next(resident)), ctx.device, p.warmup_steps, p.timed_steps)
    runs = [(p.pipeline_workers, cuda, True)] + [(w, pin and cuda, False) for w, pin in p.overhead_sweep]
    timed = [(workers, pin, headline, pipeline_step_times(ctx, trainer, workers, pin))
             for workers, pin, headline in runs]
    # The reference is timed before and after the pipelines: on the H200 the same step drifted
    # between 78 and 101 ms over one run, so one side's samples alone would carry that drift.
    after = step_times(lambda: trainer.train_step(next(resident)), ctx.device, 0, p.timed_steps)
    on_device = median(before + after)
    ctx.log(f"overhead: device-resident step {median(before) * 1000:.1f} ms before the pipelines, "
            f"{median(after) * 1000:.1f} ms after")
    figures = []
    for workers, pin, headline, times in timed:
        figures += pipeline_figures(ctx, on_device, workers, pin, headline, times)
    return figures
