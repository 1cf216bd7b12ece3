"""What a run trains on: shard sets and their teacher caches, checked against each other.

    sources = open_sources(["shards/nih14", "shards/vindr"], caches=[], teachers=["disease", "anatomy"])
    plan = sources.plan(phase, splits=["train"])     # the phase's shard sets, shards, views, patch kinds

Everything the trainer must refuse is refused here, before a step is taken, with one message that
names the culprit: a cache made for other shards, a teacher missing from a cache or not finished,
a teacher whose dimension or weights differ between two datasets' caches.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from leader.errors import LeaderError
from leader.precompute.cache import TeacherCache
from leader.shards.layout import KIND_CODES, SPLIT_CODES, TRAINING_PATCH_KINDS, default_cache_path
from leader.shards.manifest import Manifest
from leader.train.config import PhaseConfig

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ShardSource:
    """One shard of one shard set, as a training stream sees it. Picklable (workers get a copy)."""

    set_index: int
    dataset: str
    url: str
    shard_index: int
    rows: tuple[int, int]
    n_samples: int
    n_tuples: int                     # training tuples this shard yields for the phase
    sha256: str | None = None         # the manifest's digest: the loader checks the shard against it


@dataclass
class ShardSet:
    root: str
    cache_path: str
    manifest: Manifest
    cache: TeacherCache
    kinds: np.ndarray                 # (N,) item kind codes, one read
    splits: np.ndarray                # (N,) item split codes, one read

    @property
    def dataset(self) -> str:
        return self.manifest.dataset

    @property
    def stored_size(self) -> int:
        return int(self.manifest.build["size"])


@dataclass
class TeacherInfo:
    name: str
    dim: int
    fingerprint: str
    kind: str
    views: dict[int, int] = field(default_factory=dict)           # set index -> cached views
    audited: dict[int, list] = field(default_factory=dict)        # set index -> consistent families


@dataclass(frozen=True)
class PhasePlan:
    """What one phase trains on, worked out once: the shard sets it draws from, their shards with
    the tuples each yields, the views every teacher of the phase has, the online augmentations
    allowed when only view 0 is cached, and which patches pair with their images."""

    phase: PhaseConfig
    sets: tuple[int, ...]                   # indices into TrainingSources.sets
    shards: tuple[ShardSource, ...]
    n_views: int
    online_families: tuple[str, ...]        # audit-approved online augmentations (n_views == 1 only)
    patch_kinds: tuple[str, ...]            # () for the images stream
    canvas: int                             # the largest stored size among its sets

    @property
    def tuples_per_epoch(self) -> int:
        return sum(s.n_tuples for s in self.shards)


@dataclass
class TrainingSources:
    sets: list[ShardSet]
    teachers: dict[str, TeacherInfo]

    def plan(self, phase: PhaseConfig, splits: list[str], online_augment: bool = True) -> PhasePlan:
        chosen = self.select(phase)
        patch_kinds = () if phase.stream == "images" else TRAINING_PATCH_KINDS
        n_views = min(self.teachers[t].views[i] for t in phase.branches for i in chosen)
        online: tuple[str, ...] = ()
        if n_views == 1:
            online = tuple(self._approved_families(phase, chosen)) if online_augment else ()
            log.warning("phase %r: a teacher has only view 0 cached; online augmentation limited to audit-approved "
                        "families: %s", phase.name, ", ".join(online) or "none (training on view 0 only)")
        return PhasePlan(phase, tuple(chosen), tuple(self._shards(phase, chosen, splits, patch_kinds)), n_views,
                         online, patch_kinds, max(self.sets[i].stored_size for i in chosen))

    def select(self, phase: PhaseConfig) -> list[int]:
        """Indices of the shard sets a phase draws from."""
        if phase.datasets == "all":
            chosen = list(range(len(self.sets)))
        elif phase.datasets == "with_boxes":
            chosen = [i for i, s in enumerate(self.sets) if s.manifest.has_boxes]
        else:
            known = {s.dataset: i for i, s in enumerate(self.sets)}
            unknown = [d for d in phase.datasets if d not in known]
            if unknown:
                raise LeaderError(f"phase {phase.name!r} names dataset(s) {unknown} that no --shards provides; "
                                  f"given: {sorted(known)}")
            chosen = [known[d] for d in phase.datasets]
        if not chosen:
            raise LeaderError(f"phase {phase.name!r}: no shard set matches datasets={phase.datasets!r}")
        for i in chosen:
            for name in phase.branches:
                if i not in self.teachers[name].views:
                    raise LeaderError(f"phase {phase.name!r} trains branch {name!r} on {self.sets[i].dataset}, but cache "
                                      f"{self.sets[i].cache_path} has no teacher {name!r} "
                                      f"(it has: {', '.join(self.sets[i].cache.teachers) or 'none'})")
        return chosen

    def _shards(self, phase: PhaseConfig, chosen: list[int], splits: list[str],
                patch_kinds: tuple[str, ...]) -> list[ShardSource]:
        codes = [SPLIT_CODES[s] for s in splits]
        kinds = [KIND_CODES[k] for k in (patch_kinds or ("image",))]
        out = []
        for i in chosen:
            s = self.sets[i]
            use = np.isin(s.kinds, kinds) & np.isin(s.splits, codes)
            for j, entry in enumerate(s.manifest.shards):
                a, b = entry.rows
                n = int(use[a:b].sum())
                if n:
                    out.append(ShardSource(i, s.dataset, str(s.manifest.path(entry.name)), j, (a, b), entry.n_samples, n,
                                           entry.sha256))
        if not out:
            what = "whole images" if phase.stream == "images" else "diseased or healthy patches"
            raise LeaderError(f"phase {phase.name!r} has nothing to train on: no {what} in split(s) {splits} "
                              f"of {[self.sets[i].dataset for i in chosen]}")
        return out

    def _approved_families(self, phase: PhaseConfig, chosen: list[int]) -> list[str]:
        """Augmentation families every teacher of the phase was audited invariant to, in every cache."""
        families = None
        for t in phase.branches:
            for i in chosen:
                f = set(self.teachers[t].audited.get(i) or [])
                families = f if families is None else families & f
        return sorted(families or [])

    def pooled_stats(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension mean/std of a teacher over the train images of every set, pooled exactly."""
        total, s1, s2 = 0, 0.0, 0.0
        for i, s in enumerate(self.sets):
            if i not in self.teachers[name].views:
                continue
            stats = s.cache.stats(name)
            if stats is None:
                raise LeaderError(f"target_norm standardize needs statistics of teacher {name!r}, and cache "
                                  f"{s.cache_path} has none yet (they are written when every shard is done)")
            mean, std = (np.asarray(x, dtype=np.float64) for x in stats)
            n = int(((s.kinds == KIND_CODES["image"]) & (s.splits == SPLIT_CODES["train"])).sum())
            total, s1, s2 = total + n, s1 + n * mean, s2 + n * (std ** 2 + mean ** 2)
        mean = s1 / max(total, 1)
        return mean.astype(np.float32), np.sqrt(np.maximum(s2 / max(total, 1) - mean ** 2, 0)).astype(np.float32)

    def patch_size(self) -> int:
        sizes = {s.cache.patch_size for s in self.sets}
        if len(sizes) != 1:
            raise LeaderError(f"the caches cut patches at different sizes {sorted(sizes)}: "
                              + ", ".join(f"{s.cache_path}: {s.cache.patch_size}" for s in self.sets))
        return sizes.pop()

    def describe(self) -> dict:
        """What the run records about its inputs (and checks again on --resume)."""
        return {
            "shard_sets": [{"root": s.root, "dataset": s.dataset, "cache": s.cache_path,
                            "manifest_fingerprint": s.manifest.fingerprint()} for s in self.sets],
            "teachers": {t.name: {"dim": t.dim, "kind": t.kind, "fingerprint": t.fingerprint}
                         for t in self.teachers.values()},
        }


