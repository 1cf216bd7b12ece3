"""The data and models every benchmark of a run shares, built once, lazily, under one directory.

    work = Workload(Path("/tmp/bench/workload"), CPU_QUICK, torch.device("cpu"))
    work.originals            # images/NNNNNN.png at the original size + labels.csv + train.csv
    work.shards               # train.csv built into shards at the stored size (csv adapter)
    work.cache                # both teachers precomputed into the Zarr cache beside the shards
    work.official_targets     # targets/<stem>.npy: the disease teacher's view-0 embedding per image
    trainer = work.trainer()  # leader train's Trainer: the student, its optimizer and one training step

The images are phantom radiographs written as ordinary PNG files, so every path reads real files:
the csv adapter, the builder, the official code's Dataset. Only `distinct_images` are rendered and
the folder repeats them, because rendering is not what any benchmark times.
"""
from __future__ import annotations

import csv
import functools
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch
from PIL import Image

from benchmarks.profiles import ModelSpec, Profile
from leader.errors import LeaderError
from leader.precompute.cache import TeacherCache
from leader.precompute.run import CacheLayout, Execution, PrecomputeResult, precompute
from leader.precompute.teachers import Teacher, create_teacher
from leader.shards.builder import BuildSettings, build_shards
from leader.shards.layout import default_cache_path, iter_shard_metas
from leader.shards.manifest import Manifest
from leader.shards.phantom import PhantomConfig, generate_case, phantom_index
from leader.train.config import TrainConfig, config_from_dict
from leader.train.loop import Distributed, StepResult, Trainer

SEED = 0
TEACHER_ROLES = ("disease", "anatomy")


def write_image_folder(folder: Path, n: int, size: int, distinct: int, seed: int = SEED) -> Path:
    """`n` phantom PNGs at `size` px in folder/images, listed with their findings in labels.csv."""
    config = PhantomConfig(size=size)
    renders = []
    for image_id, _, _ in phantom_index(distinct, seed, config):
        case = generate_case(image_id, seed, config)
        positives = [name for name, value in case.labels.items() if value == 1]
        renders.append((dataset_png(case.image), "|".join(positives), case.patient_id))
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        png, labels, patient = renders[i % len(renders)]
        path = f"images/{i:06d}.png"
        (folder / path).write_bytes(png)
        rows.append({"path": path, "labels": labels, "patient_id": f"{patient}-{i // len(renders)}", "split": "train"})
    write_csv(folder / "labels.csv", rows)
    return folder


def dataset_png(image: np.ndarray) -> bytes:
    """A PNG as public datasets ship them: Pillow's default writer, which picks a filter per row
    (leader's shards use one filter, which decodes faster; the originals must not get that for free)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "labels", "patient_id", "split"])
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def build_from_folder(folder: Path, out: Path, profile: Profile, workers: int, csv_name: str) -> Manifest:
    """The shards `leader shards build csv --root folder --size <stored> --workers N` would write."""
    settings = BuildSettings(dataset="csv", root=str(folder), size=profile.stored_size,
                             shard_size=profile.shard_size, seed=SEED, options={"csv_path": csv_name})
    return build_shards(settings, out, workers=workers, overwrite=True)


def save_random_weights(spec: ModelSpec, path: Path) -> Path:
    """A timm network's seeded random weights as a checkpoint file, the way a teacher is shipped."""
    if not path.exists():
        torch.manual_seed(SEED)
        torch.save(timm.create_model(spec.arch, num_classes=0, **spec.kwargs).state_dict(), path)
    return path


@dataclass
class BenchTrainer:
    """`leader train`'s own Trainer and the net of its branches: what every training benchmark times."""

    trainer: Trainer
    net: torch.nn.Module              # the branches' view of the student (backbone + active heads)

    @property
    def config(self) -> TrainConfig:
        return self.trainer.cfg

    def train_step(self, batch: dict) -> StepResult:
        """One optimizer step of the trainer on this batch: loss, backward, clip, AdamW."""
        return self.trainer.optimizer_step(self.net, iter([(0, batch)]), Distributed())


