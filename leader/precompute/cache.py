"""TeacherCache: the Zarr v3 store of teacher embeddings, one row per item, beside the shards.

    cache = TeacherCache.create_or_open("shards/cache.zarr", manifest, n_views=4,
                                        view_spec=ViewSpec(), seed=0, patch_size=224)
    emb = cache.read_block("disease", *manifest.shards[3].rows)     # (n, Vt, D): one read per shard

Layout (docs/interfaces.md, "Cache"):

    items/key  (N,) str      items/kind (N,) uint8      items/split (N,) uint8
    views/params (N, V, K) float32
    teachers/<name>/emb (N, Vt, D) float16|float32    valid (N,) bool    done (S,) bool    stats (2, D)

Rows follow the manifest (shard, sample, image before its patches), so a shard is one contiguous
block. The shared arrays (items/*, views/params) depend only on the manifest, the view spec and the
seed, so every process that opens the store derives the same content; the first one writes them
under a lock and the others check that the store was made for the same shards and views.

Several ranks write different shards of one teacher at once. Chunks run along N and do not follow
shard boundaries (shards hold different item counts), so two neighbouring shards can share a chunk,
and zarr updates a partly written chunk by read-modify-write: two unsynchronised writers would each
put back the other's half as it was before. Block writes therefore hold an exclusive `fcntl` lock on
a file in the store. Writing is a small part of a precompute (the teachers dominate), so the
serialisation costs nothing measurable. The per-shard `done` flags have one chunk per shard and
need no lock. Object stores have no such lock; several ranks writing one remote store are refused.
Who else may write or read a teacher meanwhile is settled by the locks in `locks.py`.

Every chunk carries a CRC32C of its stored bytes (zarr's crc32c codec after the compressor), so a
flipped bit on disk fails the read instead of decoding to wrong embeddings a student would learn.
Any read that meets a damaged chunk raises `DamagedCache`, one line naming the cache, the chunk
file, the teacher and the shards it holds, and the command that recomputes just those
(`leader precompute --repair`, which resets what `damaged_chunks` finds; see `repair_teacher`).
Caches written before the checksums still load; `summary()` says which arrays have none.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

import leader
from leader.errors import LeaderError
from leader.io import open_input
from leader.precompute.locks import local_store_path, no_readers, register_reader, store_lock
from leader.shards.layout import KIND_CODES, SPLIT_CODES, item_keys, iter_shard_metas
from leader.shards.manifest import KEYS_NAME, Manifest
from leader.views import K, ViewSpec, sample_view_params

FORMAT = "leader-cache/1"
DTYPES = ("float16", "float32")

# Embeddings barely compress (measured on pooled ResNet features and on signed 1376-d vectors:
# 1.0-1.4x), so the codec is chosen for speed: Blosc zstd at level 1 with byte shuffle decodes at
# hundreds of MB/s per core, far above what a trainer reads, and still saves ~30% on ReLU features.
EMB_CODEC = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")
# A CRC32C of each chunk's stored bytes: a flipped bit fails the read (cost: see benchmarks/cache_cost.py).
CHECKSUM = Crc32cCodec()
EMB_CODECS = (EMB_CODEC, CHECKSUM)
SMALL_CODECS = (ZstdCodec(level=0), CHECKSUM)    # zarr's own default compressor, then the checksum
SHARED_ARRAYS = ("items/key", "items/kind", "items/split", "views/params")
TEACHER_ARRAYS = ("emb", "valid", "done", "stats")
MAX_DAMAGE_LISTED = 50
ITEM_CHUNK_ROWS = 1 << 16              # keys, kinds, splits: small per row, read in blocks
MAX_CHUNK_BYTES = 16 << 20             # cap on one uncompressed embedding/params chunk
FLUSH_ROWS = 1 << 16                   # rows buffered while the shared arrays are written

# Attributes that must agree between a teacher's stored arrays and the teacher run now.
TEACHER_IDENTITY = ("kind", "fingerprint", "dim", "input_size", "n_views", "dtype", "preprocessing")


def chunk_rows_for(shard_items: Sequence[int], row_bytes: int) -> int:
    """Rows per chunk along N: half a typical shard, capped by bytes.

    With half a shard per chunk, one shard block touches at most three chunks and a block read
    decodes at most 1.5x the rows it returns; bigger chunks would double that, smaller ones multiply
    the number of objects in an object store.
    """
    counts = sorted(shard_items) or [1]
    typical = counts[len(counts) // 2]
    return int(max(1, min(-(-typical // 2), MAX_CHUNK_BYTES // max(1, row_bytes))))


def keys_fingerprint(manifest: Manifest) -> str:
    """sha256 of keys.txt: every sample key and its item count, in manifest order."""
    h = hashlib.sha256()
    with open_input(manifest.path(KEYS_NAME), "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _plain(value: Any) -> Any:
    """What a value looks like after a round trip through the JSON attributes (tuples -> lists)."""
    return json.loads(json.dumps(value))


class DamagedCache(LeaderError):
    """A chunk of the cache failed its checksum or did not decode; the message says what to rerun."""


@dataclass(frozen=True)
class DamagedChunk:
    array: str                   # e.g. "teachers/disease/emb"
    file: str                    # the chunk's file (or URL)
    rows: tuple[int, int]        # the rows it holds along the first axis
    reason: str


@dataclass
class RepairReport:
    """What `repair_teacher` found and reset, for the command to print."""

    teacher: str
    damaged: list[DamagedChunk] = field(default_factory=list)
    nonfinite_shards: list[int] = field(default_factory=list)
    shards_reset: list[int] = field(default_factory=list)
    shared_rewritten: bool = False
    stats_dropped: bool = False
    unchecked: list[str] = field(default_factory=list)      # arrays without checksums


class TeacherCache:
    """One Zarr v3 store of teacher embeddings for one shard set."""

    def __init__(self, path: str | Path, group: zarr.Group):
        self.path = str(path)
        self.group = group
        self.attrs = dict(group.attrs)
        self._arrays: dict[str, zarr.Array] = {}
        self._reading: set[str] = set()         # teachers this (read-only) cache holds a reader lock on

    # ---- opening ----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "TeacherCache":
        """Open an existing, complete cache ("r" to read, "r+" to write embeddings)."""
        local = local_store_path(path)
        if local is not None and not (local / "zarr.json").exists():
            raise LeaderError(f"no teacher cache at {path} (run `leader precompute` first)")
        try:
            group = zarr.open_group(_store_url(path), mode=mode)
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise LeaderError(f"no teacher cache at {path}: {e}") from None
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT:
            raise LeaderError(f"{path} is a Zarr store but not a leader teacher cache (format {attrs.get('format')!r})")
        if not attrs.get("complete"):
            raise LeaderError(f"teacher cache {path} was never finished being created; rerun `leader precompute` to complete it")
        return cls(path, group)

    @classmethod
    def create_or_open(cls, path: str | Path, manifest: Manifest, n_views: int, view_spec: ViewSpec,
                       seed: int, patch_size: int = 224,
                       on_progress: Callable[[int, int], None] | None = None) -> "TeacherCache":
        """Open the cache at `path` for these shards and views, creating its shared arrays if needed.

        Safe to call from several processes at once: creation happens under the store lock, and a
        process that finds the store made checks it was made for the same shards, view spec, seed
        and patch size, and holds at least `n_views` views per item.
        """
        if int(n_views) < 1:
            raise LeaderError(f"--views must be at least 1, got {n_views}")
        wanted = {
            "manifest_fingerprint": manifest.fingerprint(),
            "keys_sha256": keys_fingerprint(manifest),
            "n_items": int(manifest.n_items),
            "n_shards": len(manifest.shards),
            "view_spec": view_spec.to_dict(),
            "seed": int(seed),
            "patch_size": int(patch_size),
        }
        with store_lock(path):
            local = local_store_path(path)
            exists = (local / "zarr.json").exists() if local is not None else _remote_exists(path)
            if exists:
                group = zarr.open_group(_store_url(path), mode="r+")
                attrs = dict(group.attrs)
                if attrs.get("format") != FORMAT:
                    raise LeaderError(f"{path} is a Zarr store but not a leader teacher cache; choose another --cache")
                if attrs.get("complete"):
                    _check_made_for(path, attrs, wanted, int(n_views))
                    return cls(path, group)
            # A cache without the `complete` flag is a creation that was killed: make its arrays
            # again, in place (mode "w" would delete the lock file other processes wait on).
            group = zarr.open_group(_store_url(path), mode="a", attributes={"format": FORMAT, "complete": False})
            group.attrs.update({"format": FORMAT, "complete": False})
            _write_shared_arrays(group, manifest, int(n_views), view_spec, int(seed), on_progress)
            group.attrs.update({"format": FORMAT, **wanted, "n_views": int(n_views),
                                "shard_rows": [list(s.rows) for s in manifest.shards],
                                "leader_version": leader.__version__, "created": utc_now()})
            group.attrs["complete"] = True      # the flag after the data
            return cls(path, group)


    # ---- store-level facts ------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return int(self.attrs["n_items"])

    @property
    def n_shards(self) -> int:
        return int(self.attrs["n_shards"])

    @property
    def n_views(self) -> int:
        return int(self.attrs["n_views"])

    @property
    def view_spec(self) -> ViewSpec:
        return ViewSpec.from_dict(self.attrs["view_spec"])

    @property
    def seed(self) -> int:
        return int(self.attrs["seed"])

    @property
    def patch_size(self) -> int:
        return int(self.attrs["patch_size"])

    @property
    def shard_rows(self) -> list[tuple[int, int]]:
        return [tuple(r) for r in self.attrs["shard_rows"]]

    @property
    def teachers(self) -> list[str]:
        if "teachers" not in self.group:
            return []
        return sorted(self.group["teachers"].group_keys())

    def teacher_attrs(self, name: str) -> dict:
        """The teacher's attributes as stored now (re-read: other processes may have added to them)."""
        return dict(self._teacher_group(name, fresh=True).attrs)

    def check_against(self, manifest: Manifest) -> None:
        """Raise LeaderError unless this cache was made for exactly these shards."""
        problems = self.mismatches(manifest)
        if problems:
            raise LeaderError(f"teacher cache {self.path} does not match the shards at {manifest.root}: {problems[0]}")

    def mismatches(self, manifest: Manifest) -> list[str]:
        a, problems = self.attrs, []
        if a["n_shards"] != len(manifest.shards):
            problems.append(f"the cache has {a['n_shards']} shards, the manifest {len(manifest.shards)}")
        if a["n_items"] != manifest.n_items:
            problems.append(f"the cache has {a['n_items']} items, the manifest {manifest.n_items}")
        if a["keys_sha256"] != keys_fingerprint(manifest):
            problems.append(f"the sample keys differ (keys.txt sha256 {keys_fingerprint(manifest)[:12]}..., "
                            f"cache made for {a['keys_sha256'][:12]}...)")
        if a["manifest_fingerprint"] != manifest.fingerprint():
            problems.append(f"the cache was made for other shards (manifest fingerprint {a['manifest_fingerprint'][:12]}..., "
                            f"these shards {manifest.fingerprint()[:12]}...); rebuild the cache")
        return problems

    # ---- reading: one zarr read per call ----------------------------------------------------
    def read_keys(self, row_start: int, row_stop: int) -> list[str]:
        return self._read("items/key", row_start, row_stop).tolist()

    def read_kind(self, row_start: int, row_stop: int) -> np.ndarray:
        return self._read("items/kind", row_start, row_stop)

    def read_split(self, row_start: int, row_stop: int) -> np.ndarray:
        return self._read("items/split", row_start, row_stop)

    def read_params(self, row_start: int, row_stop: int) -> np.ndarray:
        return self._read("views/params", row_start, row_stop)

    def read_block(self, name: str, row_start: int, row_stop: int) -> np.ndarray:
        """(n, Vt, D) embeddings of rows [row_start, row_stop), in the stored dtype."""
        return self._read(f"teachers/{name}/emb", row_start, row_stop)

    def read_valid(self, name: str, row_start: int, row_stop: int) -> np.ndarray:
        return self._read(f"teachers/{name}/valid", row_start, row_stop)

    def is_done(self, name: str) -> np.ndarray:
        """(S,) bool: which shards hold this teacher's finished embeddings."""
        return self._read(f"teachers/{name}/done")

    def stats(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-dimension (mean, std) over train images, view 0; None until every shard is done."""
        if "stats" not in self._teacher_group(name, fresh=True):
            return None
        self._arrays.pop(f"teachers/{name}/stats", None)      # rewritten by whoever finished the teacher
        stats = self._read(f"teachers/{name}/stats")
        return stats[0], stats[1]

    def emb_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._array(f"teachers/{name}/emb").shape)

    # ---- writing teachers -------------------------------------------------------------------
    def ensure_teacher(self, name: str, description: Mapping[str, Any], *, n_views: int, dtype: str = "float16",
                       role: str | None = None, replace_mismatched: bool = False) -> None:
        """Create `teachers/<name>` for a teacher, or check that the stored one came from the same teacher.

        description: Teacher.describe() (kind, dim, input_size, fingerprint, preprocessing).
        replace_mismatched: drop a teacher computed with other weights or settings and start it
        again (what --overwrite-teacher asks); a matching teacher is kept, so that every rank of a
        multi-process run can pass it safely.
        """
        if dtype not in DTYPES:
            raise LeaderError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if not 1 <= n_views <= self.n_views:
            raise LeaderError(f"teacher {name!r} asks for {n_views} views; cache {self.path} holds "
                              f"{self.n_views} per item (use --views <= {self.n_views} or a new --cache)")
        wanted = _plain({**{k: description.get(k) for k in ("kind", "fingerprint", "dim", "preprocessing", "input_size")},
                         "n_views": int(n_views), "dtype": dtype})
        with store_lock(self.path), contextlib.ExitStack() as replacing:
            teachers = self.group.require_group("teachers")
            if name in teachers:
                stored = dict(teachers[name].attrs)
                # Without `complete_arrays` the group is a creation that was killed: make it again.
                if stored.get("complete_arrays"):
                    differences = [k for k in TEACHER_IDENTITY if stored.get(k) != wanted[k]]
                    if not differences:
                        return
                    if not replace_mismatched:
                        raise LeaderError(_mismatch_message(self.path, name, differences, stored, wanted))
                    replacing.enter_context(no_readers(self.path, name, "replacing its embeddings"))
            group = teachers.create_group(name, overwrite=True)
            self._arrays = {k: v for k, v in self._arrays.items() if not k.startswith(f"teachers/{name}/")}
            dim, itemsize = int(wanted["dim"]), np.dtype(dtype).itemsize
            rows = chunk_rows_for([b - a for a, b in self.shard_rows], n_views * dim * itemsize)
            group.create_array("emb", shape=(self.n_items, n_views, dim), dtype=dtype,
                               chunks=(rows, n_views, dim), compressors=EMB_CODECS, fill_value=np.nan)
            group.create_array("valid", shape=(self.n_items,), dtype=bool, chunks=(rows,), fill_value=False,
                               compressors=SMALL_CODECS)
            # One chunk per shard: ranks flag their own shards without sharing an object.
            group.create_array("done", shape=(self.n_shards,), dtype=bool, chunks=(1,), fill_value=False,
                               compressors=SMALL_CODECS)
            group.attrs.update({**wanted, "role": role or name, "name": name,
                                "leader_version": leader.__version__, "created": utc_now(),
                                "stats": None, "complete_arrays": True})

    def write_block(self, name: str, row_start: int, emb: np.ndarray, valid: np.ndarray) -> None:
        """Write one shard's rows (one write per array) under the store lock; see the module docstring."""
        array = self._array(f"teachers/{name}/emb")
        if emb.ndim != 3 or emb.shape[1:] != array.shape[1:]:
            raise LeaderError(f"teacher {name!r}: block shape {emb.shape} does not fit cache rows {array.shape[1:]}")
        row_stop = row_start + len(emb)
        with store_lock(self.path), self._disk_full_is_an_error(name, f"rows {row_start}-{row_stop}"):
            # A chunk shared with a neighbouring shard is read back and merged: it must be sound.
            with self._damage_is_named(f"teachers/{name}/emb", row_start, row_stop):
                array[row_start:row_stop] = emb.astype(array.dtype, copy=False)
            with self._damage_is_named(f"teachers/{name}/valid", row_start, row_stop):
                self._array(f"teachers/{name}/valid")[row_start:row_stop] = valid

    def mark_done(self, name: str, shard: int) -> None:
        with self._disk_full_is_an_error(name, f"the done flag of shard {shard}"):
            self._array(f"teachers/{name}/done")[shard] = True

    def write_stats(self, name: str, mean: np.ndarray, std: np.ndarray, info: Mapping[str, Any]) -> None:
        with store_lock(self.path), self._disk_full_is_an_error(name, "the standardisation statistics"):
            group = self._teacher_group(name, fresh=True)
            stats = np.stack([mean, std]).astype(np.float32)
            array = group.create_array("stats", shape=stats.shape, dtype="float32", chunks=stats.shape,
                                       compressors=SMALL_CODECS, overwrite=True)
            array[:] = stats
            self._arrays.pop(f"teachers/{name}/stats", None)
            group.attrs["stats"] = _plain(dict(info))

    @contextlib.contextmanager
    def _disk_full_is_an_error(self, name: str, what: str) -> Iterator[None]:
        """A full disk mid-write: one line naming the cache; shards already flagged done stay valid."""
        from leader.io import DISK_FULL

        try:
            yield
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            raise LeaderError(f"{DISK_FULL[e.errno]} while writing {what} of teacher {name!r} in cache {self.path}; "
                              "shards already marked done are intact and a rerun redoes the rest. Free some space and rerun") from e

    def update_teacher_attrs(self, name: str, values: Mapping[str, Any]) -> None:
        with store_lock(self.path):
            self._teacher_group(name, fresh=True).attrs.update(_plain(dict(values)))

    def reset_done(self, name: str, shard: int) -> None:
        """Mark a shard to be computed again by the next precompute."""
        self._array(f"teachers/{name}/done")[shard] = False      # a whole one-flag chunk: nothing is read

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with store_lock(self.path):
            yield

    # ---- summary ----------------------------------------------------------------------------
    def summary(self) -> dict:
        """What `leader cache info` shows: the store's settings and, per teacher, shape and progress."""
        teachers = {}
        for name in self.teachers:
            attrs = self.teacher_attrs(name)
            emb = self._array(f"teachers/{name}/emb")
            done = self.is_done(name)
            stored = sum(self._array(f"teachers/{name}/{a}").nbytes_stored() for a in ("emb", "valid", "done"))
            chunk_bytes = int(np.prod(emb.chunks)) * emb.dtype.itemsize
            written = emb.nchunks_initialized * chunk_bytes
            emb_stored = emb.nbytes_stored()
            valid = self.read_valid(name, 0, self.n_items)
            unchecked = self.unchecked_arrays(name)
            teachers[name] = {
                "kind": attrs.get("kind"), "role": attrs.get("role"), "dim": attrs.get("dim"),
                "views": int(emb.shape[1]), "dtype": str(emb.dtype),
                "fingerprint": attrs.get("fingerprint"),
                "done_shards": int(done.sum()), "n_shards": int(done.size),
                "done_fraction": float(done.mean()) if done.size else 0.0,
                "valid_items": int(valid.sum()),
                "bytes_stored": int(stored),
                "compression_ratio": round(written / emb_stored, 3) if emb_stored and written else None,
                "chunk_rows": int(emb.chunks[0]),
                "stats": attrs.get("stats") is not None,
                "audit": (attrs.get("audit") or {}).get("consistent_families"),
                "missing": attrs.get("missing"),
                "checksums": not unchecked,
                "unchecked_arrays": unchecked,
            }
        a = self.attrs
        unchecked = self.unchecked_arrays()
        return {"path": self.path, "n_items": a["n_items"], "n_shards": a["n_shards"], "n_views": a["n_views"],
                "seed": a["seed"], "patch_size": a["patch_size"], "view_spec": a["view_spec"],
                "manifest_fingerprint": a["manifest_fingerprint"], "leader_version": a.get("leader_version"),
                "created": a.get("created"), "checksums": not unchecked, "unchecked_arrays": unchecked,
                "teachers": teachers}

    # ---- checksums and damage ---------------------------------------------------------------
    def arrays(self, teacher: str | None = None) -> list[str]:
        """The store's arrays: the shared ones, or one teacher's (stats once they exist)."""
        if teacher is None:
            return list(SHARED_ARRAYS)
        group = self._teacher_group(teacher, fresh=True)
        return [f"teachers/{teacher}/{a}" for a in TEACHER_ARRAYS if a in group]

    def unchecked_arrays(self, teacher: str | None = None) -> list[str]:
        """Arrays whose chunks carry no checksum (written before leader added them)."""
        return [key for key in self.arrays(teacher)
                if not any(isinstance(c, Crc32cCodec) for c in self._array(key).compressors)]

    def damaged_chunks(self, key: str, row_start: int | None = None, row_stop: int | None = None) -> list[DamagedChunk]:
        """Every chunk of `key` (within rows [row_start, row_stop)) that fails its checksum or does not
        decode. Reads each chunk on its own, so it costs one read of those rows."""
        array = self._array(key)
        first, stop = row_start or 0, array.shape[0] if row_stop is None else row_stop
        rows_per_chunk = array.chunks[0]
        ranges = [range(-(-size // chunk)) for size, chunk in zip(array.shape[1:], array.chunks[1:])]
        damaged = []
        for i in range(first // rows_per_chunk, -(-stop // rows_per_chunk)):
            rows = (i * rows_per_chunk, min((i + 1) * rows_per_chunk, array.shape[0]))
            for rest in itertools.product(*ranges):
                where = (slice(*rows),) + tuple(slice(j * c, (j + 1) * c) for j, c in zip(rest, array.chunks[1:]))
                try:
                    array[where]
                except Exception as e:  # noqa: BLE001 - any failure to decode a chunk is damage
                    reason = ("its CRC32C checksum does not match" if "checksum" in str(e)
                              else f"it does not decode: {type(e).__name__}: {e}")
                    file = f"{self.path.rstrip('/')}/{key}/{array.metadata.encode_chunk_key((i, *rest))}"
                    damaged.append(DamagedChunk(key, file, rows, reason))
        return damaged

    def damage_message(self, damaged: Sequence[DamagedChunk]) -> str:
        """One line: what the first damaged chunk holds, its file, and how to recompute just that."""
        first = damaged[0]
        parts = first.array.split("/")
        a, b = first.rows
        more = (f" (and {len(damaged) - 1} more damaged chunk(s); `leader cache verify --deep` lists them)"
                if len(damaged) > 1 else "")
        if parts[0] == "teachers":
            name, what = parts[1], parts[2]
            held = {"emb": f"the embeddings of shard(s) {_listed(self.shards_in(a, b))} (rows {a}-{b})",
                    "valid": f"the valid flags of shard(s) {_listed(self.shards_in(a, b))} (rows {a}-{b})",
                    "done": f"the done flag of shard {a}",
                    "stats": "its standardisation statistics"}[what]
            return (f"cache {self.path}: teacher {name!r}: {held} sit in {first.file}, which is damaged "
                    f"({first.reason}){more}; recompute just that with `{self.repair_command(name)}` "
                    "(with the teacher's usual --model and options)")
        return (f"cache {self.path}: the shared array {first.array} (rows {a}-{b}, shard(s) "
                f"{_listed(self.shards_in(a, b))}) sits in {first.file}, which is damaged ({first.reason}){more}; "
                f"rewrite it from the shards with `{self.repair_command('<any teacher in it>')}`")

    def repair_command(self, name: str) -> str:
        local = local_store_path(self.path)
        if local is not None and local.name == "cache.zarr" and (local.parent / "manifest.json").exists():
            return f"leader precompute --teacher {name} --shards {local.parent} --repair"
        return f"leader precompute --teacher {name} --shards <its shards> --cache {self.path} --repair"

    def shards_in(self, row_start: int, row_stop: int) -> list[int]:
        """The shards holding any of rows [row_start, row_stop)."""
        return [i for i, (a, b) in enumerate(self.shard_rows) if a < row_stop and row_start < b]

    # ---- internals --------------------------------------------------------------------------
    def _read(self, key: str, row_start: int | None = None, row_stop: int | None = None) -> np.ndarray:
        """array[row_start:row_stop]; a damaged chunk there becomes DamagedCache naming it."""
        array = self._array(key)
        with self._damage_is_named(key, row_start, row_stop):
            return array[row_start:row_stop]

    @contextlib.contextmanager
    def _damage_is_named(self, key: str, row_start: int | None, row_stop: int | None) -> Iterator[None]:
        try:
            yield
        except LeaderError:
            raise
        except Exception:
            # Only on the error path: find which chunk failed, so the message can name it.
            damaged = self.damaged_chunks(key, row_start, row_stop)
            if not damaged:
                raise
            raise DamagedCache(self.damage_message(damaged)) from None

    # ---- internals --------------------------------------------------------------------------
    def _array(self, key: str) -> zarr.Array:
        if key not in self._arrays:
            parts = key.split("/")
            if parts[0] == "teachers" and self.group.read_only and parts[1] not in self._reading:
                # Readers hold a shared lock, so that no one replaces or repairs this teacher under them.
                register_reader(self.path, parts[1], self)
                self._reading.add(parts[1])
            try:
                self._arrays[key] = self.group[key]
            except KeyError:
                parts = key.split("/")
                if parts[0] == "teachers":
                    known = ", ".join(self.teachers) or "none"
                    raise LeaderError(f"teacher {parts[1]!r} is not in cache {self.path} (teachers: {known})") from None
                raise LeaderError(f"teacher cache {self.path} lacks array {key}") from None
        return self._arrays[key]

    def _teacher_group(self, name: str, fresh: bool = False) -> zarr.Group:
        if name not in self.teachers:
            known = ", ".join(self.teachers) or "none"
            raise LeaderError(f"teacher {name!r} is not in cache {self.path} (teachers: {known})")
        if fresh:
            mode = "r" if self.group.read_only else "r+"
            return zarr.open_group(_store_url(self.path), path=f"teachers/{name}", mode=mode)
        return self.group["teachers"][name]


# ---------------------------------------------------------------------------------------------
# Verification


def find_problems(cache: TeacherCache, manifest: Manifest, max_listed: int = 5, deep: bool = False) -> list[str]:
    """Everything wrong between a cache and its shards, one message per problem (empty: all good).

    Checks the store against the manifest, the item keys against keys.txt, and per teacher: its
    attributes, the embedding shape against them, the done flags, NaN/Inf in valid rows of done
    shards, and the standardisation stats of a complete teacher. Those checks read the keys and
    every done shard's embeddings, so a damaged chunk there is found; `deep` also reads every
    other chunk of every array and names each damaged chunk file.
    """
    problems = cache.mismatches(manifest)
    if cache.n_items != manifest.n_items or cache.n_shards != len(manifest.shards):
        return problems            # rows cannot be compared
    damaged = []
    if deep:
        for teacher in [None, *cache.teachers]:
            damaged += [d for key in cache.arrays(teacher) for d in cache.damaged_chunks(key)]
        problems += [f"chunk {d.file} ({d.array}, rows {d.rows[0]}-{d.rows[1]}) is damaged: {d.reason}"
                     for d in damaged[:MAX_DAMAGE_LISTED]]
        if len(damaged) > MAX_DAMAGE_LISTED:
            problems.append(f"... and {len(damaged) - MAX_DAMAGE_LISTED} more damaged chunks")
    sections = [lambda: _key_problems(cache, manifest, max_listed)]
    sections += [lambda name=name: _teacher_problems(cache, name, max_listed) for name in cache.teachers]
    for section in sections:
        try:
            problems += section()
        except DamagedCache as e:
            if not damaged:          # the deep pass has named every damaged chunk already
                problems.append(str(e))
    if damaged:
        problems.append(_repair_advice(cache, damaged))
    return problems


def _repair_advice(cache: TeacherCache, damaged: list[DamagedChunk]) -> str:
    teachers = sorted({d.array.split("/")[1] for d in damaged if d.array.startswith("teachers/")})
    shared = any(not d.array.startswith("teachers/") for d in damaged)
    names = teachers or ["<any teacher in it>"]
    what = "rewrites the shared arrays and " if shared else ""
    return (f"{len(damaged)} damaged chunk(s): " + "; ".join(f"`{cache.repair_command(n)}`" for n in names)
            + f" {what}recomputes only the shards they hold")


# ---------------------------------------------------------------------------------------------
# Repair: reset what fails verification, so that the usual resumable loop recomputes just that


def repair_teacher(cache: TeacherCache, manifest: Manifest, name: str) -> RepairReport:
    """Prepare teacher `name` of a writable cache for recomputing whatever fails verification.

    Under the store lock and with no reader of the teacher: damaged shared arrays are written again
    from the shards (their content depends on the manifest, view spec and seed only); a damaged
    embedding or valid chunk is overwritten whole with the fill value (a whole-chunk write reads
    nothing back) and the done flag of every shard it touches is reset; so is a damaged done flag,
    and the flag of every done shard with NaN/Inf in a valid row. When anything was reset, or the
    statistics are damaged, they are dropped so that the finished teacher computes them again.
    The caller then runs the precompute, which redoes exactly the shards not done.
    """
    report = RepairReport(name)
    with store_lock(cache.path), no_readers(cache.path, name, "--repair"):
        report.unchecked = cache.unchecked_arrays() + cache.unchecked_arrays(name)
        shared = [d for key in cache.arrays() for d in cache.damaged_chunks(key)]
        if shared:
            report.damaged += shared
            # Unfinished until rewritten: a kill in between leaves a store `create_or_open` redoes.
            cache.group.attrs["complete"] = False
            _write_shared_arrays(cache.group, manifest, cache.n_views, cache.view_spec, cache.seed, None)
            cache.group.attrs["complete"] = True
            cache._arrays.clear()
            report.shared_rewritten = True
        prefix = f"teachers/{name}"
        damaged = {key.rsplit("/", 1)[1]: cache.damaged_chunks(key) for key in cache.arrays(name)}
        report.damaged += [d for chunks in damaged.values() for d in chunks]
        reset: set[int] = set()
        for d in damaged.get("emb", []) + damaged.get("valid", []):
            a, b = d.rows
            cache._array(f"{prefix}/emb")[a:b] = np.nan
            cache._array(f"{prefix}/valid")[a:b] = False
            reset |= set(cache.shards_in(a, b))
        reset |= {d.rows[0] for d in damaged.get("done", [])}
        for shard in sorted(reset):
            cache.reset_done(name, shard)
        for shard in np.flatnonzero(cache.is_done(name)):
            a, b = cache.shard_rows[shard]
            if (cache.read_valid(name, a, b) & ~np.isfinite(cache.read_block(name, a, b)).all(axis=(1, 2))).any():
                report.nonfinite_shards.append(int(shard))
                cache.reset_done(name, int(shard))
        report.shards_reset = sorted(reset | set(report.nonfinite_shards))
        if report.shards_reset or damaged.get("stats"):
            group = cache._teacher_group(name, fresh=True)
            if "stats" in group:
                del group["stats"]
            group.attrs.update({"stats": None, "completed": None})
            cache._arrays.pop(f"{prefix}/stats", None)
            report.stats_dropped = True
    return report


def _key_problems(cache: TeacherCache, manifest: Manifest, max_listed: int) -> list[str]:
    listed = manifest.iter_keys()
    problems = []
    for shard in manifest.shards:
        a, b = shard.rows
        expected: list[str] = []
        while len(expected) < b - a:
            key, n = next(listed, (None, 0))
            if key is None:
                return problems + [f"{KEYS_NAME} ends before row {a + len(expected)} of shard {shard.name}"]
            expected += item_keys(key, n - 1)
        stored = cache.read_keys(a, b)
        if stored != expected:
            row = next(i for i, (x, y) in enumerate(zip(stored, expected)) if x != y) if len(stored) == len(expected) else 0
            problems.append(f"items/key row {a + row} (shard {shard.name}) is {stored[row]!r}; "
                            f"{KEYS_NAME} says {expected[row]!r}")
            if len(problems) >= max_listed:
                break
    return problems


def _teacher_problems(cache: TeacherCache, name: str, max_listed: int) -> list[str]:
    who = f"teacher {name!r}"
    attrs = cache.teacher_attrs(name)
    absent = [k for k in ("kind", "fingerprint", "dim", "dtype", "n_views", "preprocessing") if attrs.get(k) in (None, "")]
    if absent:
        return [f"{who}: attributes {', '.join(absent)} are missing (the teacher's creation was interrupted; "
                "rerun leader precompute with --overwrite-teacher)"]
    problems = []
    fingerprint = str(attrs["fingerprint"])
    if len(fingerprint) != 64 or any(c not in "0123456789abcdef" for c in fingerprint):
        problems.append(f"{who}: fingerprint {fingerprint!r} is not a sha256 of the weights")
    shape = cache.emb_shape(name)
    expected = (cache.n_items, int(attrs["n_views"]), int(attrs["dim"]))
    if shape != expected:
        return problems + [f"{who}: emb has shape {shape}; its attributes say (n_items, n_views, dim) = {expected}"]
    done = cache.is_done(name)
    if not done.all():
        missing = np.flatnonzero(~done)
        listed = ", ".join(str(i) for i in missing[:max_listed]) + (", ..." if missing.size > max_listed else "")
        problems.append(f"{who}: {missing.size} of {done.size} shards are not done (shards {listed}); "
                        f"rerun leader precompute --teacher {name}")
    bad_rows: list[str] = []
    for shard_index in np.flatnonzero(done):
        a, b = cache.shard_rows[shard_index]
        emb = cache.read_block(name, a, b)
        valid = cache.read_valid(name, a, b)
        bad = np.flatnonzero(valid & ~np.isfinite(emb).all(axis=(1, 2)))
        if bad.size:
            keys = cache.read_keys(a, b)
            bad_rows += [f"{a + r} ({keys[r]})" for r in bad[: max_listed - len(bad_rows)]]
            if len(bad_rows) >= max_listed:
                break
    if bad_rows:
        problems.append(f"{who}: NaN/Inf embeddings in valid rows, first: {', '.join(bad_rows)}; "
                        f"`{cache.repair_command(name)}` recomputes those shards")
    if done.all():
        stats = cache.stats(name)
        if stats is None:
            problems.append(f"{who}: every shard is done but the standardisation stats are missing; "
                            f"rerun leader precompute --teacher {name} to compute them")
        elif not (np.isfinite(stats[0]).all() and np.isfinite(stats[1]).all()):
            problems.append(f"{who}: the standardisation stats hold NaN/Inf")
    return problems


def _listed(values: Sequence[int]) -> str:
    return ", ".join(str(v) for v in values) or "none"


# ---------------------------------------------------------------------------------------------
# Creation of the shared arrays


def _write_shared_arrays(group: zarr.Group, manifest: Manifest, n_views: int, view_spec: ViewSpec,
                         seed: int, on_progress: Callable[[int, int], None] | None) -> None:
    n = int(manifest.n_items)
    rows = chunk_rows_for([s.n_items for s in manifest.shards], n_views * K * 4)
    item_chunks = (min(ITEM_CHUNK_ROWS, max(n, 1)),)
    items = group.create_group("items", overwrite=True)
    keys = items.create_array("key", shape=(n,), dtype=str, chunks=item_chunks, compressors=SMALL_CODECS)
    kinds = items.create_array("kind", shape=(n,), dtype="uint8", chunks=item_chunks, compressors=SMALL_CODECS)
    splits = items.create_array("split", shape=(n,), dtype="uint8", chunks=item_chunks, compressors=SMALL_CODECS)
    params = group.create_group("views", overwrite=True).create_array(
        "params", shape=(n, n_views, K), dtype="float32", chunks=(rows, n_views, K), compressors=EMB_CODECS)

    buffer: dict[str, list] = {"key": [], "kind": [], "split": []}
    flushed = 0

    def flush() -> None:
        nonlocal flushed
        m = len(buffer["key"])
        if m == 0:
            return
        stop = flushed + m
        keys[flushed:stop] = np.array(buffer["key"])
        kinds[flushed:stop] = np.array(buffer["kind"], dtype=np.uint8)
        splits[flushed:stop] = np.array(buffer["split"], dtype=np.uint8)
        params[flushed:stop] = sample_view_params(view_spec, seed, buffer["key"], n_views)
        for v in buffer.values():
            v.clear()
        flushed = stop

    listed = manifest.iter_keys()
    row = 0
    for shard_index, shard in enumerate(manifest.shards):
        if shard.rows[0] != row:
            raise LeaderError(f"manifest of {manifest.root}: shard {shard.name} starts at row {shard.rows[0]}, "
                              f"but the shards before it end at row {row}")
        for meta in iter_shard_metas(manifest.path(shard.name)):
            key = meta["key"]
            listed_key, listed_n = next(listed, (None, None))
            patches = meta.get("patches") or []
            n_items = 1 + len(patches)
            if listed_key != key or listed_n != n_items:
                raise LeaderError(f"shard {shard.name}: sample {key!r} with {n_items} items disagrees with "
                                  f"{KEYS_NAME} ({listed_key!r}, {listed_n} items) at row {row}")
            if list(meta.get("rows", [])) != [row, row + n_items]:
                raise LeaderError(f"shard {shard.name}: sample {key!r} records rows {meta.get('rows')}, "
                                  f"manifest order gives [{row}, {row + n_items}]")
            split = meta.get("split")
            if split not in SPLIT_CODES:
                raise LeaderError(f"shard {shard.name}: sample {key!r} has split {split!r}; expected one of {list(SPLIT_CODES)}")
            kind_codes = [KIND_CODES["image"]]
            for j, patch in enumerate(patches):
                if patch.get("kind") not in KIND_CODES:
                    raise LeaderError(f"shard {shard.name}: patch {j} of {key!r} has kind {patch.get('kind')!r}")
                kind_codes.append(KIND_CODES[patch["kind"]])
            buffer["key"].extend(item_keys(key, n_items - 1))
            buffer["kind"].extend(kind_codes)
            buffer["split"].extend([SPLIT_CODES[split]] * n_items)
            row += n_items
            if len(buffer["key"]) >= FLUSH_ROWS:
                flush()
        if row != shard.rows[1]:
            raise LeaderError(f"shard {shard.name} holds items up to row {row}, the manifest says {shard.rows[1]}")
        if on_progress is not None:
            on_progress(shard_index + 1, len(manifest.shards))
    flush()
    if row != n:
        raise LeaderError(f"the shards of {manifest.root} hold {row} items; the manifest says {n}")


def _check_made_for(path: str | Path, attrs: dict, wanted: dict, n_views: int) -> None:
    if attrs["manifest_fingerprint"] != wanted["manifest_fingerprint"] or attrs["keys_sha256"] != wanted["keys_sha256"]:
        raise LeaderError(f"cache {path} was made for other shards (manifest fingerprint "
                          f"{attrs['manifest_fingerprint'][:12]}..., these shards {wanted['manifest_fingerprint'][:12]}...); "
                          "use a new --cache")
    for name in ("view_spec", "seed", "patch_size"):
        if _plain(attrs[name]) != _plain(wanted[name]):
            raise LeaderError(f"cache {path} was made with another {name.replace('_', ' ')} ({attrs[name]!r}; "
                              f"asked now: {wanted[name]!r}); use the same setting or a new --cache")
    if n_views > attrs["n_views"]:
        raise LeaderError(f"cache {path} holds {attrs['n_views']} views per item; {n_views} were asked for "
                          f"(use --views <= {attrs['n_views']} or a new --cache)")


def _mismatch_message(path: str, name: str, differences: list[str], stored: dict, wanted: dict) -> str:
    if "fingerprint" in differences:
        what = (f"was computed with weights sha256 {str(stored.get('fingerprint'))[:12]}..., "
                f"the model given now has {str(wanted['fingerprint'])[:12]}...")
    elif differences[0] == "preprocessing" and isinstance(stored.get("preprocessing"), dict):
        before, now = stored["preprocessing"], wanted["preprocessing"] or {}
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        what = "was computed with other preprocessing (" + "; ".join(
            f"{k}: {before.get(k)!r}, now {now.get(k)!r}" for k in changed) + ")"
    else:
        first = differences[0]
        what = f"was computed with {first} {stored.get(first)!r}; the teacher now has {wanted[first]!r}"
        if len(differences) > 1:
            what += f" (also differing: {', '.join(differences[1:])})"
    return f"teacher {name!r} in cache {path} {what}; use a new --cache or --overwrite-teacher"


# ---------------------------------------------------------------------------------------------
# URLs


def _store_url(path: str | Path) -> str:
    local = local_store_path(path)
    return str(local) if local is not None else str(path)


def _remote_exists(path: str | Path) -> bool:
    try:
        zarr.open_group(str(path), mode="r")
        return True
    except FileNotFoundError:   # zarr's GroupNotFoundError is one
        return False
