"""Reading shard sets: the one module every later stage uses to get samples, pixels and patches.

    for sample in iter_samples("shards/phantom"):
        img = sample.image()                 # 2-D uint8/uint16 at the stored size
        for patch in sample.meta["patches"]:
            pixels = crop_patch(img, patch["box"], 224)
"""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from leader.errors import LeaderError
from leader.shards.manifest import Manifest
from leader.shards.png import decode_png


def __getattr__(name):
    # crop_patch pulls in torch; only pay for it when it is used.
    if name == "crop_patch":
        from leader.shards.crop import crop_patch

        return crop_patch
    raise AttributeError(name)


@dataclass
class Sample:
    key: str
    meta: dict
    png: bytes

    def image(self) -> np.ndarray:
        return decode_png(self.png)

    def item_keys(self) -> list[str]:
        return [self.key] + [f"{self.key}#p{j}" for j in range(len(self.meta["patches"]))]


def to_float(img: np.ndarray) -> np.ndarray:
    """uint8 / 255 or uint16 / 65535, as float32 in [0, 1]."""
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0
    raise TypeError(f"expected uint8 or uint16 pixels, got {img.dtype}")


def iter_shard(path: str | Path) -> Iterator[Sample]:
    """Samples of one tar shard, in order. Members are grouped by key (json before png)."""
    from leader.io import is_url, open_input

    path = path if is_url(path) else Path(path)
    current: dict = {}
    try:
        with open_input(path, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                stem, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                if current and current["key"] != stem:
                    yield _sample(current, path)
                    current = {}
                current["key"] = stem
                current[ext] = data
    except (tarfile.TarError, OSError) as e:
        raise LeaderError(f"shard {path} is unreadable: {e}") from None
    if current:
        yield _sample(current, path)


def _sample(parts: dict, shard: Path) -> Sample:
    if "json" not in parts or "png" not in parts:
        raise LeaderError(f"shard {shard}: sample {parts['key']!r} lacks its json or png member")
    return Sample(parts["key"], json.loads(parts["json"]), parts["png"])


def iter_samples(shards_dir: str | Path, shard_names: list[str] | None = None) -> Iterator[Sample]:
    """Every sample of a shard set in manifest order (or of the named shards only)."""
    manifest = Manifest.load(shards_dir)
    names = [s.name for s in manifest.shards] if shard_names is None else shard_names
    for name in names:
        yield from iter_shard(manifest.path(name))
