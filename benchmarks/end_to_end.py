"""End to end, both sides whole: images/s of leader's training against the official code's way.

    ours      leader train's stream (shards + cache blocks, `pipeline_workers` DataLoader workers,
              pinned memory on CUDA) -> the views replayed on the device -> the Trainer's step
    official  the official-style per-file loader (original image files, torchvision augmentations
              at full size, one .npy disease target per image; the same workers) -> the anatomy
              teacher run on the batch -> the same Trainer's step

Both train a fresh copy of the same student (same seed, same loss and target normalisation, the
same optimizer step: clipping and AdamW), one epoch of the same training images per round, the
sides alternating round by round so that drift is shared. An epoch is timed from its first batch
after the first round of workers' batches (their start-up, as in the loader benchmark) to its last
step, with the device synchronised at those two points only, as leader's loop waits for the device
only at log steps; the host's time per step is split into waiting for the batch and stepping (on
a GPU, stepping is launching, or waiting once the device's queue is full). A second figure counts
whole epochs, start-up included. Both sides take as many images per epoch, all from the
training set (tests/test_benchmarks.py checks the sets of images seen).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

from benchmarks.harness import Context, Figure, synchronize
from benchmarks.loader import skip_for
from benchmarks.official import official_loader
from leader.precompute.teachers import Teacher
from leader.shards.layout import iter_shard_metas
from leader.shards.manifest import Manifest
from leader.train.loader import StreamSpec, phase_batches
from leader.train.sources import open_sources
from leader.train.step import DistillationStep


class OfficialStep:
    """The forward and loss of a step the official way, in the Trainer's place for its DistillationStep.

    The student sees the loader's pixels as they come (ImageNet-normalised RGB at its input size);
    the disease target is the .npy that came with them; the anatomy target is the teacher's
    embedding of the same pixels, computed now. Loss and target normalisation are ours, so the two
    sides differ only in where pixels and targets come from.
    """

    def __init__(self, ours: DistillationStep, anatomy: Teacher, device: torch.device, channels_last: bool):
        self.ours, self.anatomy, self.device, self.channels_last = ours, anatomy, device, channels_last

    def autocast(self):
        dtype = self.ours.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def anatomy_targets(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-1] != self.anatomy.input_size:
            pixels = F.interpolate(pixels, size=(self.anatomy.input_size,) * 2, mode="bilinear", antialias=True)
        with torch.no_grad(), self.autocast():
            return self.anatomy.net(pixels).float()

    def __call__(self, net: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pixels = batch["pixels"].to(self.device, non_blocking=True)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        targets = {"disease": batch["disease"].to(self.device, non_blocking=True),
                   "anatomy": self.anatomy_targets(pixels)}
        valid = torch.ones(pixels.shape[0], dtype=torch.bool, device=self.device)
        with self.autocast():
            outputs = net(pixels)
        parts = {f"{name}/image": self.ours.branch_loss(self.ours.norm.predictions(out),
                                                        self.ours.norm.targets(name, targets[name]), valid)
                 for name, out in outputs.items()}
        return torch.stack(list(parts.values())).sum(), parts


@dataclass
class Side:
    """One side's epochs: timed images and seconds, waiting and stepping, and the images it saw."""

    images: int = 0
    seconds: float = 0.0
    whole_images: int = 0
    whole_seconds: float = 0.0
    wait: float = 0.0
    step: float = 0.0
    seen: list[list[str]] = field(default_factory=list)      # per epoch, the image stems in order

    def epoch(self, batches: Iterable[tuple[list[str], dict]], train_step, n_batches: int, skip: int,
              device: torch.device) -> None:
        stems: list[str] = []
        began = time.perf_counter()
        start = began
        batches = iter(batches)
        for i in range(n_batches):
            if i == skip:
                synchronize(device)
                start = time.perf_counter()
            asked = time.perf_counter()
            names, batch = next(batches)
            got = time.perf_counter()
            train_step(batch)
            if i >= skip:
                self.wait += got - asked
                self.step += time.perf_counter() - got
            stems += names
        synchronize(device)
        end = time.perf_counter()
        self.images += (n_batches - skip) * (len(stems) // n_batches)
        self.seconds += end - start
        self.whole_images += len(stems)
        self.whole_seconds += end - began
        self.seen.append(stems)

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    @property
    def whole_rate(self) -> float:
        return self.whole_images / self.whole_seconds


def stems_by_key(shards: Path) -> dict[str, str]:
    """Our sample keys -> the stems of the original files they were built from."""
    manifest = Manifest.load(shards)
    return {meta["key"]: Path(meta["image_id"]).name for shard in manifest.shards
            for meta in iter_shard_metas(manifest.path(shard.name))}


def run(ctx: Context) -> list[Figure]:
    p, work, cuda = ctx.profile, ctx.workload, ctx.device.type == "cuda"
    workers = p.pipeline_workers
    cfg = work.train_config(num_workers=workers)
    sources = open_sources(cfg.data.shards, cfg.data.caches, cfg.teachers())
    spec = StreamSpec.for_phase(sources, cfg.phases[0], cfg, world_size=1)
    stem_of = stems_by_key(work.shards)

    ours_trainer, their_trainer = work.trainer(), work.trainer()
    their_trainer.trainer.step = OfficialStep(their_trainer.trainer.step, work.teachers["anatomy"], ctx.device,
                                              cfg.run.channels_last)
    ours, theirs = Side(), Side()
    for r in range(p.end_to_end_rounds):
        stream = phase_batches(spec, r * spec.batches_per_epoch, 0, 1, pin_memory=cuda)
        try:
            ours.epoch((([stem_of[k] for k in batch["keys"]], batch) for _, batch in stream), ours_trainer.train_step,
                       spec.batches_per_epoch, skip_for(workers, spec.batches_per_epoch), ctx.device)
        finally:
            stream.close()
        loader = official_loader(work.training_images(), work.official_targets, p.student.input_size, p.batch_size,
                                 workers, pin_memory=cuda, seed=r)
        theirs.epoch(((list(stems), {"keys": list(stems), "pixels": pixels, "disease": targets})
                      for pixels, targets, stems in loader), their_trainer.train_step, len(loader),
                     skip_for(workers, len(loader)), ctx.device)
        ctx.log(f"end_to_end: round {r + 1}: ours {ours.rate:.1f}, official {theirs.rate:.1f} images/s so far")
    # The official loader takes every image once per epoch; ours too, but for its shuffle buffer's
    # look-ahead into the next cycle of its shards (see tests/test_benchmarks.py).
    distinct = min(len(set(stems)) for stems in ours.seen)
    ctx.shared["end_to_end"] = {"ours": ours.seen, "official": theirs.seen}
    detail = {"ours_images_per_s": round(ours.rate, 2), "official_images_per_s": round(theirs.rate, 2),
              "ours_whole_epoch_images_per_s": round(ours.whole_rate, 2),
              "official_whole_epoch_images_per_s": round(theirs.whole_rate, 2),
              "ours_wait_ms_per_step": round(ours.wait / (ours.images / p.batch_size) * 1000, 2),
              "ours_step_ms": round(ours.step / (ours.images / p.batch_size) * 1000, 2),
              "official_wait_ms_per_step": round(theirs.wait / (theirs.images / p.batch_size) * 1000, 2),
              "official_step_ms": round(theirs.step / (theirs.images / p.batch_size) * 1000, 2),
              "workers": workers, "batch": p.batch_size, "epochs_per_side": p.end_to_end_rounds,
              "images_per_epoch": len(ours.seen[0]), "ours_distinct_images_per_epoch": distinct,
              "student": f"{p.student.arch}@{p.student.input_size}", "anatomy": p.anatomy.arch}
    ctx.log(f"end_to_end: ours {ours.rate:.1f} images/s (waiting {detail['ours_wait_ms_per_step']} ms, stepping "
            f"{detail['ours_step_ms']} ms per step), official {theirs.rate:.1f} (waiting "
            f"{detail['official_wait_ms_per_step']} ms, stepping {detail['official_step_ms']} ms)")
    return [
        Figure("end_to_end", f"ours / official images/s, whole pipelines, {workers} worker(s)", ours.rate / theirs.rate,
               detail, note=f"{ours.rate:.0f} vs {theirs.rate:.0f} images/s; per step {detail['ours_wait_ms_per_step']}"
                            f" vs {detail['official_wait_ms_per_step']} ms waiting for the batch"),
        Figure("end_to_end", "ours / official images/s, whole epochs with worker start-up", ours.whole_rate / theirs.whole_rate,
               detail, note=f"{p.end_to_end_rounds} epoch(s) of {len(ours.seen[0])} images per side"),
    ]
