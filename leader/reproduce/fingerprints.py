"""What a step's result depends on, and the markers that record a finished step.

A step's fingerprint is the sha256 of:
- its argument list as planned into a placeholder output folder (so `--out runs/x` and its
  absolute spelling agree), without the flags that only say how it runs (`--device`, `--workers`);
- the identity of every outside input it reads:
  - teacher weights, checkpoints and configs: the sha256 of the file, or of every file in the
    folder (a SavedModel). Hashes are remembered in OUT/state/input-hashes.json by path, size and
    modification time, so a multi-gigabyte teacher is read once, not on every run;
  - a dataset root: the relative path, size and modification time of its label files (.csv,
    .csv.gz, .json, .txt, .tsv, .xlsx) down to three folder levels; a folder of more than 1000
    entries (an image folder) is listed but not descended into. Images are not read: replacing an image without
    touching a label file goes unnoticed, while a new label release, or another copy of the
    dataset, is noticed. Reading every image of a 100k-image dataset on every run would cost
    more than most steps;
- the fingerprints of the steps it reads from, so a change reruns exactly what lies downstream.

A marker, OUT/state/STEP.json, says "started" (with the fingerprint) before a step runs and
"done" once its outputs are complete. A step is skipped when its marker says done with the current
fingerprint and its outputs are still complete. A step started or done with another fingerprint
starts over: its old outputs are removed first. A step with no marker (killed before writing one,
or run by hand from `--dry-run`) runs again, and resumes by itself as every `leader` command does.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from leader.io import atomic_write_json, sha256_file
from leader.reproduce.steps import Input, Plan, Step

LABEL_SUFFIXES = (".csv", ".csv.gz", ".json", ".txt", ".tsv", ".xlsx")
ROOT_DEPTH = 3
CROWDED = 1000                  # a folder with more entries than this holds images: list it, do not descend
HASHES_NAME = "input-hashes.json"


class InputIdentities:
    """Identities of outside inputs, with file hashes remembered between runs by (size, mtime)."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / HASHES_NAME
        self.memo: dict = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.changed = False
        self.seen: dict[tuple[str, str], str] = {}

    def identity(self, item: Input) -> str:
        key = (item.kind, str(item.path))
        if key not in self.seen:
            self.seen[key] = dataset_root_identity(item.path) if item.kind == "dataset" else self._content(item.path)
        return self.seen[key]

    def save(self) -> None:
        if self.changed:
            atomic_write_json(self.path, self.memo)
            self.changed = False

    def _content(self, path: Path) -> str:
        """sha256 of a file, or of a folder's files with their relative paths."""
        if not path.exists():
            return "missing"
        if path.is_file():
            return self._file_hash(path)
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(str(p.relative_to(path)).encode() + b"\0" + self._file_hash(p).encode())
        return h.hexdigest()

    def _file_hash(self, path: Path) -> str:
        stat = path.stat()
        signature = [stat.st_size, stat.st_mtime_ns]
        known = self.memo.get(str(path.resolve()))
        if known and known["stat"] == signature:
            return known["sha256"]
        digest = sha256_file(path)
        self.memo[str(path.resolve())] = {"stat": signature, "sha256": digest}
        self.changed = True
        return digest


def dataset_root_identity(root: Path) -> str:
    """The label files under a dataset root (see the module docstring), as one hash."""
    if not root.exists():
        return "missing"
    h = hashlib.sha256()
    for rel, size, mtime in sorted(_label_files(root, root, 1)):
        h.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def _label_files(folder: Path, root: Path, depth: int):
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if entry.is_file() and entry.name.lower().endswith(LABEL_SUFFIXES):
            stat = entry.stat()
            yield os.path.relpath(entry.path, root), stat.st_size, stat.st_mtime_ns
        elif entry.is_dir() and depth < ROOT_DEPTH and len(entries) <= CROWDED:
            yield from _label_files(Path(entry.path), root, depth + 1)


def fingerprints(plan: Plan, identities: InputIdentities, not_run: set[str] = frozenset()) -> dict[str, str]:
    """Every step's fingerprint, in run order. not_run: steps that will not have run when a step
    with soft dependencies (the report) runs; for it they count as "not run", not by fingerprint."""
    prints: dict[str, str] = {}
    for step in plan.steps:
        upstream = {d: ("not run" if step.soft_deps and d in not_run else prints[d]) for d in step.deps}
        # The report's command names the pipeline file as it was typed; what it writes is its identity.
        argv = [] if step.launcher == "engine" else list(step.argv)
        payload = {"argv": argv, "inputs": {str(i.path): identities.identity(i) for i in step.inputs},
                   "upstream": upstream, "identity": step.identity}
        prints[step.name] = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    return prints


# ---------------------------------------------------------------------------------------------
# Markers


def marker_path(state_dir: Path, step: Step) -> Path:
    return state_dir / f"{step.name}.json"


def read_marker(state_dir: Path, step: Step) -> dict | None:
    path = marker_path(state_dir, step)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None                     # markers are written atomically; a broken one is someone's edit


def write_marker(state_dir: Path, step: Step, fingerprint: str, status: str, command: str, **extra) -> None:
    atomic_write_json(marker_path(state_dir, step), {"step": step.name, "status": status, "fingerprint": fingerprint,
                                                     "command": command, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                     **extra})


def outputs_complete(step: Step) -> bool:
    """Whether the step's outputs are all there: the file a command writes last, a teacher's
    completed cache, a training run that reached its last step."""
    kind, *where = step.done_when
    if kind == "file":
        return Path(where[0]).exists()
    if kind == "cache":
        store, teacher = where
        if not Path(store).exists():
            return False
        from leader.precompute.cache import TeacherCache

        cache = TeacherCache.open(store)
        return teacher in cache.teachers and bool(cache.teacher_attrs(teacher).get("completed"))
    if kind == "run":
        return run_finished(Path(where[0]))
    raise ValueError(f"unknown completion check {kind!r}")


def run_finished(run: Path) -> bool:
    """A training run is finished when its checkpoint says so (memory-mapped: nothing big is read)."""
    import torch

    from leader.train.checkpoint import CHECKPOINT_NAME, TrainState

    path = run / CHECKPOINT_NAME
    if not path.exists():
        return False
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return TrainState.from_dict(payload["state"]).finished
    except Exception:           # unreadable: not finished; `leader train --resume` then says what is wrong with it
        return False
