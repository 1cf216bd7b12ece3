"""The item table of a shard set: one row per cache item, with what every protocol selects on.

    table = ItemTable.load("shards/phantom")
    images = table.select(kind="image", split="test")
    X = features("teacher:disease", "shards/phantom", rows_of(images))
    Y = label_matrix(images, table.label_names)          # 1 / 0 / NaN (unknown)

An item is a whole image or one of its patches (diseased, healthy, landmark), in manifest row
order, so `item.row` indexes the teacher cache and the student's `embed_items` alike. Splits and
patients come from the sample, so a patch is always in its image's split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from leader.errors import LeaderError
from leader.shards.manifest import Manifest
from leader.shards.layout import item_key, iter_samples

KINDS = ("image", "diseased", "healthy", "landmark")


@dataclass(frozen=True)
class Item:
    row: int
    key: str                      # item key: the sample key, or f"{sample_key}#p{j}" for patch j
    kind: str                     # one of KINDS
    label: str | None             # patch label (lesion class or landmark name); None for images
    sample_key: str
    split: str
    patient: str
    box: tuple[float, float, float, float] | None   # patch box in stored-image pixels
    labels: dict                  # the sample's image labels: name -> 1 / 0 / None
    source_label: str | None = None       # the patch's class in the dataset's own names, where kept
    source_classes: dict | None = None    # the sample's own classes (VinDr, ChestX-Det): name -> 1 / 0 / None


class ItemTable:
    def __init__(self, root: Path, items: list[Item], manifest: Manifest):
        self.root = root
        self.items = items
        self.manifest = manifest
        self.label_names = list(manifest.label_names)
        self.landmark_names = list(manifest.landmark_names)

    @classmethod
    def load(cls, shards_dir: str | Path) -> "ItemTable":
        manifest = Manifest.load(shards_dir)
        items: list[Item] = []
        for sample in iter_samples(shards_dir):
            meta = sample.meta
            start, stop = meta["rows"]
            if start != len(items) or stop - start != 1 + len(meta["patches"]):
                raise LeaderError(
                    f"{shards_dir}: sample {sample.key!r} claims rows {meta['rows']} but is item "
                    f"{len(items)} with {len(meta['patches'])} patches; the shards are inconsistent, rebuild them"
                )
            common = dict(sample_key=sample.key, split=meta["split"], patient=str(meta["patient_id"]),
                          labels=meta["labels"], source_classes=meta.get("source_classes"))
            items.append(Item(row=start, key=sample.key, kind="image", label=None, box=None, **common))
            for j, patch in enumerate(meta["patches"]):
                items.append(Item(row=start + 1 + j, key=item_key(sample.key, j), kind=patch["kind"],
                                  label=patch["label"], box=tuple(patch["box"]),
                                  source_label=patch.get("source_label"), **common))
        if len(items) != manifest.n_items:
            raise LeaderError(f"{shards_dir}: the shards hold {len(items)} items but the manifest says {manifest.n_items}")
        return cls(Path(shards_dir), items, manifest)

    def select(self, kind: str | Sequence[str] | None = None, split: str | Sequence[str] | None = None) -> list[Item]:
        kinds = _as_set(kind, KINDS, "kind")
        splits = _as_set(split, ("train", "val", "test"), "split")
        return [it for it in self.items if (kinds is None or it.kind in kinds) and (splits is None or it.split in splits)]


def _as_set(value, allowed: Sequence[str], what: str) -> set[str] | None:
    if value is None:
        return None
    values = {value} if isinstance(value, str) else set(value)
    unknown = values - set(allowed)
    if unknown:
        raise LeaderError(f"unknown {what} {sorted(unknown)}; choose from {list(allowed)}")
    return values


def rows_of(items: Iterable[Item]) -> np.ndarray:
    return np.fromiter((it.row for it in items), dtype=np.int64)


def label_matrix(items: Sequence[Item], names: Sequence[str], source: bool = False) -> np.ndarray:
    """(n, C) float: 1 positive, 0 negative, NaN unknown or not labelled by the sample's dataset.
    source: read the dataset's own classes (a class set of them, see leader/shards/class_sets.py)."""
    out = np.full((len(items), len(names)), np.nan)
    for i, it in enumerate(items):
        values = (it.source_classes or {}) if source else it.labels
        for c, name in enumerate(names):
            value = values.get(name)
            if value is not None:
                out[i, c] = float(value)
    return out


def patient_subset(patients: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of the items of a random ceil(fraction * n_patients) patients (at least one).

    Sampling patients rather than items keeps a patient's images together, as the splits do.
    """
    if not 0.0 < fraction <= 1.0:
        raise LeaderError(f"--fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return np.arange(len(patients))
    unique = np.unique(patients)
    n_keep = max(1, math.ceil(fraction * len(unique)))
    keep = np.random.default_rng(seed).choice(unique, size=n_keep, replace=False)
    return np.flatnonzero(np.isin(patients, keep))


def read_images(shards_dir: str | Path, sample_keys: Iterable[str]) -> dict[str, np.ndarray]:
    """Decoded stored images (2-D uint8/uint16) of the named samples, in one pass over the shards."""
    wanted = set(sample_keys)
    images: dict[str, np.ndarray] = {}
    for sample in iter_samples(shards_dir):
        if sample.key in wanted:
            images[sample.key] = sample.image()
            if len(images) == len(wanted):
                break
    missing = wanted - set(images)
    if missing:
        raise LeaderError(f"{shards_dir}: {len(missing)} samples not found, e.g. {sorted(missing)[0]!r}")
    return images
