"""The item layout of a shard set, written once: what every later stage agrees on.

    for sample in iter_samples("shards/phantom"):            # every sample, in manifest order
        sample.key, sample.meta["rows"], sample.image()
        sample.item_keys()                                   # ["phantom/a", "phantom/a#p0", ...]
    default_cache_path("s3://bucket/shards/nih14")           # "s3://bucket/shards/nih14/cache.zarr"

A shard is a tar of samples; a sample is one image, stored as members `<key>.json` (its metadata),
`<key>.png` (the stored image) and, for sets with segmentation masks, `<key>.mask.png`. An *item*
is what receives teacher embeddings: the whole image, then each of its patches in order, so sample
`k` with n patches owns the cache rows `meta["rows"] = [r, r + 1 + n)`: row r is item `k`, row
r + 1 + j is item `k#p<j>`. The cache stores each item's kind and split as the codes below.

Two ways to read a shard, one module: `iter_shard` streams whole samples (the loader, the
precompute, evaluation), `iter_shard_metas` lists only the json members by seeking past the
images, for the passes that never look at pixels.

Given the sha256 the manifest recorded, `iter_shard` hashes the shard's bytes as they stream past
and holds its samples back until the whole file has matched, so nothing read from a damaged shard
is ever used, and the file is read once. Measured on the CPU: hashing while streaming (an error at
the shard's end), holding the samples back, and hashing the file before streaming it cost the same
CPU; the whole loader at 128 px ran within noise of no check (0.97-1.03x samples per CPU second),
and reading + PNG-decoding 512 px samples (173 kB each) ran at 0.93x. Hashing first reads every
shard twice from storage; an error at the shard's end comes after its samples were trained on.
Holding back costs the memory of one shard's samples per reader.
"""
from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from leader.errors import LeaderError
from leader.io import is_url, join_path, open_input
from leader.shards.png import decode_png

CACHE_NAME = "cache.zarr"
KIND_CODES = {"image": 0, "diseased": 1, "healthy": 2, "landmark": 3}
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
# The (image, patch) pairs of Algorithm 1's phase 2 use these patches; landmark patches only
# serve the anatomy evaluation and never train.
TRAINING_PATCH_KINDS = ("diseased", "healthy")
MEMBERS = ("json", "png", "mask.png")


def item_key(sample_key: str, patch: int | None = None) -> str:
    """The image item is the sample key; patch j is `key#p<j>`."""
    return sample_key if patch is None else f"{sample_key}#p{patch}"


def item_keys(sample_key: str, n_patches: int) -> list[str]:
    """The keys of a sample's items in row order: the image, then its patches."""
    return [sample_key] + [item_key(sample_key, j) for j in range(n_patches)]


def default_cache_path(shards_root: str | Path) -> str | Path:
    """Where a shard set's teacher cache lives unless another is given: beside the shards."""
    return join_path(shards_root, CACHE_NAME)


@dataclass
class Sample:
    key: str
    meta: dict
    png: bytes
    mask_png: bytes | None = None        # sets with segmentation masks only

    def image(self) -> np.ndarray:
        """The stored image: 2-D uint8 or uint16."""
        return decode_png(self.png)

    def item_keys(self) -> list[str]:
        return item_keys(self.key, len(self.meta["patches"]))


