"""The precompute loop: run one teacher over every item of a shard set, once, into the cache.

    choice = resolve_teacher("anatomy", model="adam_v2.pth")                  # role defaults: kind adam
    with create_teacher(choice.kind, model=choice.model, **choice.options) as teacher:
        result = precompute("shards/phantom", "anatomy", teacher, layout=CacheLayout(views=4))

For each shard this rank owns (shard i belongs to rank i % world_size) and that is not done yet:

    samples -> decoded pixels (a few threads decode ahead while the teacher runs)
            -> item views (the image, then its patches; view v from the cache's params), rendered
               for a batch's worth of samples of one image shape at a time
            -> batches grouped by (bit depth, size) -> teacher.embed -> the shard's block
            -> one write of the block -> done[shard] = True

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
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from leader.errors import LeaderError
from leader.io import read_yaml_mapping
from leader.precompute.cache import TeacherCache, local_store_path, utc_now
from leader.precompute.locks import teacher_writer
from leader.precompute.teachers import Teacher
from leader.runtime import StopOnSigterm, local_device, torchrun_position
from leader.shards.crop import crop_patch
from leader.shards.manifest import Manifest
from leader.shards.layout import KIND_CODES, SPLIT_CODES, Sample, default_cache_path, iter_shard, iter_shard_metas
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


def render_group_views(images: Sequence[np.ndarray], patch_boxes: Sequence[Sequence[Sequence[float]]],
                       params: Sequence[np.ndarray], *, image_size: int | None, patch_size: int = 224,
                       patch_out: int | None = None, device: str | torch.device = "cpu") -> list[list[torch.Tensor]]:
    """render_sample_views for several samples at once: one copy to the device and one replay for
    all their image views, one replay for all their patch views.

    The images must share their shape and dtype. A view renders the same alone as in any batch
    (see warp_affine), so grouping changes no pixel; it saves the per-call cost, which dominated the
    precompute of a fast teacher (one replay call per sample).
    Returns, per sample, what render_sample_views returns.
    """
    n_views = params[0].shape[1]
    pixels = _unit_pixels(np.stack(images), device)[:, None]                     # (B, 1, H, W)
    size = int(image_size or max(images[0].shape))
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
        stacked = torch.cat(crops).repeat_interleave(n_views, dim=0)
        patch_views = replay_views(stacked, np.concatenate(crop_params), int(patch_out or patch_size))
        for owner, views in zip(owners, patch_views.split(n_views)):
            out[owner].append(views)
    return out


def _unit_pixels(image: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """The image in [0, 1] as float32 on the device. 8-bit pixels travel as bytes (a quarter of the
    copy) and are scaled there; 16-bit ones are scaled on the host, as 16-bit integer tensors have
    few kernels on accelerators. Both give to_unit_float's values."""
    if image.dtype == np.uint8:
        return torch.from_numpy(image).to(device).float().div_(255.0)
    return (torch.from_numpy(image) if image.dtype == np.float32 else to_unit_float(image)).to(device)


@dataclass
class _Pending:
    pixels: list[torch.Tensor] = field(default_factory=list)
    targets: list[tuple[int, int]] = field(default_factory=list)      # (row in block, view)


