"""Who may change a teacher cache, and when: file locks in the store directory.

    with store_lock(path): ...                          # short critical sections (creation, attributes)
    with teacher_writer(path, "disease", rank=0, world_size=1): ...   # a whole precompute
    register_reader(path, "disease")                    # a trainer or evaluation reading a teacher

Measured on zarr 3.1 on a local file system: chunk and metadata files are replaced atomically, so a
reader never sees half a file, but an attribute update is a read-modify-write of one zarr.json (two
unlocked processes updating one group's attributes 150 times each lost 150 of the 300 keys), and
two processes creating the first teacher group at once collide (one fails with ContainsGroupError).
Every attribute update and group creation therefore holds `store_lock`
(tests/test_concurrent_writers.py checks that nothing is lost through the cache's API).

Writers of one teacher must be distinct ranks of one run: two processes that both believe they are
rank 0 of 1 would compute every shard twice and race on the done flags and statistics, and one run
with --overwrite-teacher would delete the other's work. `teacher_writer` refuses that. It holds an
exclusive lock on `.leader.writer.<teacher>.<rank>` for the whole run, with the writer's pid, host,
rank and world size inside; the kernel drops the lock of a killed writer, so a stale file never
blocks the next run.

Readers of a teacher (a training run, an evaluation) hold a shared lock on
`.leader.readers.<teacher>`. Replacing or repairing a teacher needs that lock exclusively, so it is
refused while anyone reads. POSIX record locks are used here because a process's own locks never
conflict with each other: a process that evaluated a teacher may still repair it itself.

Locks need a local or POSIX shared file system; on an object-store URL these are no-ops, and several
writers of one remote store are refused elsewhere (run.py).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import weakref
from pathlib import Path
from typing import Iterator

from leader.errors import LeaderError

STORE_LOCK = ".leader.lock"
WRITER_PREFIX = ".leader.writer."
READERS_PREFIX = ".leader.readers."
_BUSY = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)


def local_store_path(path: str | Path) -> Path | None:
    """The directory of a store on this machine, or None for a remote (or in-memory) URL."""
    text = str(path)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    if "://" in text:
        return None
    return Path(text)


# ---------------------------------------------------------------------------------------------
# The store lock: short critical sections


_held_locks: dict[Path, int] = {}


@contextlib.contextmanager
def store_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock on the store between processes (local stores; a no-op for URLs).

    Re-entrant within a process: flock locks belong to an open file, so taking the lock again
    through a second open file would wait for ourselves.
    """
    local = local_store_path(path)
    if local is None:
        yield
        return
    local = local.resolve()
    if _held_locks.get(local):
        _held_locks[local] += 1
        try:
            yield
        finally:
            _held_locks[local] -= 1
        return
    local.mkdir(parents=True, exist_ok=True)
    with open(local / STORE_LOCK, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        _held_locks[local] = 1
        try:
            yield
        finally:
            _held_locks.pop(local, None)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# Writers of a teacher


_held_writers: dict[tuple[Path, str], int] = {}
_writer_files: dict[tuple[Path, str], object] = {}


def _drop_writer_files_in_child() -> None:
    """A forked child (a precompute's DataLoader worker) closes its copies of the writer lock files.

    flock locks belong to the open file, which fork shares: a worker that outlived a killed writer
    (by the seconds it takes to notice) would keep the lock, and the resuming run would be refused.
    The parent's own copies keep its locks.
    """
    for handle in _writer_files.values():
        handle.close()
    _writer_files.clear()
    _held_writers.clear()


os.register_at_fork(after_in_child=_drop_writer_files_in_child)


@contextlib.contextmanager
def teacher_writer(path: str | Path, name: str, rank: int, world_size: int) -> Iterator[None]:
    """Hold the right to write teacher `name` as `rank` of `world_size` for the duration.

    Refused, naming the other writer, while a live process writes the same teacher as the same
    rank, or as a rank of a run with another world size (their shard splits would overlap).
    Re-entrant within a process.
    """
    local = local_store_path(path)
    if local is None:
        yield
        return
    local = local.resolve()
    if _held_writers.get((local, name)):
        _held_writers[(local, name)] += 1
        try:
            yield
        finally:
            _held_writers[(local, name)] -= 1
        return
    mine = local / f"{WRITER_PREFIX}{name}.{rank}"
    with store_lock(local):
        for other in sorted(local.glob(f"{WRITER_PREFIX}{name}.*")):
            if other == mine:
                continue
            holder = _live_holder(other)
            if holder is not None and int(holder.get("world_size", -1)) != world_size:
                raise LeaderError(_writer_conflict(local, name, holder, rank, world_size))
        handle = open(mine, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            handle.close()
            if e.errno not in _BUSY:
                raise
            raise LeaderError(_writer_conflict(local, name, _read_holder(mine), rank, world_size)) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "rank": rank,
                                 "world_size": world_size, "started": _utc_now()}))
        handle.flush()
    _held_writers[(local, name)] = 1
    _writer_files[(local, name)] = handle
    try:
        yield
    finally:
        _held_writers.pop((local, name), None)
        _writer_files.pop((local, name), None)
        with store_lock(local):
            mine.unlink(missing_ok=True)
            handle.close()