def member_key(name: str) -> tuple[str, str]:
    """(sample key, member) of a tar member: the key ends at the first dot of the file name, so a
    dot in a folder (a dataset named `set.v2`) stays in the key, as in WebDataset."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


class DamagedShard(LeaderError):
    """A shard whose bytes are not those its manifest recorded."""


def iter_shard(path: str | Path, sha256: str | None = None) -> Iterator[Sample]:
    """The samples of one tar shard, in order, streamed (local path or fsspec URL).

    sha256: the manifest's digest of the shard. The samples are then yielded only once the whole
    file has matched it; a damaged shard yields nothing and raises DamagedShard naming it.
    """
    path = path if is_url(path) else Path(path)
    if sha256 is None:
        yield from _stream_samples(path, None)
        return
    digest = hashlib.sha256()
    try:
        samples = list(_stream_samples(path, digest))
    except LeaderError as e:
        try:
            actual = _file_sha256(path)
        except OSError:          # a missing or unreadable file: its own message says so
            raise e from None
        if actual == sha256:
            raise
        raise DamagedShard(_damaged(path, actual, sha256, f" (reading it failed: {e})")) from None
    if digest.hexdigest() != sha256:
        raise DamagedShard(_damaged(path, digest.hexdigest(), sha256, ""))
    yield from samples


def _damaged(path: str | Path, actual: str, recorded: str, failure: str) -> str:
    return (f"shard {path} is damaged: its sha256 is {actual[:12]}..., its manifest recorded {recorded[:12]}..."
            f"{failure}; none of its samples was used. Copy the shard again from a good copy or rebuild the "
            "shard set")


class _HashingReader:
    """A binary stream that hashes every byte read through it."""

    def __init__(self, stream, digest) -> None:
        self.stream, self.digest = stream, digest

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        """Read (and hash) what the tar reader left: the end-of-archive blocks and padding."""
        while self.read(1 << 20):
            pass


def _file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open_input(path, "rb") as raw:
        _HashingReader(raw, digest).drain()
    return digest.hexdigest()


def _stream_samples(path: str | Path, digest) -> Iterator[Sample]:
    current: dict = {}
    try:
        with open_input(path, "rb") as raw:
            stream = raw if digest is None else _HashingReader(raw, digest)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, part = member_key(member.name)
                    if part not in MEMBERS:
                        raise LeaderError(f"shard {path}: member {member.name!r} is not one of a sample's "
                                          f"{', '.join(MEMBERS)}; rebuild the shard set")
                    if current and current["__key__"] != key:
                        yield _sample(current, path)
                        current = {}
                    current["__key__"] = key
                    current[part] = tar.extractfile(member).read()
            if digest is not None:
                stream.drain()
    except (tarfile.TarError, OSError) as e:
        reason = e.args[-1] if e.args else type(e).__name__
        raise LeaderError(f"shard {path} is unreadable ({reason}); rebuild the shard set") from None
    if current:
        yield _sample(current, path)


def _sample(parts: dict, shard: str | Path) -> Sample:
    if "json" not in parts or "png" not in parts:
        raise LeaderError(f"shard {shard}: sample {parts['__key__']!r} lacks its json or png member")
    try:
        meta = json.loads(parts["json"])
    except ValueError as e:          # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
        raise LeaderError(f"shard {shard}: sample {parts['__key__']!r} has unreadable metadata ({e})") from None
    return Sample(parts["__key__"], meta, parts["png"], parts.get("mask.png"))


def iter_shard_metas(path: str | Path, sha256: str | None = None) -> Iterator[dict]:
    """The json member of every sample in a shard, in order, without reading the images.

    A plain tar opened for random access skips each member's data by seeking, so listing a
    gigabyte shard reads only its headers and its small json members. With `sha256` the whole
    shard is read and checked first instead (see iter_shard), for passes that take values from the
    metadata that no other check would catch (an import teacher looks embeddings up by image id).
    """
    if sha256 is not None:
        for sample in iter_shard(path, sha256):
            yield sample.meta
        return
    try:
        with open_input(path, "rb") as stream, tarfile.open(fileobj=stream, mode="r:") as tar:
            for member in tar:
                if member.isfile() and member_key(member.name)[1] == "json":
                    yield json.loads(tar.extractfile(member).read())
    except (tarfile.TarError, OSError, ValueError) as e:      # ValueError: JSON that is not JSON or not UTF-8
        raise LeaderError(f"shard {path} is unreadable ({e}); rebuild the shard set") from None


def iter_samples(shards_dir: str | Path, shard_names: list[str] | None = None) -> Iterator[Sample]:
    """Every sample of a shard set in manifest order (or of the named shards only)."""
    from leader.shards.manifest import Manifest

    manifest = Manifest.load(shards_dir)
    entries = {s.name: s for s in manifest.shards}
    names = list(entries) if shard_names is None else shard_names
    for name in names:
        yield from iter_shard(manifest.path(name), entries[name].sha256 if name in entries else None)
