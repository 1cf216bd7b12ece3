"""sha256 sidecars: what a file's bytes were when leader wrote it, checked before they are used.

    record_sha256(run / "checkpoint.pt", data)               # run/checkpoint.pt.sha256
    data = read_verified(run / "checkpoint.pt", "checkpoint")   # the bytes, once they match
    write_sums(export_dir, ["model.safetensors", "config.json"])  # export_dir/SHA256SUMS
    verify_listed(export_dir / "model.safetensors")          # if a SHA256SUMS beside it lists it

Sidecars use `sha256sum`'s format ("<hex>  <name>" per line), so `sha256sum -c` checks them too.
A flipped bit on disk then fails the check with the file named, instead of loading as slightly
wrong weights. Files written before leader kept sidecars have none; they load with a warning.

A file that is replaced in place (a run's checkpoint) must never be left with a sidecar that
does not describe it, whatever moment a kill lands. `replace_with_sidecar` therefore writes the
sidecar listing both the old and the new digest, then the file, then the sidecar with the new
digest alone: each of the three writes is atomic, and at every moment the file on disk is one the
sidecar lists.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, Iterable

from leader.errors import LeaderError
from leader.io import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

SUMS_NAME = "SHA256SUMS"


def sidecar_of(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.name}.sha256")


def _lines(entries: Iterable[tuple[str, str]]) -> str:
    return "".join(f"{digest}  {name}\n" for digest, name in entries)


def _listed(sums: Path) -> dict[str, set[str]]:
    """name -> the digests a sums file lists for it."""
    listed: dict[str, set[str]] = {}
    for line in sums.read_text(errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        if name:
            listed.setdefault(name.lstrip("*"), set()).add(digest.strip())
    return listed


def replace_with_sidecar(path: str | Path, data: bytes | memoryview, write: Callable[[Path, bytes], None]) -> None:
    """Replace `path` by `data` (with `write`, an atomic writer) and keep `path.sha256` true to it."""
    path = Path(path)
    new = hashlib.sha256(data).hexdigest()
    sidecar = sidecar_of(path)
    old = sorted(_listed(sidecar).get(path.name, set())) if sidecar.is_file() and path.is_file() else []
    if old:
        atomic_write_text(sidecar, _lines([(d, path.name) for d in old] + [(new, path.name)]))
    write(path, data)
    atomic_write_text(sidecar, _lines([(new, path.name)]))


def read_verified(path: str | Path, what: str) -> bytes:
    """The bytes of `path`, read once, after checking them against its sidecar (if it has one)."""
    path = Path(path)
    data = path.read_bytes()
    sidecar = sidecar_of(path)
    if not sidecar.is_file():
        log.warning("%s %s has no checksum sidecar (written before leader kept one); it is loaded unchecked",
                    what, path)
        return data
    _check(path, hashlib.sha256(data).hexdigest(), sidecar, what)
    return data


def write_sums(folder: str | Path, names: list[str]) -> Path:
    """Write folder/SHA256SUMS for the named files (after them, atomically)."""
    folder = Path(folder)
    sums = folder / SUMS_NAME
    atomic_write_text(sums, _lines((sha256_file(folder / name), name) for name in names))
    return sums


def verify_listed(path: str | Path, what: str = "file") -> None:
    """Check `path` against its sidecar or a SHA256SUMS beside it that lists it, where there is one."""
    path = Path(path)
    for sums in (sidecar_of(path), path.parent / SUMS_NAME):
        if sums.is_file() and path.name in _listed(sums):
            _check(path, sha256_file(path), sums, what)


def verify_folder(folder: str | Path, what: str = "export") -> list[str]:
    """Check every file a folder's SHA256SUMS lists; returns their names."""
    folder = Path(folder)
    sums = folder / SUMS_NAME
    if not sums.is_file():
        raise LeaderError(f"{what} {folder} has no {SUMS_NAME}: it was written before leader kept checksums, "
                          "or its export was interrupted; export it again")
    listed = _listed(sums)
    for name in sorted(listed):
        if not (folder / name).is_file():
            raise LeaderError(f"{what} {folder} lacks {name}, which its {SUMS_NAME} lists; export it again")
        _check(folder / name, sha256_file(folder / name), sums, what)
    return sorted(listed)


def _check(path: Path, actual: str, sums: Path, what: str) -> None:
    expected = _listed(sums).get(path.name, set())
    if actual not in expected:
        recorded = ", ".join(f"{d[:12]}..." for d in sorted(expected)) or "nothing"
        raise LeaderError(f"{what} {path} is damaged: its sha256 is {actual[:12]}..., while {sums} recorded "
                          f"{recorded} when it was written; nothing was loaded from it. Restore it from a copy, "
                          "or write it again")