def _live_holder(file: Path) -> dict | None:
    """The writer recorded in `file` if it still holds its lock; a dead writer's file is removed."""
    with open(file, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in _BUSY:
                raise
            return _read_holder(file)
        file.unlink(missing_ok=True)       # under the store lock: no one is opening it now
        return None


def _read_holder(file: Path) -> dict:
    try:
        return json.loads(file.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def _writer_conflict(local: Path, name: str, holder: dict, rank: int, world_size: int) -> str:
    who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} (rank {holder.get('rank', '?')} of "
           f"{holder.get('world_size', '?')}, since {holder.get('started', '?')})")
    return (f"teacher {name!r} in cache {local} is being written by {who}; this process would be rank {rank} of "
            f"{world_size}. Two writers of one teacher must be the ranks of one run (RANK/WORLD_SIZE as torchrun "
            "sets them); wait for the other to finish or stop it, then rerun to resume")


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Readers of a teacher


_reader_files: dict[Path, tuple[int, int]] = {}     # lock file -> (fd, readers in this process)


def register_reader(path: str | Path, name: str, owner: object) -> None:
    """Hold a shared lock on teacher `name` for as long as `owner` (a TeacherCache) lives."""
    local = local_store_path(path)
    if local is None or not local.is_dir():
        return
    file = local.resolve() / f"{READERS_PREFIX}{name}"
    fd, count = _reader_files.get(file, (None, 0))
    if fd is None:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        # Blocks only while a repair or replacement of this teacher holds it exclusively (seconds).
        fcntl.lockf(fd, fcntl.LOCK_SH)
    _reader_files[file] = (fd, count + 1)
    weakref.finalize(owner, _release_reader, file)


def _release_reader(file: Path) -> None:
    fd, count = _reader_files.get(file, (None, 0))
    if fd is None:
        return
    if count > 1:
        _reader_files[file] = (fd, count - 1)
        return
    del _reader_files[file]
    fcntl.lockf(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def no_readers(path: str | Path, name: str, doing: str) -> Iterator[None]:
    """Exclude readers of teacher `name` while it is changed under them; refuse if any reads it now.

    Readers in this process do not count (POSIX locks of one process never conflict).
    """
    local = local_store_path(path)
    if local is None or not local.is_dir():
        yield
        return
    file = local.resolve() / f"{READERS_PREFIX}{name}"
    held = _reader_files.get(file)
    fd = held[0] if held else os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in _BUSY:
                raise
            raise LeaderError(f"teacher {name!r} in cache {local} is being read by another process (a training run "
                              f"or an evaluation); {doing} would change it under that reader. Let it finish, "
                              "then rerun") from None
        try:
            yield
        finally:
            # Back to what this process held before: its own readers keep their shared lock.
            fcntl.lockf(fd, fcntl.LOCK_SH if held else fcntl.LOCK_UN)
    finally:
        if not held:
            os.close(fd)