class Workload:
    def __init__(self, root: Path, profile: Profile, device: torch.device, log: Callable[[str], None] = print):
        self.root, self.profile, self.device, self.log = Path(root), profile, device, log
        self.root.mkdir(parents=True, exist_ok=True)
        self.precompute_results: dict[str, PrecomputeResult] = {}

    # ---- data --------------------------------------------------------------------------------
    @functools.cached_property
    def originals(self) -> Path:
        """The image folder: labels.csv lists build_images files, train.csv the first train_images."""
        p = self.profile
        folder = self.root / "originals"
        start = time.perf_counter()
        write_image_folder(folder, max(p.build_images, p.train_images), p.original_size, p.distinct_images)
        write_csv(folder / "train.csv", read_csv(folder / "labels.csv")[:p.train_images])
        self.log(f"workload: {max(p.build_images, p.train_images)} original {p.original_size}px PNGs "
                 f"({p.distinct_images} distinct renders) in {time.perf_counter() - start:.1f}s")
        return folder

    @functools.cached_property
    def shards(self) -> Path:
        out = self.root / "shards"
        start = time.perf_counter()
        manifest = build_from_folder(self.originals, out, self.profile, workers=max(self.profile.build_workers),
                                     csv_name="train.csv")
        self.log(f"workload: {manifest.n_samples} images in {len(manifest.shards)} shards at "
                 f"{self.profile.stored_size}px in {time.perf_counter() - start:.1f}s")
        return out

    @functools.cached_property
    def teachers(self) -> dict[str, Teacher]:
        """The two teachers, random weights loaded through leader's timm teacher adapter."""
        out = {}
        for role in TEACHER_ROLES:
            spec: ModelSpec = getattr(self.profile, role)
            checkpoint = save_random_weights(spec, self.root / f"{role}-{spec.arch}.pt")
            out[role] = create_teacher("timm", model=checkpoint, device=str(self.device), arch=spec.arch,
                                       input_size=spec.input_size or self.profile.stored_size)
        return out

    @functools.cached_property
    def cache(self) -> Path:
        """Both teachers precomputed over every item and view: `leader precompute`, twice."""
        path = default_cache_path(self.shards)
        for role, teacher in self.teachers.items():
            result = precompute(self.shards, role, teacher, path, CacheLayout(views=self.profile.n_views, seed=SEED),
                                Execution(batch_size=self.profile.precompute_batch, device=str(self.device)))
            self.precompute_results[role] = result
            self.log(f"workload: precomputed {role} ({teacher.preprocessing['arch']}, {teacher.dim}-d) "
                     f"{result.views} views in {result.seconds:.1f}s")
        return path

    @functools.cached_property
    def official_targets(self) -> Path:
        """<image stem>.npy per image, 1-D: the official code's CXR-FM targets (un-augmented view 0)."""
        out = self.root / "official-targets"
        out.mkdir(exist_ok=True)
        cache = TeacherCache.open(self.cache)
        manifest = Manifest.load(self.shards)
        for shard in manifest.shards:
            a, b = shard.rows
            block = cache.read_block("disease", a, b)
            for meta in iter_shard_metas(manifest.root / shard.name):
                row = meta["rows"][0] - a
                np.save(out / f"{Path(meta['image_id']).name}.npy", block[row, 0].astype(np.float32))
        return out

    def training_images(self) -> list[Path]:
        """The original files of the images in the training shard set, in CSV order."""
        return [self.originals / row["path"] for row in read_csv(self.originals / "train.csv")]

    # ---- the student -------------------------------------------------------------------------
    def train_config(self, num_workers: int = 0, branches: tuple[str, ...] = TEACHER_ROLES,
                     batch_size: int | None = None, compile: bool = False) -> TrainConfig:
        p, cuda = self.profile, self.device.type == "cuda"
        batch_size = batch_size or p.batch_size
        return config_from_dict({
            "seed": SEED, "target_norm": "l2",
            "model": {"name": p.student.arch, "image_size": p.student.input_size, "kwargs": dict(p.student.kwargs),
                      "head_hidden": 2048 if cuda else 128},
            "data": {"shards": [str(self.shards)], "caches": [str(self.cache)], "batch_size": batch_size,
                     "num_workers": num_workers, "shuffle_buffer": 4 * batch_size},
            "phases": [{"name": "images", "stream": "images", "datasets": "all", "branches": list(branches),
                        "steps": 10_000}],
            "run": {"device": self.device.type, "precision": "bf16", "channels_last": cuda, "compile": compile},
        }, where="benchmark config")

    def trainer(self, branches: tuple[str, ...] = TEACHER_ROLES, batch_size: int | None = None,
                compile: bool = False) -> BenchTrainer:
        """A fresh Trainer (the same seed, so the same initial weights every time); `compile`:
        run.compile, torch.compile of the student."""
        cfg = self.train_config(branches=branches, batch_size=batch_size, compile=compile)
        head_dims = {role: self.teachers[role].dim for role in branches}
        trainer = Trainer(cfg, head_dims, TeacherCache.open(self.cache).patch_size, self.device)
        return BenchTrainer(trainer, trainer.net(list(branches), Distributed()))


def require_cuda(device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LeaderError("--device cuda, but torch sees no CUDA device")