class _BlockEmbedder:
    """Batches views across items, grouped by (bit depth, size), and scatters embeddings into a block."""

    def __init__(self, teacher: Teacher, name: str, batch_size: int, block: np.ndarray, keys: list[str]):
        self.teacher, self.name, self.batch_size = teacher, name, batch_size
        self.block, self.keys = block, keys
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
        for (bits, _), group in self.pending.items():
            if group.pixels:
                self._run(bits, group)

    def _run(self, bits: int, group: _Pending) -> None:
        batch = torch.stack(group.pixels)
        out = self._embed(batch, bits, group.targets)
        rows, views = zip(*group.targets)
        self.block[list(rows), list(views)] = out
        self.views_done += len(group.targets)
        group.pixels.clear()
        group.targets.clear()

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
    threads decoding ahead (None: one per CPU up to 8; 0: none), and its share of the shards (rank
    and world size; None: torchrun's RANK and WORLD_SIZE)."""

    batch_size: int = 32
    device: str = "cpu"
    decode_threads: int | None = None
    rank: int | None = None
    world_size: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise LeaderError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.decode_threads is not None and self.decode_threads < 0:
            raise LeaderError(f"--decode-threads must be 0 or more, got {self.decode_threads}")


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
    threads = min(8, os.cpu_count() or 1) if execution.decode_threads is None else execution.decode_threads
    n_views_teacher = min(layout.views, teacher.max_views) if teacher.max_views else layout.views
    # A second writer of this teacher that is not another rank of this run is refused (locks.py).
    with teacher_writer(cache_path, name, rank, world_size):
        cache = TeacherCache.create_or_open(cache_path, manifest, n_views=layout.views, view_spec=layout.view_spec,
                                            seed=layout.seed, patch_size=layout.patch_size)
        cache.ensure_teacher(name, teacher.describe(), n_views=n_views_teacher, dtype=layout.dtype,
                             replace_mismatched=overwrite_teacher)
        with ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads else contextlib.nullcontext() as pool:
            return _run(cache, manifest, teacher, name, n_views_teacher, execution.batch_size, device,
                        rank, world_size, on_progress, pool, ahead=execution.batch_size + 2 * threads)


def _run(cache: TeacherCache, manifest: Manifest, teacher: Teacher, name: str, n_views: int, batch_size: int,
         device: str, rank: int, world_size: int, on_progress: Callable[[int, int], None] | None,
         pool: ThreadPoolExecutor | None = None, ahead: int = 0) -> PrecomputeResult:
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
    with StopOnSigterm() as stop:
        for shard_index in todo:
            shard = manifest.shards[shard_index]
            a, b = shard.rows
            if teacher.needs_pixels:
                block, valid, views_done = _embed_shard(cache, manifest, shard_index, teacher, name, n_views,
                                                        batch_size, device, pool, ahead)
            else:
                block, valid = _import_shard(cache, manifest, shard_index, teacher)
                views_done = int(valid.sum())
                _count_missing(missing, cache.read_keys(a, b), cache.read_kind(a, b), valid)
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
    if not teacher.needs_pixels:
        result.missing = missing
    result.complete = finish_teacher(cache, name)
    return result


def _embed_shard(cache: TeacherCache, manifest: Manifest, shard_index: int, teacher: Teacher, name: str,
                 n_views: int, batch_size: int, device: str,
                 pool: ThreadPoolExecutor | None = None, ahead: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    shard = manifest.shards[shard_index]
    a, b = shard.rows
    keys = cache.read_keys(a, b)
    params = cache.read_params(a, b)[:, :n_views]
    block = np.full((b - a, n_views, teacher.dim), np.nan, dtype=np.float32)
    embedder = _BlockEmbedder(teacher, name, batch_size, block, keys)
    group: list[tuple[dict, np.ndarray]] = []           # samples of one image shape and dtype, rendered together

    def render_group() -> None:
        starts = [meta["rows"][0] - a for meta, _ in group]
        rendered = render_group_views(
            [pixels for _, pixels in group], [[p["box"] for p in meta["patches"]] for meta, _ in group],
            [params[start:start + 1 + len(meta["patches"])] for start, (meta, _) in zip(starts, group)],
            image_size=teacher.input_size, patch_size=cache.patch_size, patch_out=teacher.input_size, device=device)
        for start, (meta, _), views in zip(starts, group, rendered):
            for j, item_views in enumerate(views):
                embedder.add(start + j, item_views, int(meta.get("bits", 8)))
        group.clear()

    group_size = max(1, batch_size // n_views)
    for sample, pixels in _decoded(_samples_in_order(manifest, shard_index, keys), pool, ahead):
        if group and (pixels.shape, pixels.dtype) != (group[0][1].shape, group[0][1].dtype):
            render_group()
        group.append((sample.meta, pixels))
        if len(group) == group_size:
            render_group()
    if group:
        render_group()
    embedder.flush()
    if np.isnan(block).any():
        row = int(np.flatnonzero(np.isnan(block).any(axis=(1, 2)))[0])
        raise LeaderError(f"shard {shard.name}: item {keys[row]!r} got no embedding from teacher {name!r}; "
                          "the shard and the cache's keys disagree")
    return block, np.ones(b - a, dtype=bool), embedder.views_done


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
