"""Precompute efficiency: views/s of `precompute` divided by the teacher's bare forward rate.

The precompute figure is the workload's own cache build (each teacher over every item and view:
shard reading, PNG decode, view rendering, batching, the forward, the block write). The bare rate is
the same network on batches of the same size, already rendered and on the device. The gap is what
the pipeline around the teacher costs.
"""
from __future__ import annotations

import torch

from benchmarks.harness import Context, Figure, median, step_times
from leader.views import ViewSpec, replay_views, sample_view_params


def bare_forward_rate(teacher, batch_size: int, stored_size: int, device: torch.device, warmup: int,
                      repeats: int) -> float:
    """Views/s of the teacher's network alone, on rendered views already on the device."""
    keys = [f"bare/{i}" for i in range(batch_size)]
    params = sample_view_params(ViewSpec(), 0, keys, 2)[:, 1]
    images = torch.randint(0, 256, (batch_size, 1, stored_size, stored_size), dtype=torch.uint8, device=device)
    pixels = teacher.preprocess(replay_views(images, params, teacher.input_size))

    def forward():
        with torch.inference_mode():
            return teacher.net(pixels)

    return batch_size / median(step_times(forward, device, warmup, repeats))


def run(ctx: Context) -> list[Figure]:
    p, work = ctx.profile, ctx.workload
    work.cache                                                     # builds the cache: the timed precompute
    figures = []
    for role, result in work.precompute_results.items():
        teacher = work.teachers[role]
        pipeline = result.views / result.seconds
        bare = bare_forward_rate(teacher, p.precompute_batch, p.stored_size, ctx.device, 1, max(3, p.timed_steps // 2))
        figures.append(Figure(
            "precompute_rate", f"precompute / bare forward, {role} teacher", pipeline / bare,
            {"precompute_views_per_s": round(pipeline, 2), "bare_forward_views_per_s": round(bare, 2),
             "arch": teacher.preprocessing["arch"], "input_px": teacher.input_size, "views": result.views,
             "batch": p.precompute_batch, "dim": teacher.dim},
            note=f"{pipeline:.0f} vs {bare:.0f} views/s"))
        ctx.log(f"precompute_rate: {role}: {pipeline:.1f} views/s in precompute, {bare:.1f} bare")
    return figures


