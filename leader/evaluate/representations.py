"""Representations by name: what every evaluation protocol is run on.

    X, rows = features("teacher:disease", "shards/phantom", kind="image", split="test")
    X, rows = features("run:runs/demo/students/student", "shards/phantom", rows=[0, 5, 9])
    X, rows = features("concat:teacher:disease+teacher:anatomy", "shards/phantom", rows=rows)

Names:
- `run:RUN` is the student backbone E_DA of a training run; `run:RUN:disease` (or any teacher
  name the run has a head for) is that head's output E'. Embedded through `leader.train.embed`.
- `teacher:NAME` is teacher NAME's view-0 (identity) embedding, read from the cache: no teacher
  is loaded. The cache is `cache.zarr` beside the shards unless another is given.
- `concat:A+B[+C...]` is the concatenation ensemble. Each part is L2-normalised per item and the
  result divided by sqrt(number of parts), so every part carries the same weight whatever its
  width or scale (a 1376-d teacher does not drown a 256-d one), and the cosine similarity of a
  concatenation is the mean of its parts' cosines.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from leader.errors import LeaderError
from leader.shards.layout import default_cache_path
from leader.shards.manifest import Manifest

FORMS = "run:RUN[:HEAD], teacher:NAME or concat:A+B"


@dataclass(frozen=True)
class Representation:
    kind: str                              # "run" | "teacher" | "concat"
    target: str = ""                       # run directory or teacher name
    head: str = "backbone"                 # for runs: "backbone" or a teacher name
    parts: tuple["Representation", ...] = ()

    def __str__(self) -> str:
        if self.kind == "concat":
            return "concat:" + "+".join(str(p) for p in self.parts)
        if self.kind == "run":
            return f"run:{self.target}" + ("" if self.head == "backbone" else f":{self.head}")
        return f"teacher:{self.target}"


def parse_representation(spec: str) -> Representation:
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise LeaderError(f"representation {spec!r} is not one of {FORMS}")
    if kind == "teacher":
        return Representation("teacher", rest)
    if kind == "run":
        path, colon, head = rest.rpartition(":")
        # A suffix is a head unless the whole thing names an existing directory (a path with ':').
        if colon and "/" not in head and not Path(rest).is_dir():
            return Representation("run", path, head)
        return Representation("run", rest)
    if kind == "concat":
        parts = tuple(parse_representation(p) for p in rest.split("+"))
        if len(parts) < 2 or any(p.kind == "concat" for p in parts):
            raise LeaderError(f"representation {spec!r}: concat needs two or more run:/teacher: parts, "
                              "e.g. concat:teacher:disease+teacher:anatomy")
        return Representation("concat", parts=parts)
    raise LeaderError(f"representation {spec!r}: unknown kind {kind!r}; use {FORMS}")


def features(
    spec: str | Representation,
    shards_dir: str | Path,
    rows: Sequence[int] | np.ndarray | None = None,
    *,
    kind: str | Sequence[str] | None = None,
    split: str | Sequence[str] | None = None,
    cache: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """(X (n, d) float32, rows (n,)) for the given item rows, or for the items of `kind`/`split`."""
    rep = parse_representation(spec) if isinstance(spec, str) else spec
    if rows is None:
        from leader.evaluate.items import ItemTable, rows_of

        rows = rows_of(ItemTable.load(shards_dir).select(kind=kind, split=split))
    rows = np.asarray(rows, dtype=np.int64)
    return _features(rep, Path(shards_dir), rows, cache, device, batch_size), rows


def _features(rep: Representation, shards_dir: Path, rows: np.ndarray, cache, device, batch_size) -> np.ndarray:
    if rep.kind == "teacher":
        return teacher_features(rep.target, shards_dir, rows, cache)
    if rep.kind == "run":
        return run_features(rep.target, rep.head, shards_dir, rows, device, batch_size)
    parts = [_features(p, shards_dir, rows, cache, device, batch_size) for p in rep.parts]
    unit = [p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12) for p in parts]
    return (np.concatenate(unit, axis=1) / np.sqrt(len(parts))).astype(np.float32)


def teacher_features(name: str, shards_dir: Path, rows: np.ndarray, cache_path: str | Path | None = None) -> np.ndarray:
    """View-0 embeddings of teacher `name` for `rows`, read one block per shard that holds any."""
    from leader.precompute.cache import TeacherCache

    manifest = Manifest.load(shards_dir)
    cache_path = cache_path or default_cache_path(shards_dir)
    cache = TeacherCache.open(cache_path)
    cache.check_against(manifest)
    if name not in cache.teachers:
        raise LeaderError(f"teacher {name!r} is not in the cache {cache_path}; it holds {cache.teachers or 'no teacher'}")
    if len(rows) and (rows.min() < 0 or rows.max() >= manifest.n_items):
        raise LeaderError(f"item rows must lie in [0, {manifest.n_items}) for {shards_dir}")
    done = cache.is_done(name)
    out = np.empty((len(rows), cache.emb_shape(name)[-1]), dtype=np.float32)
    for shard, (start, stop) in enumerate(cache.shard_rows):
        wanted = np.flatnonzero((rows >= start) & (rows < stop))
        if len(wanted) == 0:
            continue
        if not done[shard]:
            raise LeaderError(f"teacher {name!r} has not finished shard {shard} of {cache_path}; "
                              f"rerun `leader precompute --teacher {name}`")
        local = rows[wanted] - start
        valid = cache.read_valid(name, start, stop)[local]
        if not valid.all():
            key = cache.read_keys(start, stop)[int(local[~valid][0])]
            raise LeaderError(f"teacher {name!r} has no embedding for {int((~valid).sum())} of the requested items "
                              f"in shard {shard} (e.g. {key!r}); evaluate on items it covers")
        out[wanted] = cache.read_block(name, start, stop)[local, 0]
    if not np.isfinite(out).all():
        raise LeaderError(f"teacher {name!r}: the cache {cache_path} holds non-finite embeddings for the requested items")
    return out


def run_features(run_dir: str, head: str, shards_dir: Path, rows: np.ndarray, device: str, batch_size: int) -> np.ndarray:
    if not Path(run_dir).is_dir():
        raise LeaderError(f"run directory {run_dir} not found (representation run:{run_dir})")
    from leader.train.embed import embed_items

    out = embed_items(run_dir, shards_dir, rows=rows, heads=(head,), batch_size=batch_size, device=device)
    return np.asarray(out[head], dtype=np.float32)