def open_sources(shards: list[str], caches: list[str], teachers: list[str]) -> TrainingSources:
    """Open every shard set with its cache and check that they agree with each other and the teachers."""
    if not shards:
        raise LeaderError("no shard sets given: pass --shards DIR (repeatable) or set data.shards in the config")
    if caches and len(caches) != len(shards):
        raise LeaderError(f"{len(caches)} caches for {len(shards)} shard sets: give one --cache per --shards, or none")
    sets: list[ShardSet] = []
    for i, root in enumerate(shards):
        manifest = Manifest.load(root)
        cache_path = caches[i] if caches else str(default_cache_path(root))
        cache = TeacherCache.open(cache_path)
        cache.check_against(manifest)
        sets.append(ShardSet(str(root), str(cache_path), manifest, cache,
                             cache.read_kind(0, cache.n_items), cache.read_split(0, cache.n_items)))
    datasets = [s.dataset for s in sets]
    if len(set(datasets)) != len(datasets):
        raise LeaderError(f"two shard sets hold the same dataset: {datasets}; if they are different datasets, "
                          "build one of them with `leader shards build --name OTHER_NAME`")

    infos: dict[str, TeacherInfo] = {}
    for name in teachers:
        for i, s in enumerate(sets):
            if name not in s.cache.teachers:
                continue
            attrs = s.cache.teacher_attrs(name)
            n, views, dim = s.cache.emb_shape(name)
            where = f"teacher {name!r} in cache {s.cache_path}"
            if n != s.manifest.n_items or dim != attrs.get("dim"):
                raise LeaderError(f"{where} holds embeddings of shape {(n, views, dim)}, but its attributes say dim "
                                  f"{attrs.get('dim')} and the shards hold {s.manifest.n_items} items")
            done = s.cache.is_done(name)
            if not done.all():
                missing = [s.manifest.shards[j].name for j in np.flatnonzero(~done)[:5]]
                raise LeaderError(f"{where} is unfinished: {int((~done).sum())} shard(s) not done, e.g. {missing}; "
                                  "finish `leader precompute` first")
            info = infos.setdefault(name, TeacherInfo(name, dim, attrs.get("fingerprint", ""), attrs.get("kind", "")))
            if dim != info.dim:
                first = next(iter(info.views))
                raise LeaderError(f"teacher {name!r} has dimension {info.dim} in cache {sets[first].cache_path} "
                                  f"but {dim} in cache {s.cache_path}: they were computed by different teachers")
            if attrs.get("fingerprint", "") != info.fingerprint:
                first = next(iter(info.views))
                raise LeaderError(f"teacher {name!r} was computed with other weights in cache {s.cache_path} "
                                  f"(sha256 {str(attrs.get('fingerprint'))[:12]}...) than in {sets[first].cache_path} "
                                  f"(sha256 {info.fingerprint[:12]}...)")
            info.views[i] = views
            info.audited[i] = list((attrs.get("audit") or {}).get("consistent_families") or [])
        if name not in infos:
            raise LeaderError(f"no cache holds teacher {name!r}; caches: "
                              + "; ".join(f"{s.cache_path}: {', '.join(s.cache.teachers) or 'none'}" for s in sets))
    return TrainingSources(sets, infos)
