"""The training stream: shards + cached targets -> fixed-size uint8/uint16 batches, as named stages.

    spec = StreamSpec.for_phase(sources, phase, cfg, world_size=1)        # workers: cfg.data.num_workers
    for epoch, batch in phase_batches(spec, start_batch=0, rank=0, world_size=1):
        ...     # batch["image"] (B, 1, S, S) uint8|uint16, batch["targets"]["disease"] (B, D), ...

The pipeline of one (rank, DataLoader worker) reads top to bottom:

    shard list              the epoch's shards for this rank and worker, cycled until the quota is met
    tar to samples          the one shard reader, one shard at a time, each checked against its manifest sha256
    join cache blocks       one read per shard per teacher; item keys asserted against the samples
    expand to tuples        images: (image, view, targets); pairs: (image, patch, views, targets of both)
    shuffle                 a seeded buffer
    skip/take               this worker's share of the epoch's batches (skip = the resume position)
    decode                  PNG -> uint8/uint16 on a fixed square canvas (top-left, zero padded)
    batch                   collate to tensors; 8- and 16-bit images meet as uint16
  (pinned memory: the DataLoader's pin_memory)

Every random choice (shard order, which cached view, shuffle) is a function of (seed, epoch,
rank/worker), so a resumed run streams exactly what an uninterrupted one would, and every rank runs
the same number of steps: the step count comes from the manifests' tuple counts, and a worker whose
shards run short cycles over them again rather than stopping early.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from leader.errors import LeaderError
from leader.shards.layout import DamagedShard, Sample, item_key, iter_shard
from leader.shards.png import decode_png
from leader.train.config import PhaseConfig, TrainConfig
from leader.train.sources import ShardSource, TrainingSources
from leader.views import IDENTITY, ViewSpec, sample_view_params, view_param_families

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class StreamSpec:
    """Everything a DataLoader worker needs to rebuild a phase's stream (picklable)."""

    stream: str                        # "images" | "pairs"
    patch_kinds: tuple[str, ...]       # the patches paired with their images (pairs stream)
    teachers: tuple[str, ...]
    caches: tuple[str, ...]            # cache path per shard-set index
    shards: tuple[ShardSource, ...]
    splits: tuple[str, ...]
    seed: int
    n_views: int                       # cached views every teacher has; one is picked per item and epoch
    online_families: tuple[str, ...]   # audit-approved online augmentations (only when n_views == 1)
    view_specs: tuple[dict, ...]       # per shard set: the cache's view spec (ranges for online views)
    view_seeds: tuple[int, ...]
    canvas: int                        # side of the fixed square every image is decoded onto
    batch_size: int
    shuffle_buffer: int
    batches_per_epoch: int             # per rank, a multiple of grad_accum
    units: int                         # world_size x workers: the streams an epoch is split into
    num_workers: int
    skip_damaged_shards: bool = False  # a damaged shard is skipped (and logged) instead of stopping the run

    @classmethod
    def for_phase(cls, sources: TrainingSources, phase: PhaseConfig, cfg: TrainConfig, world_size: int) -> "StreamSpec":
        """The phase's stream, from its plan (worked out here, once per phase)."""
        plan = sources.plan(phase, list(cfg.data.splits), cfg.data.online_augment)
        batch, accum = cfg.data.batch_size, cfg.optim.grad_accum
        batches = max(accum, plan.tuples_per_epoch // (world_size * batch) // accum * accum)
        workers = max(1, cfg.data.num_workers)
        units = world_size * workers
        if len(plan.shards) < units:
            log.warning("phase %r: %d shards for %d rank x worker streams; some shards are read more than once "
                        "per epoch", plan.phase.name, len(plan.shards), units)
        sets = sources.sets
        return cls(
            stream=plan.phase.stream, patch_kinds=plan.patch_kinds, teachers=tuple(plan.phase.branches),
            caches=tuple(s.cache_path for s in sets), shards=plan.shards, splits=tuple(cfg.data.splits),
            seed=int(cfg.seed), n_views=plan.n_views, online_families=plan.online_families,
            view_specs=tuple(s.cache.view_spec.to_dict() for s in sets), view_seeds=tuple(s.cache.seed for s in sets),
            canvas=plan.canvas, batch_size=batch, shuffle_buffer=int(cfg.data.shuffle_buffer), batches_per_epoch=batches,
            units=units, num_workers=int(cfg.data.num_workers),
            skip_damaged_shards=bool(cfg.data.skip_damaged_shards),
        )

    @property
    def tuples_per_epoch(self) -> int:
        return sum(s.n_tuples for s in self.shards)


# ---------------------------------------------------------------------------------------------
# Deterministic choices


def _hash64(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "little")


def assign_shards(spec: StreamSpec, epoch: int) -> list[list[ShardSource]]:
    """The epoch's shards for each of spec.units streams, balanced by tuple count.

    Shards are shuffled by (seed, epoch), then dealt largest first to the least loaded stream, so
    uneven shard sizes still give every stream a similar share; each stream then reads its shards
    in a shuffled order. With fewer shards than streams, shards are shared.
    """
    rng = random.Random(_hash64("shards", spec.seed, epoch))
    order = list(spec.shards)
    rng.shuffle(order)
    order.sort(key=lambda s: -s.n_tuples)             # stable: equal sizes keep the shuffled order
    load = [0] * spec.units
    assigned: list[list[ShardSource]] = [[] for _ in range(spec.units)]
    for shard in order:
        u = min(range(spec.units), key=lambda i: (load[i], i))
        assigned[u].append(shard)
        load[u] += shard.n_tuples
    for u in range(spec.units):
        if not assigned[u]:
            assigned[u].append(order[u % len(order)])
        rng.shuffle(assigned[u])
    return assigned


def chosen_views(seed: int, epoch: int, keys: list[str], n_views: int) -> np.ndarray:
    """Which cached view each item shows this epoch: a function of (seed, epoch, key) only."""
    if n_views == 1:
        return np.zeros(len(keys), dtype=np.int64)
    return np.array([_hash64("view", seed, epoch, k) % n_views for k in keys], dtype=np.int64)


def online_params(spec: dict, seed: int, epoch: int, keys: list[str], families: tuple[str, ...]) -> np.ndarray:
    """(n, K) fresh view parameters varying only the audit-approved families (the rest identity)."""
    params = sample_view_params(ViewSpec.from_dict(spec), seed, [f"{k}@epoch{epoch}" for k in keys], 2)[:, 1]
    varying = sorted({i for f in families for i in view_param_families()[f]})
    frozen = np.setdiff1d(np.arange(params.shape[1]), varying)
    params[:, frozen] = IDENTITY[frozen]
    return params


def role_batches(total: int, role: int, n_roles: int) -> int:
    """How many of an epoch's first `total` batches belong to a role: steps role, role + n, ..."""
    return max(0, -(-(total - role) // n_roles))


# ---------------------------------------------------------------------------------------------
# Stages


def shard_list(shards: list[ShardSource]) -> Iterator[ShardSource]:
    """The stream's shards, cycled: the take stage decides when enough tuples have been read."""
    return itertools.cycle(shards)


def tar_to_samples(skip_damaged: bool = False):
    """Each shard with its samples, read by the one shard reader. A shard whose bytes differ from
    its manifest's sha256 yields no sample: it stops the run naming it, or, with skip_damaged, is
    left out (logged with a count) and the stream's other shards fill its quota."""
    skipped: set[str] = set()

    def read(shards: Iterator[ShardSource]) -> Iterator[tuple[ShardSource, Iterator[Sample]]]:
        since_a_good_one = 0
        for shard in shards:
            samples = iter_shard(shard.url, shard.sha256)
            if skip_damaged:
                try:
                    samples = iter(list(samples))      # held back until checked in any case
                except DamagedShard as e:
                    if shard.url not in skipped:
                        skipped.add(shard.url)
                        log.warning("skipping a damaged shard (data.skip_damaged_shards), %d so far in this "
                                    "stream: %s", len(skipped), e)
                    since_a_good_one += 1
                    if since_a_good_one > len(skipped):      # a whole cycle of the stream's shards
                        raise LeaderError(f"every shard of this stream is damaged ({len(skipped)} skipped, e.g. "
                                          f"{shard.url}); nothing is left to train on") from None
                    continue
            since_a_good_one = 0
            yield shard, samples

    return read


@dataclass
class ShardBlock:
    """One shard's targets, read in one call per teacher, reduced to the epoch's chosen view."""

    shard: ShardSource
    keys: list[str]
    params: np.ndarray                 # (n, K) the view each item shows this epoch
    targets: dict[str, np.ndarray]     # teacher -> (n, D)
    valid: dict[str, np.ndarray]       # teacher -> (n,) bool

    def row(self, row: int) -> int:
        return row - self.shard.rows[0]


class JoinCacheBlocks:
    """Pair every streamed sample with its shard's cache block, asserting keys match row by row."""

    def __init__(self, spec: StreamSpec, epoch: int):
        self.spec, self.epoch = spec, epoch
        self._caches: dict[int, object] = {}

    def cache(self, set_index: int):
        if set_index not in self._caches:
            from leader.precompute.cache import TeacherCache

            self._caches[set_index] = TeacherCache.open(self.spec.caches[set_index])
        return self._caches[set_index]

    def read_block(self, shard: ShardSource) -> ShardBlock:
        cache = self.cache(shard.set_index)
        a, b = shard.rows
        keys = cache.read_keys(a, b)
        if self.spec.online_families:
            params = online_params(self.spec.view_specs[shard.set_index], self.spec.view_seeds[shard.set_index],
                                   self.epoch, keys, self.spec.online_families)
            views = np.zeros(len(keys), dtype=np.int64)
        else:
            views = chosen_views(self.spec.seed, self.epoch, keys, self.spec.n_views)
            params = cache.read_params(a, b)[np.arange(len(keys)), views]
        rows = np.arange(len(keys))
        targets = {t: cache.read_block(t, a, b)[rows, views] for t in self.spec.teachers}
        valid = {t: cache.read_valid(t, a, b) for t in self.spec.teachers}
        return ShardBlock(shard, keys, params, targets, valid)

    def __call__(self, shards: Iterator[tuple[ShardSource, Iterator[Sample]]]) -> Iterator[tuple[ShardBlock, Sample]]:
        for shard, samples in shards:
            block = self.read_block(shard)
            count, next_row = 0, shard.rows[0]
            for sample in samples:
                a, b = sample.meta["rows"]
                expected = block.keys[block.row(a):block.row(b)] if shard.rows[0] <= a < b <= shard.rows[1] else []
                if a != next_row or expected != sample.item_keys():
                    held = block.keys[block.row(next_row)] if next_row < shard.rows[1] else "nothing"
                    raise LeaderError(f"cache {self.spec.caches[shard.set_index]} does not match shard {shard.url}: "
                                      f"row {next_row} holds {held!r} but the shard streams {sample.key!r} "
                                      f"(rows {[a, b]}); rebuild the cache with `leader precompute`")
                count, next_row = count + 1, b
                yield block, sample
            if count != shard.n_samples:
                raise LeaderError(f"shard {shard.url} streamed {count} samples; its manifest lists {shard.n_samples}")


def expand_to_tuples(spec: StreamSpec):
    """Samples -> training tuples. Images: one per image. Pairs: one per diseased/healthy patch."""
    splits = set(spec.splits)

    def expand(joined: Iterator[tuple[ShardBlock, Sample]]) -> Iterator[dict]:
        for block, sample in joined:
            meta = sample.meta
            if meta["split"] not in splits:
                continue
            r = block.row(meta["rows"][0])
            image = {
                "key": sample.key, "png": sample.png, "image_params": block.params[r],
                "targets": {t: e[r] for t, e in block.targets.items()},
                "valid": {t: v[r] for t, v in block.valid.items()},
            }
            if spec.stream == "images":
                yield image
                continue
            for j, patch in enumerate(meta["patches"]):
                if patch["kind"] not in spec.patch_kinds:
                    continue
                p = r + 1 + j
                yield {**image, "patch_key": item_key(sample.key, j),
                       "patch_box": np.asarray(patch["box"], dtype=np.float32), "patch_params": block.params[p],
                       "patch_targets": {t: e[p] for t, e in block.targets.items()},
                       "patch_valid": {t: v[p] for t, v in block.valid.items()}}

    return expand


def decode_to_canvas(canvas: int):
    """PNG -> (1, canvas, canvas) uint8/uint16 with the image at the top-left, plus its (h, w).

    A fixed size lets any batch stack. 8-bit stays uint8 and 16-bit stays uint16 (no precision is
    lost on the CPU); the step renders each image from its own (h, w) extent, so the padding is
    never seen, and patch boxes (stored-image pixels from the top-left) stay valid.
    """

    def decode(tuples: Iterator[dict]) -> Iterator[dict]:
        for t in tuples:
            t = dict(t)
            t["image"], t["image_hw"] = place_on_canvas(decode_png(t.pop("png")), canvas, t["key"])
            yield t

    return decode


def place_on_canvas(img: np.ndarray, canvas: int, key: str = "") -> tuple[np.ndarray, np.ndarray]:
    if img.ndim != 2 or img.dtype not in (np.uint8, np.uint16):
        raise LeaderError(f"sample {key!r}: expected a 2-D uint8/uint16 image, got {img.dtype} {img.shape}")
    h, w = img.shape
    if h > canvas or w > canvas:
        raise LeaderError(f"sample {key!r}: image {w}x{h} exceeds the stored size {canvas} of its manifest")
    if (h, w) == (canvas, canvas):                    # a square image fills its canvas: nothing to pad
        return img[None], np.array([h, w], dtype=np.int64)
    out = np.zeros((1, canvas, canvas), dtype=img.dtype)
    out[0, :h, :w] = img
    return out, np.array([h, w], dtype=np.int64)


def collate(tuples: list[dict]) -> dict:
    """Stack a batch. A batch mixing 8- and 16-bit images becomes uint16 (x257: 255 -> 65535, exact)."""
    images = [t["image"] for t in tuples]
    if any(im.dtype == np.uint16 for im in images):
        images = [im.astype(np.uint16) * np.uint16(257) if im.dtype == np.uint8 else im for im in images]
    batch = {
        "keys": [t["key"] for t in tuples],
        "image": torch.from_numpy(np.stack(images)),
        "image_hw": torch.from_numpy(np.stack([t["image_hw"] for t in tuples])),
        "image_params": torch.from_numpy(np.stack([t["image_params"] for t in tuples]).astype(np.float32)),
        "targets": {n: torch.from_numpy(np.stack([t["targets"][n] for t in tuples])) for n in tuples[0]["targets"]},
        "valid": {n: torch.from_numpy(np.stack([t["valid"][n] for t in tuples])) for n in tuples[0]["valid"]},
    }
    if "patch_box" in tuples[0]:
        batch["patch_keys"] = [t["patch_key"] for t in tuples]
        batch["patch_box"] = torch.from_numpy(np.stack([t["patch_box"] for t in tuples]))
        batch["patch_params"] = torch.from_numpy(np.stack([t["patch_params"] for t in tuples]).astype(np.float32))
        batch["patch_targets"] = {n: torch.from_numpy(np.stack([t["patch_targets"][n] for t in tuples]))
                                  for n in tuples[0]["patch_targets"]}
        batch["patch_valid"] = {n: torch.from_numpy(np.stack([t["patch_valid"][n] for t in tuples]))
                                for n in tuples[0]["patch_valid"]}
    return batch


# ---------------------------------------------------------------------------------------------
# One epoch of one rank


class PhaseEpoch(IterableDataset):
    """The batches [start_batch, batches_per_epoch) of one epoch on one rank.

    Batch i of the epoch comes from role i % W (W = DataLoader workers); the DataLoader asks its
    workers in turn starting from worker 0, so after resuming at batch k worker w plays role
    (w + k) % W, and the batches arrive in the order of an uninterrupted epoch.
    """

    def __init__(self, spec: StreamSpec, epoch: int, rank: int, world_size: int, start_batch: int = 0):
        if spec.units != world_size * max(1, spec.num_workers):
            raise LeaderError(f"stream planned for {spec.units} rank x worker streams, run with {world_size} ranks")
        self.spec, self.epoch, self.rank, self.world_size, self.start_batch = spec, epoch, rank, world_size, start_batch

    def stages(self, worker: int) -> list:
        spec = self.spec
        n_roles = max(1, spec.num_workers)
        role = (worker + self.start_batch) % n_roles
        unit = self.rank * n_roles + role
        first = role_batches(self.start_batch, role, n_roles)
        stop = role_batches(spec.batches_per_epoch, role, n_roles)
        # A buffer beyond the role's epoch quota would only read ahead; it depends on the epoch's
        # quota, not on the resume point, so a resumed epoch shuffles the same.
        buffer = max(1, min(spec.shuffle_buffer, stop * spec.batch_size))
        shards = assign_shards(spec, self.epoch)[unit]
        return [
            lambda: shard_list(shards),
            tar_to_samples(spec.skip_damaged_shards),
            JoinCacheBlocks(spec, self.epoch),
            expand_to_tuples(spec),
            wds.shuffle(buffer, initial=buffer, seed=_hash64("shuffle", spec.seed, self.epoch, unit)),
            lambda tuples: itertools.islice(tuples, first * spec.batch_size, stop * spec.batch_size),
            decode_to_canvas(spec.canvas),
            wds.batched(spec.batch_size, collation_fn=collate, partial=False),
        ]

    def __iter__(self):
        info = get_worker_info()
        batches = iter(wds.DataPipeline(*self.stages(info.id if info is not None else 0)))
        return batches if info is None else errors_as_items(batches)


WORKER_ERROR = "leader_error"


def errors_as_items(batches: Iterator) -> Iterator:
    """In a DataLoader worker (the trainer's, or precompute's): a LeaderError travels to the main
    process as an item, {WORKER_ERROR: message}, and is raised there as the same one line (torch
    would re-raise it with the worker's traceback inside its message, a wall of text where the
    user needs the damaged file's name)."""
    try:
        yield from batches
    except LeaderError as e:
        yield {WORKER_ERROR: str(e)}


def phase_batches(spec: StreamSpec, start_batch: int, rank: int, world_size: int,
                  pin_memory: bool = False) -> Iterator[tuple[int, dict]]:
    """(epoch, batch) for ever, from micro-batch `start_batch` of the phase on."""
    epoch, offset = divmod(start_batch, spec.batches_per_epoch)
    while True:
        loader = DataLoader(PhaseEpoch(spec, epoch, rank, world_size, offset), batch_size=None,
                            num_workers=spec.num_workers, pin_memory=pin_memory)
        for batch in loader:
            if WORKER_ERROR in batch:
                raise LeaderError(batch[WORKER_ERROR])
            yield epoch, batch
        epoch, offset = epoch + 1, 0
