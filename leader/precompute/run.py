"""The precompute loop: run one teacher over every item of a shard set, once, into the cache.

    choice = resolve_teacher("anatomy", model="adam_v2.pth")                  # role defaults: kind adam
    with create_teacher(choice.kind, model=choice.model, **choice.options) as teacher:
        result = precompute("shards/phantom", "anatomy", teacher, layout=CacheLayout(views=4))

For each shard this rank owns (shard i belongs to rank i % world_size) and that is not done yet:

    samples -> checked against the cache's keys -> decoded pixels
            -> item views (the image, then its patches; view v from the cache's params), rendered
               for a batch's worth of samples of one image shape at a time
            -> batches grouped by (bit depth, size) -> teacher.embed -> the shard's block
            -> one write of the block -> done[shard] = True

Everything before the teacher runs off its path: DataLoader worker processes read, check and
decode whole shards (and on the CPU render their views), and hand the groups over in shared
memory (pinned on a GPU, where this process renders them); the teacher runs on a thread of its
own, so the next batch is stacked while it works (`Execution`). A batch holds the same views in
either case, so the store is the same bytes with or without workers. Without workers
(`workers=0`), this process reads the shards itself with a few threads decoding ahead.

A shard is the unit of work and of resumption: its block is written whole and its flag only after
the data, so a run killed at any moment resumes by redoing the one shard it was in. RANK and
WORLD_SIZE (as torchrun sets them) split the shards between processes, and because every row's
content depends only on its item and view, any split gives the same store as one process. When the
last shard of a teacher is done, whoever finished it computes the per-dimension mean/std the
trainer's `standardize` target normalisation needs.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from leader.errors import LeaderError
from leader.io import read_yaml_mapping
from leader.precompute.cache import TeacherCache, local_store_path, utc_now
from leader.precompute.locks import teacher_writer
from leader.precompute.teachers import Teacher
from leader.runtime import StopOnSigterm, local_device, torchrun_position
from leader.shards.crop import crop_patch
from leader.shards.manifest import Manifest
from leader.shards.layout import KIND_CODES, SPLIT_CODES, Sample, default_cache_path, iter_shard, iter_shard_metas
from leader.train.loader import WORKER_ERROR, errors_as_items
from leader.views import ViewSpec, replay_views, to_unit_float

log = logging.getLogger(__name__)

ROLE_KINDS = {"disease": "cxr-foundation", "anatomy": "adam"}
MISSING_EXAMPLES = 5


# ---------------------------------------------------------------------------------------------
# Which teacher


@dataclass
class TeacherChoice:
    name: str
    kind: str
    model: str | None
    options: dict = field(default_factory=dict)


def resolve_teacher(name: str, kind: str | None = None, model: str | Path | None = None,
                    options: dict | None = None, config: str | Path | dict | None = None) -> TeacherChoice:
    """The teacher a role stands for: command-line values over the config file over role defaults.

    config: a YAML file (or its dict) with `teachers: {disease: {kind, model, options}, ...}`.
    Roles "disease" and "anatomy" default to cxr-foundation and adam; other names need a kind.
    """
    entry: dict = {}
    if config is not None:
        entry = _config_entry(config, name)
    kind = kind or entry.get("kind") or ROLE_KINDS.get(name)
    if not kind:
        from leader.precompute.teachers import load_all

        raise LeaderError(f"teacher {name!r} has no default kind; pass --kind (one of {', '.join(load_all())}) "
                          f"or give teachers.{name}.kind in --config")
    model = model if model is not None else entry.get("model")
    merged = {**(entry.get("options") or {}), **(options or {})}
    return TeacherChoice(name, kind, str(model) if model is not None else None, merged)


def _config_entry(config: str | Path | dict, name: str) -> dict:
    data = config if isinstance(config, dict) else read_yaml_mapping(config, "--config")
    teachers = data.get("teachers") if isinstance(data, dict) else None
    if teachers is None:
        return {}
    if not isinstance(teachers, dict):
        raise LeaderError(f"config: `teachers` must map teacher names to {{kind, model, options}}, got {type(teachers).__name__}")
    entry = teachers.get(name) or {}
    if not isinstance(entry, dict) or not set(entry) <= {"kind", "model", "options"}:
        raise LeaderError(f"config: teachers.{name} must be a mapping with kind, model and options; got {entry!r}")
    if entry.get("options") is not None and not isinstance(entry["options"], dict):
        raise LeaderError(f"config: teachers.{name}.options must be a mapping, got {entry['options']!r}")
    return entry


# ---------------------------------------------------------------------------------------------
# Rendering: the pixels a teacher sees for each view of each item


def render_sample_views(image: np.ndarray, patch_boxes: Sequence[Sequence[float]], params: np.ndarray, *,
                        image_size: int | None, patch_size: int = 224, patch_out: int | None = None,
                        device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Every view of one sample's items, as the precompute and the audit render them.

    image: the stored 2-D uint8/uint16 image, or the same already in [0, 1] as float32.
    params: (1 + len(patch_boxes), Vt, K), rows in item order. The image is replayed at image_size
    (None: its stored long side); each patch is cut with crop_patch at patch_size first, then
    replayed at patch_out (None: patch_size).
    Returns one (Vt, 1, S, S) float32 tensor per item, image first.
    """
    return render_group_views([image], [patch_boxes], [params], image_size=image_size, patch_size=patch_size,
                              patch_out=patch_out, device=device)[0]


