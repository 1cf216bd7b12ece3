"""Atomic writes and hashing.

Every file a long job leaves behind is written to a temporary name in the same directory and
renamed into place, so a kill leaves either the old complete file or the new complete file.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from leader.errors import LeaderError

# Errors that mean "the disk is full for us": the user frees space (or quota) and reruns.
DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file whose content appears at `path` only once it is complete.

        with atomic_writer(run / "checkpoint.pt") as f:
            torch.save(state, f)

    The data goes to a temporary file beside `path`, is synced, then renamed over it. On any
    failure the temporary file is removed and `path` keeps its previous version; a full disk (or
    quota) becomes a LeaderError that names the file and says so.
    """
    path = Path(path)
    existed = path.exists()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            kept = "the previous version of it is intact" if existed else "no partial file was left"
            raise LeaderError(f"{DISK_FULL[e.errno]} while writing {path}; {kept}. Free some space and rerun") from e
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(root: str | os.PathLike) -> str:
    """Fingerprint a directory (e.g. a SavedModel): relative paths and contents, in sorted order."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode())
        h.update(b"\0")
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def is_url(path: str | os.PathLike) -> bool:
    """True for fsspec URLs (s3://, gs://, file://, memory://...), which stay strings, never Paths."""
    return "://" in str(path)


def join_path(root: str | os.PathLike, name: str) -> str | Path:
    """root/name for a local folder (a Path) or an fsspec URL (a string: Path would eat the //)."""
    if is_url(root):
        return f"{str(root).rstrip('/')}/{name}"
    return Path(root) / name


def read_yaml_mapping(path: str | os.PathLike, what: str) -> dict:
    """A YAML file that must hold a mapping (an empty file is an empty one); `what` names it in errors."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LeaderError(f"{what} {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise LeaderError(f"{what} {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise LeaderError(f"{what} {path} must hold a mapping at the top level")
    return data


def open_input(path: str | os.PathLike, mode: str = "rb"):
    """Open a local path or an fsspec URL for reading."""
    if is_url(path):
        import fsspec

        return fsspec.open(str(path), mode).open()
    return open(path, mode) if "b" in mode else open(path, mode, encoding="utf-8")
