"""Cached vs online distillation: training steps/s of one student on one batch, three ways.

    leader     targets read from the cache with the batch (both teachers precomputed)
    official   disease targets from per-image .npy files (they arrive with the batch, as ours do)
               and the anatomy teacher run online on the step's views, as the official code does
    online     both teachers run online every step

All three train the same student on the same batches, already on the device; only where the
targets come from differs. They are timed in rounds, one step of each per round. The online teachers run in eval mode without gradients (the official
code leaves Adam in train mode, which costs the same forward and gives worse targets).
"""
from __future__ import annotations

import contextlib
import itertools

import torch

from benchmarks.harness import Context, Figure, batch_on_device, interleaved_step_times, median
from leader.precompute.teachers import Teacher
from leader.train.loader import StreamSpec, phase_batches
from leader.train.sources import open_sources
from leader.train.step import render_images

CONFIGS = {"leader": (), "official": ("anatomy",), "online": ("disease", "anatomy")}


class OnlineTargets:
    """Teachers run inside the training step, on the very views the student sees."""

    def __init__(self, teachers: dict[str, Teacher], device: torch.device):
        self.teachers, self.device = teachers, device

    def embed(self, role: str, batch: dict) -> torch.Tensor:
        teacher = self.teachers[role]
        pixels = render_images(batch["image"], batch["image_hw"], batch["image_params"], teacher.input_size)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            return teacher.net(teacher.preprocess(pixels)).float()

    def __call__(self, batch: dict, roles: tuple[str, ...]) -> dict:
        """The batch with the named teachers' targets computed now instead of read from the cache."""
        out = dict(batch, targets=dict(batch["targets"]), valid=dict(batch["valid"]))
        for role in roles:
            out["targets"][role] = self.embed(role, batch)
            out["valid"][role] = torch.ones(len(batch["keys"]), dtype=torch.bool, device=self.device)
        return out


def device_batches(ctx: Context, count: int, batch_size: int | None = None) -> list[dict]:
    """The first `count` batches of the training stream, moved to the device once."""
    work = ctx.workload
    cfg = work.train_config(num_workers=0, batch_size=batch_size)
    sources = open_sources(cfg.data.shards, cfg.data.caches, cfg.teachers())
    spec = StreamSpec.for_phase(sources, cfg.phases[0], cfg, world_size=1)
    stream = phase_batches(spec, 0, 0, 1)
    batches = [batch_on_device(batch, ctx.device) for _, batch in itertools.islice(stream, count)]
    stream.close()
    return batches


def run(ctx: Context) -> list[Figure]:
    p, work = ctx.profile, ctx.workload
    trainer = work.trainer()
    online = OnlineTargets(work.teachers, ctx.device)
    batches = itertools.cycle(device_batches(ctx, 4))
    steps = {name: (lambda roles=roles: trainer.train_step(online(next(batches), roles))) for name, roles in CONFIGS.items()}
    seconds = {name: median(t) for name, t in
               interleaved_step_times(steps, ctx.device, p.warmup_steps, p.timed_steps).items()}
    for name, s in seconds.items():
        ctx.log(f"step_rate: {name}: {1 / s:.2f} steps/s")
    detail = {f"{name}_steps_per_s": round(1 / s, 3) for name, s in seconds.items()}
    detail.update(batch=p.batch_size, student=p.student.arch, student_px=p.student.input_size,
                  disease=f"{p.disease.arch}@{work.teachers['disease'].input_size}",
                  anatomy=f"{p.anatomy.arch}@{work.teachers['anatomy'].input_size}")
    return [
        Figure("step_rate", "cached / official-style step rate", seconds["official"] / seconds["leader"], detail,
               note="official: disease from .npy, anatomy teacher online"),
        Figure("step_rate", "cached / fully online step rate", seconds["online"] / seconds["leader"], detail,
               note="both teachers online every step"),
    ]