def render_group_views(images: Sequence[np.ndarray] | torch.Tensor, patch_boxes: Sequence[Sequence[Sequence[float]]],
                       params: Sequence[np.ndarray], *, image_size: int | None, patch_size: int = 224,
                       patch_out: int | None = None, device: str | torch.device = "cpu") -> list[list[torch.Tensor]]:
    """render_sample_views for several samples at once: one copy to the device and one replay for
    all their image views, one replay for all their patch views.

    images: the samples' images (one shape and dtype), or the same stacked as one (B, H, W) tensor
    (from a precompute worker, in pinned memory on CUDA, so that the copy does not block).
    A view renders the same alone as in any batch (see warp_affine), so grouping changes no pixel;
    it saves the per-call cost, which dominated the precompute of a fast teacher (one replay call
    per sample). Returns, per sample, what render_sample_views returns.
    """
    n_views = params[0].shape[1]
    stacked = images if isinstance(images, torch.Tensor) else np.stack(images)
    pixels = _unit_pixels(stacked, device)[:, None]                             # (B, 1, H, W)
    size = int(image_size or max(stacked.shape[-2:]))
    image_params = np.stack([p[0] for p in params]).reshape(-1, params[0].shape[-1])
    image_views = replay_views(pixels.repeat_interleave(n_views, dim=0), image_params, size).split(n_views)
    out = [[views] for views in image_views]
    owners, crops, crop_params = [], [], []
    for i, boxes in enumerate(patch_boxes):
        if len(boxes):
            crops.append(crop_patch(pixels[i:i + 1], np.asarray(boxes, dtype=np.float64), int(patch_size)))
            crop_params.append(params[i][1:].reshape(-1, params[i].shape[-1]))   # patch-major, view-minor
            owners += [i] * len(boxes)
    if crops:
        stacked_crops = torch.cat(crops).repeat_interleave(n_views, dim=0)
        patch_views = replay_views(stacked_crops, np.concatenate(crop_params), int(patch_out or patch_size))
        for owner, views in zip(owners, patch_views.split(n_views)):
            out[owner].append(views)
    return out


def _unit_pixels(images: np.ndarray | torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """The images in [0, 1] as float32 on the device. 8-bit pixels travel as bytes (a quarter of the
    copy) and are scaled there; 16-bit ones are scaled on the host, as 16-bit integer tensors have
    few kernels on accelerators. Both give to_unit_float's values. A copy from pinned memory does
    not wait for the device."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images) if images.dtype in (np.uint8, np.float32) else to_unit_float(images)
    if images.dtype == torch.uint8:
        return images.to(device, non_blocking=True).float().div_(255.0)
    return images.to(device, non_blocking=True)


@dataclass
class _Pending:
    pixels: list[torch.Tensor] = field(default_factory=list)
    targets: list[tuple[int, int]] = field(default_factory=list)      # (row in block, view)


class _BlockEmbedder:
    """Batches views across items, grouped by (bit depth, size), and scatters embeddings into a block.

    The batches go to `ahead`, which runs the teacher beside the thread that prepares the next
    batches; a batch holds the same views in the same order either way, so the block is the same.
    """

    def __init__(self, teacher: Teacher, name: str, batch_size: int, block: np.ndarray, keys: list[str],
                 ahead: "_EmbedAhead"):
        self.teacher, self.name, self.batch_size = teacher, name, batch_size
        self.block, self.keys, self.ahead = block, keys, ahead
        self.pending: dict[tuple[int, int], _Pending] = {}
        self.views_done = 0

    def add(self, row: int, views: torch.Tensor, bits: int) -> None:
        for v in range(views.shape[0]):
            group = self.pending.setdefault((bits, views.shape[-1]), _Pending())
            group.pixels.append(views[v])
            group.targets.append((row, v))
            if len(group.pixels) >= self.batch_size:
                self._run(bits, group)

    def flush(self) -> None:
        """Embed what is pending and wait until every batch of this block is in it."""
        for (bits, _), group in self.pending.items():
            if group.pixels:
                self._run(bits, group)
        self.ahead.wait_all()

    def _run(self, bits: int, group: _Pending) -> None:
        batch, targets = torch.stack(group.pixels), list(group.targets)
        self.ahead.submit(lambda: self._embed(batch, bits, targets), lambda out: self._store(targets, out))
        self.views_done += len(targets)
        group.pixels.clear()
        group.targets.clear()

    def _store(self, targets: list[tuple[int, int]], out: np.ndarray) -> None:
        rows, views = zip(*targets)
        self.block[list(rows), list(views)] = out

    def _embed(self, batch: torch.Tensor, bits: int, targets: list[tuple[int, int]]) -> np.ndarray:
        try:
            out = self.teacher.embed(batch, bits=bits)
        except LeaderError as e:
            if len(targets) == 1:
                row, view = targets[0]
                raise LeaderError(f"{e} (teacher {self.name!r}, item {self.keys[row]!r}, view {view})") from None
            # Find the view that failed, so that the message names it; only on the error path.
            for i, target in enumerate(targets):
                self._embed(batch[i:i + 1], bits, [target])
            row, _ = targets[0]
            raise LeaderError(f"{e} (teacher {self.name!r}, a batch of {len(targets)} views from item "
                              f"{self.keys[row]!r} on)") from None
        bad = ~np.isfinite(out).all(axis=1)
        if bad.any():
            row, view = targets[int(np.flatnonzero(bad)[0])]
            raise LeaderError(f"teacher {self.name!r} produced a NaN/Inf embedding for item {self.keys[row]!r}, view {view}")
        return out


class _EmbedAhead:
    """The teacher's calls, in order, on one thread of their own, at most `depth` batches behind.

    While the teacher runs one batch (on a GPU: while its thread waits for the result), the
    caller renders and stacks the next; PyTorch and TensorFlow release the GIL inside their ops.
    Results are stored, and errors raised, in the caller's thread, in submission order.
    """

    def __init__(self, depth: int = 2):
        self.depth = depth
        # torch.set_num_threads holds for the thread that called it: a new thread would run the
        # teacher on every core (measured: half the views/s of one thread on 2 busy cores).
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="teacher", initializer=torch.set_num_threads,
                                       initargs=(torch.get_num_threads(),))
        self.inflight: deque[tuple[Future, Callable[[np.ndarray], None]]] = deque()

    def submit(self, embed: Callable[[], np.ndarray], store: Callable[[np.ndarray], None]) -> None:
        self.inflight.append((self.pool.submit(embed), store))
        while len(self.inflight) > self.depth:
            self._finish_oldest()

    def wait_all(self) -> None:
        while self.inflight:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        future, store = self.inflight.popleft()
        store(future.result())

    def close(self) -> None:
        for future, _ in self.inflight:
            future.cancel()
        self.inflight.clear()
        self.pool.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class PrecomputeResult:
    cache_path: str
    teacher: str
    kind: str
    rank: int
    world_size: int
    shards_computed: list[int]
    shards_skipped: list[int]
    items: int
    views: int
    seconds: float
    interrupted: bool = False
    complete: bool = False                 # every shard of the store is done (by any rank)
    missing: dict | None = None            # import teachers: items without an embedding in this run

    @property
    def items_per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class CacheLayout:
    """What a teacher's rows hold: views per item (drawn from `view_spec` and `seed`), the side
    patches are cut at before their views are rendered, and the stored type."""

    views: int = 4
    seed: int = 0
    patch_size: int = 224
    view_spec: ViewSpec = field(default_factory=ViewSpec)
    dtype: str = "float16"


@dataclass(frozen=True)
class Execution:
    """How this process runs the teacher: views per call, the device views are rendered on, the
    worker processes that read, check and decode the shards ahead (None: on a GPU one per CPU but
    one, up to 8; on the CPU none; 0: none, this process reads them, with `decode_threads` threads
    decoding ahead: None, one per CPU up to 8; 0, none), whether the workers render the views too
    (None: when the device is the CPU; on a GPU this process renders them there), and its share of
    the shards (rank and world size; None: torchrun's RANK and WORLD_SIZE).

    No workers on the CPU by default: there the teacher's forward takes every core, and on the
    2-core benchmark machine one worker process was no faster (disease teacher, 0.77 against 0.79
    of the bare forward) or slower (anatomy, 0.48 against 0.57) than reading in this process.
    """

    batch_size: int = 32
    device: str = "cpu"
    decode_threads: int | None = None
    workers: int | None = None
    render_on_workers: bool | None = None
    rank: int | None = None
    world_size: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise LeaderError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.decode_threads is not None and self.decode_threads < 0:
            raise LeaderError(f"--decode-threads must be 0 or more, got {self.decode_threads}")
        if self.workers is not None and self.workers < 0:
            raise LeaderError(f"precompute workers must be 0 or more, got {self.workers}")

    def worker_count(self, device: str) -> int:
        if self.workers is not None:
            return self.workers
        return min(8, max(1, (os.cpu_count() or 1) - 1)) if torch.device(device).type == "cuda" else 0

    @property
    def thread_count(self) -> int:
        return min(8, os.cpu_count() or 1) if self.decode_threads is None else self.decode_threads


def precompute(shards_dir: str | Path, name: str, teacher: Teacher, cache_path: str | Path | None = None,
               layout: CacheLayout = CacheLayout(), execution: Execution = Execution(), *,
               overwrite_teacher: bool = False,
               on_progress: Callable[[int, int], None] | None = None) -> PrecomputeResult:
    """Fill `teachers/<name>` of the cache beside `shards_dir` (or at `cache_path`) with `teacher`.

    The caller loads the teacher (`create_teacher`) and closes it; one loaded teacher can fill
    several shard sets. on_progress(items_done, items_total) is called after each shard with this
    rank's counts.
    """
    position = torchrun_position(execution.rank, execution.world_size)
    rank, world_size = position.rank, position.world_size
    manifest = Manifest.load(shards_dir)
    cache_path = str(cache_path if cache_path is not None else default_cache_path(shards_dir))
    if world_size > 1 and local_store_path(cache_path) is None:
        raise LeaderError(f"cache {cache_path} is not on a local file system: {world_size} ranks cannot lock it "
                          "to share its boundary chunks; precompute into a local (or shared POSIX) directory and copy it")
    device = local_device(execution.device)               # one GPU per local rank under torchrun
    n_views_teacher = min(layout.views, teacher.max_views) if teacher.max_views else layout.views
    # A second writer of this teacher that is not another rank of this run is refused (locks.py).
    with teacher_writer(cache_path, name, rank, world_size):
        cache = TeacherCache.create_or_open(cache_path, manifest, n_views=layout.views, view_spec=layout.view_spec,
                                            seed=layout.seed, patch_size=layout.patch_size)
        cache.ensure_teacher(name, teacher.describe(), n_views=n_views_teacher, dtype=layout.dtype,
                             replace_mismatched=overwrite_teacher)
        return _run(cache, manifest, teacher, name, n_views_teacher, execution, device, rank, world_size, on_progress)


def _run(cache: TeacherCache, manifest: Manifest, teacher: Teacher, name: str, n_views: int, execution: Execution,
         device: str, rank: int, world_size: int, on_progress: Callable[[int, int], None] | None) -> PrecomputeResult:
    done = cache.is_done(name)
    mine = [i for i in range(len(manifest.shards)) if i % world_size == rank]
    todo = [i for i in mine if not done[i]]
    total = sum(manifest.shards[i].n_items for i in todo)
    result = PrecomputeResult(cache.path, name, teacher.kind, rank, world_size, [], [i for i in mine if done[i]],
                              0, 0, 0.0)
    missing = {"items": 0, "images": 0, "patches": 0, "examples": []}
    start = time.perf_counter()
    if on_progress is not None:
        on_progress(0, total)
    with StopOnSigterm() as stop, contextlib.closing(_EmbedAhead()) as ahead:
        if teacher.needs_pixels:
            shards = _embedded_shards(cache, manifest, todo, teacher, name, n_views, execution, device, ahead)
        else:
            shards = _imported_shards(cache, manifest, todo, teacher, missing)
        with contextlib.closing(shards):
            # With worker processes, shards finish in the order their workers finish them.
            for shard_index, block, valid, views_done in shards:
                a, b = manifest.shards[shard_index].rows
                cache.write_block(name, a, block, valid)
                cache.mark_done(name, shard_index)          # the flag after the data
                result.shards_computed.append(shard_index)
                result.items += b - a
                result.views += views_done
                if on_progress is not None:
                    on_progress(result.items, total)
                if stop.requested:
                    result.interrupted = len(result.shards_computed) < len(todo)
                    break
    result.seconds = time.perf_counter() - start
    result.shards_computed.sort()
    if not teacher.needs_pixels:
        result.missing = missing
    result.complete = finish_teacher(cache, name)
    return result


ShardRows = tuple[int, np.ndarray, np.ndarray, int]      # (shard index, block, valid, views embedded)


def _imported_shards(cache: TeacherCache, manifest: Manifest, todo: list[int], teacher: Teacher,
                     missing: dict) -> Iterator[ShardRows]:
    for shard_index in todo:
        a, b = manifest.shards[shard_index].rows
        block, valid = _import_shard(cache, manifest, shard_index, teacher)
        _count_missing(missing, cache.read_keys(a, b), cache.read_kind(a, b), valid)
        yield shard_index, block, valid, int(valid.sum())


# ---------------------------------------------------------------------------------------------
# Pixel teachers: shards -> groups of decoded (and, on the CPU, rendered) samples -> the teacher


@dataclass(frozen=True)
class _Render:
    """Where a group's views are rendered on the host (a worker on the CPU): the teacher's sizes."""

    image_size: int | None
    patch_size: int
    patch_out: int | None


@dataclass
class _Group:
    """A batch's worth of one shard's samples of one image shape and dtype, decoded, in row order."""

    shard: int
    starts: list[int]                               # each sample's first row in the shard's block
    bits: list[int]
    boxes: list[list[list[float]]]                  # each sample's patch boxes
    params: list[np.ndarray]                        # each sample's rows of view parameters
    pixels: torch.Tensor | None = None              # (B, H, W) uint8, or float32 in [0, 1]: still to render
    views: list[list[torch.Tensor]] | None = None   # or rendered: per sample, per item, (Vt, 1, S, S)

    def pin_memory(self) -> "_Group":
        """What the DataLoader's pin_memory calls: the pixels in page-locked memory, so that their
        copy to the GPU does not block."""
        return replace(self, pixels=self.pixels.pin_memory()) if self.pixels is not None else self


@dataclass(frozen=True)
class _ShardEnd:
    shard: int


def _shard_groups(manifest: Manifest, shard_index: int, keys: list[str], params: np.ndarray, group_size: int,
                  render: _Render | None = None, pool: ThreadPoolExecutor | None = None,
                  ahead: int = 0) -> Iterator[_Group]:
    """One shard's samples, checked against the cache's keys, decoded, grouped by shape and dtype
    `group_size` at a time, and rendered on the CPU when `render` says so."""
    a = manifest.shards[shard_index].rows[0]
    pending: list[tuple[dict, np.ndarray]] = []

    def group() -> _Group:
        metas = [meta for meta, _ in pending]
        starts = [meta["rows"][0] - a for meta in metas]
        out = _Group(shard_index, starts, [int(meta.get("bits", 8)) for meta in metas],
                     [[patch["box"] for patch in meta["patches"]] for meta in metas],
                     [params[start:start + 1 + len(meta["patches"])] for start, meta in zip(starts, metas)],
                     pixels=torch.from_numpy(np.stack([pixels for _, pixels in pending])))
        pending.clear()
        if render is None:
            return out
        views = render_group_views(out.pixels, out.boxes, out.params, image_size=render.image_size,
                                   patch_size=render.patch_size, patch_out=render.patch_out)
        return replace(out, pixels=None, views=views)

    for sample, pixels in _decoded(_samples_in_order(manifest, shard_index, keys), pool, ahead):
        if pending and (pixels.shape, pixels.dtype) != (pending[0][1].shape, pending[0][1].dtype):
            yield group()
        pending.append((sample.meta, pixels))
        if len(pending) == group_size:
            yield group()
    if pending:
        yield group()


class _ShardGroups(IterableDataset):
    """In each DataLoader worker: every num_workers-th shard of the list, as its groups, then its end."""

    def __init__(self, manifest: Manifest, cache_path: str, shards: list[int], n_views: int, group_size: int,
                 render: _Render | None):
        self.manifest, self.cache_path, self.shards = manifest, cache_path, shards
        self.n_views, self.group_size, self.render = n_views, group_size, render

    def __iter__(self) -> Iterator[_Group | _ShardEnd | dict]:
        info = get_worker_info()
        mine = self.shards[info.id::info.num_workers] if info is not None else self.shards
        return errors_as_items(self._groups(mine))

    def _groups(self, mine: list[int]) -> Iterator[_Group | _ShardEnd]:
        cache = TeacherCache.open(self.cache_path)
        for shard_index in mine:
            a, b = self.manifest.shards[shard_index].rows
            yield from _shard_groups(self.manifest, shard_index, cache.read_keys(a, b),
                                     cache.read_params(a, b)[:, :self.n_views], self.group_size, self.render)
            yield _ShardEnd(shard_index)


class _OpenBlock:
    """A shard being embedded: its block, filled as its groups arrive."""

    def __init__(self, cache: TeacherCache, manifest: Manifest, shard_index: int, teacher: Teacher, name: str,
                 n_views: int, batch_size: int, ahead: _EmbedAhead):
        self.shard_index, self.teacher, self.patch_size = shard_index, teacher, cache.patch_size
        a, b = manifest.shards[shard_index].rows
        self.name, self.keys = manifest.shards[shard_index].name, cache.read_keys(a, b)
        self.block = np.full((b - a, n_views, teacher.dim), np.nan, dtype=np.float32)
        self.embedder = _BlockEmbedder(teacher, name, batch_size, self.block, self.keys, ahead)

    def add(self, group: _Group, device: str) -> None:
        views = group.views
        if views is None:
            views = render_group_views(group.pixels, group.boxes, group.params, image_size=self.teacher.input_size,
                                       patch_size=self.patch_size, patch_out=self.teacher.input_size, device=device)
        for start, bits, sample_views in zip(group.starts, group.bits, views):
            for j, item_views in enumerate(sample_views):
                self.embedder.add(start + j, item_views, bits)

    def finish(self) -> ShardRows:
        self.embedder.flush()
        if np.isnan(self.block).any():
            row = int(np.flatnonzero(np.isnan(self.block).any(axis=(1, 2)))[0])
            raise LeaderError(f"shard {self.name}: item {self.keys[row]!r} got no embedding from teacher "
                              f"{self.embedder.name!r}; the shard and the cache's keys disagree")
        return self.shard_index, self.block, np.ones(len(self.block), dtype=bool), self.embedder.views_done


def _embedded_shards(cache: TeacherCache, manifest: Manifest, todo: list[int], teacher: Teacher, name: str,
                     n_views: int, execution: Execution, device: str, ahead: _EmbedAhead) -> Iterator[ShardRows]:
    """Each shard of `todo` embedded, as it finishes.

    With worker processes, each reads, checks and decodes whole shards (every W-th of the list)
    and, on the CPU, renders their views, while this process only batches and embeds; on a GPU
    this process renders each group there, from pixels the workers left in pinned memory. Without
    workers, this process reads the shards in order, with threads decoding ahead.
    """
    if not todo:
        return
    group_size = max(1, execution.batch_size // n_views)
    open_block = lambda i: _OpenBlock(cache, manifest, i, teacher, name, n_views, execution.batch_size, ahead)  # noqa: E731
    if execution.worker_count(device) == 0:
        threads = execution.thread_count
        with ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads else contextlib.nullcontext() as pool:
            for shard_index in todo:
                block = open_block(shard_index)
                a, b = manifest.shards[shard_index].rows
                for group in _shard_groups(manifest, shard_index, block.keys, cache.read_params(a, b)[:, :n_views],
                                           group_size, pool=pool, ahead=execution.batch_size + 2 * threads):
                    block.add(group, device)
                yield block.finish()
        return
    cuda = torch.device(device).type == "cuda"
    on_workers = not cuda if execution.render_on_workers is None else execution.render_on_workers
    render = _Render(teacher.input_size, cache.patch_size, teacher.input_size) if on_workers else None
    loader = DataLoader(_ShardGroups(manifest, cache.path, todo, n_views, group_size, render), batch_size=None,
                        num_workers=min(execution.worker_count(device), len(todo)), pin_memory=cuda and not on_workers,
                        # A process that has loaded TensorFlow is never forked: its threads do not survive it.
                        multiprocessing_context="forkserver" if "tensorflow" in sys.modules else None)
    blocks: dict[int, _OpenBlock] = {}
    for item in loader:
        if isinstance(item, dict):
            raise LeaderError(item[WORKER_ERROR])
        if isinstance(item, _ShardEnd):
            yield blocks.pop(item.shard).finish()
            continue
        if item.shard not in blocks:
            blocks[item.shard] = open_block(item.shard)
        blocks[item.shard].add(item, device)


def _decode(sample: Sample) -> np.ndarray:
    """The stored pixels, ready for the device: 8-bit as they are, 16-bit already in [0, 1]."""
    try:
        image = sample.image()
        return image if image.dtype == np.uint8 else to_unit_float(image).numpy()
    except (OSError, ValueError, TypeError) as e:        # PIL's errors for a damaged PNG are OSErrors
        raise LeaderError(f"sample {sample.key!r}: its stored image does not decode ({e}); the shard is "
                          "damaged, so rebuild it with `leader shards build`") from None


def _decoded(samples: Iterator[Sample], pool: ThreadPoolExecutor | None,
             ahead: int) -> Iterator[tuple[Sample, np.ndarray]]:
    """Each sample with its decoded pixels (see _decode), in order.

    With a pool, up to `ahead` samples are being decoded while the caller renders and embeds: PNG
    inflation and the float conversion release the GIL, so the teacher no longer waits for them.
    """
    if pool is None:
        for sample in samples:
            yield sample, _decode(sample)
        return
    queue: deque[tuple[Sample, Future]] = deque()
    try:
        for sample in samples:
            queue.append((sample, pool.submit(_decode, sample)))
            if len(queue) >= ahead:
                first, future = queue.popleft()
                yield first, future.result()
        while queue:
            first, future = queue.popleft()
            yield first, future.result()
    finally:
        for _, future in queue:
            future.cancel()


def _samples_in_order(manifest: Manifest, shard_index: int, keys: list[str]) -> Iterator:
    """The shard's samples, checked against the cache's item keys as they stream past."""
    shard = manifest.shards[shard_index]
    a = shard.rows[0]
    for sample in iter_shard(manifest.path(shard.name), shard.sha256):
        start, stop = sample.meta["rows"]
        if keys[start - a:stop - a] != sample.item_keys():
            raise LeaderError(f"shard {shard.name}: sample {sample.key!r} at rows {start}-{stop} does not match the "
                              f"cache's keys there ({keys[start - a]!r}...); the cache was made for other shards")
        yield sample


def _import_shard(cache: TeacherCache, manifest: Manifest, shard_index: int,
                  teacher: Teacher) -> tuple[np.ndarray, np.ndarray]:
    """Import teachers hold one embedding per image, for view 0; patches have none (valid=False)."""
    shard = manifest.shards[shard_index]
    a, b = shard.rows
    block = np.full((b - a, 1, teacher.dim), np.nan, dtype=np.float32)
    valid = np.zeros(b - a, dtype=bool)
    metas = list(iter_shard_metas(manifest.path(shard.name), shard.sha256))   # image ids: checked bytes only
    image_rows = [m["rows"][0] - a for m in metas]
    embeddings, found = teacher.lookup([m["image_id"] for m in metas])
    block[image_rows, 0] = embeddings
    valid[image_rows] = found
    return block, valid


def _count_missing(missing: dict, keys: list[str], kinds: np.ndarray, valid: np.ndarray) -> None:
    absent = np.flatnonzero(~valid)
    missing["items"] += int(absent.size)
    is_image = kinds[absent] == KIND_CODES["image"]
    missing["images"] += int(is_image.sum())
    missing["patches"] += int((~is_image).sum())
    for row in absent[is_image]:
        if len(missing["examples"]) < MISSING_EXAMPLES:
            missing["examples"].append(keys[row])


def missing_summary(name: str, missing: dict, n_items: int) -> str:
    """One line that says how many items have no imported embedding, and which."""
    line = (f"{name}: {missing['items']} of {n_items} items have no imported embedding: "
            f"{missing['patches']} patches (import teachers hold whole-image embeddings only) and "
            f"{missing['images']} images")
    if missing["examples"]:
        line += f", e.g. {', '.join(missing['examples'])}"
    return line


# ---------------------------------------------------------------------------------------------
# When every shard is done


def finish_teacher(cache: TeacherCache, name: str) -> bool:
    """Once every shard is done: store the standardisation stats and the missing-items summary.

    Whoever finishes the last shard gets here with all flags set; the lock and the check for
    existing stats make it happen once, and the result depends only on the stored data.
    Returns whether the teacher is complete.
    """
    with cache.lock():
        if not cache.is_done(name).all():
            return False
        attrs = cache.teacher_attrs(name)
        if attrs.get("stats") is not None:
            return True
        mean, std, info = teacher_statistics(cache, name)
        missing = _store_missing(cache, name)
        cache.update_teacher_attrs(name, {"missing": missing, "completed": utc_now()})
        cache.write_stats(name, mean, std, info)
    return True


def teacher_statistics(cache: TeacherCache, name: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Per-dimension mean and (population) std of view 0 over the train split's image items.

    Read shard block by shard block and merged with Chan's parallel update in float64, so the
    memory stays one block and the result is the same however the blocks were computed.
    """
    dim = cache.emb_shape(name)[2]
    count, mean, m2 = 0, np.zeros(dim), np.zeros(dim)
    over = "train images, view 0"
    for attempt in ("train", "all"):
        for a, b in cache.shard_rows:
            keep = (cache.read_kind(a, b) == KIND_CODES["image"]) & cache.read_valid(name, a, b)
            if attempt == "train":
                keep &= cache.read_split(a, b) == SPLIT_CODES["train"]
            if not keep.any():
                continue
            x = cache.read_block(name, a, b)[keep, 0].astype(np.float64)
            n_b, mean_b = len(x), x.mean(axis=0)
            m2_b = ((x - mean_b) ** 2).sum(axis=0)
            delta = mean_b - mean
            total = count + n_b
            mean = mean + delta * (n_b / total)
            m2 = m2 + m2_b + delta ** 2 * (count * n_b / total)
            count = total
        if count:
            break
        over = "all images, view 0 (the shards have no train split)"
    if count == 0:
        raise LeaderError(f"teacher {name!r} in cache {cache.path} has no valid image embedding to compute "
                          "standardisation statistics from")
    return mean, np.sqrt(m2 / count), {"over": over, "n": count}


def _store_missing(cache: TeacherCache, name: str) -> dict:
    missing = {"items": 0, "images": 0, "patches": 0, "examples": []}
    for a, b in cache.shard_rows:
        valid = cache.read_valid(name, a, b)
        if not valid.all():
            _count_missing(missing, cache.read_keys(a, b), cache.read_kind(a, b), valid)
    missing["n_items"] = cache.n_items
    missing["summary"] = missing_summary(name, missing, cache.n_items) if missing["items"] else None
    return missing
