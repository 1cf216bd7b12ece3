"""The manifest: the index of a shard set, written last so that its presence means "complete".

It lists the shards in order with their sample/item counts and row ranges, the dataset's label
names and the build settings. Sample keys live in `keys.txt` beside it, read lazily, so that a
trainer streaming a million images never holds them all in memory.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from leader.errors import LeaderError
from leader.io import is_url, join_path, open_input

FORMAT = "leader-shards/1"
MANIFEST_NAME = "manifest.json"
KEYS_NAME = "keys.txt"
REJECTS_NAME = "rejects.jsonl"


@dataclass
class ShardEntry:
    name: str
    n_samples: int
    n_items: int
    rows: tuple[int, int]
    first_key: str
    last_key: str
    sha256: str

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "n_samples": self.n_samples,
            "n_items": self.n_items,
            "rows": list(self.rows),
            "first_key": self.first_key,
            "last_key": self.last_key,
            "sha256": self.sha256,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ShardEntry":
        return cls(d["name"], d["n_samples"], d["n_items"], tuple(d["rows"]), d["first_key"], d["last_key"], d["sha256"])


@dataclass
class Manifest:
    root: Path | str          # a local folder, or an fsspec URL (s3://bucket/shards/nih14)
    dataset: str
    label_names: list[str]
    landmark_names: list[str]
    has_boxes: bool
    has_landmarks: bool
    overlap_note: str | None
    build: dict
    n_samples: int
    n_items: int
    n_rejects: int
    splits: dict[str, int]
    label_counts: dict[str, dict[str, int]]
    shards: list[ShardEntry]
    leader_version: str = ""
    extra: dict = field(default_factory=dict)
    # Achieved counts: images, diseased/healthy/landmark patches, healthy candidates, rejects, per
    # split and in total, with the healthy target and shortfall (leader.shards.balance).
    counts: dict = field(default_factory=dict)
    source_class_names: list[str] = field(default_factory=list)   # the dataset's own class names
    class_sets: dict[str, dict] = field(default_factory=dict)     # e.g. "paper" (leader.shards.class_sets)
    notes: list[str] = field(default_factory=list)                # what the build wants the user to know
    mask_classes: list[str] = field(default_factory=list)    # bit order of `<key>.mask.png`; [] = no masks

    # ---- reading -------------------------------------------------------------------------
    @classmethod
    def load(cls, root: str | Path) -> "Manifest":
        root = str(root) if is_url(root) else Path(root)
        path = join_path(root, MANIFEST_NAME)
        try:
            with open_input(path, "rb") as f:
                d = json.loads(f.read())
        except FileNotFoundError:
            if isinstance(root, Path) and root.is_dir() and any(root.glob("shard-*.tar")):
                raise LeaderError(f"{root} has shards but no {MANIFEST_NAME}: the build is incomplete; rerun `leader shards build`") from None
            raise LeaderError(f"{root} is not a shard set: {MANIFEST_NAME} not found") from None
        except json.JSONDecodeError as e:
            raise LeaderError(f"{path} is not valid JSON: {e}") from None
        if d.get("format") != FORMAT:
            raise LeaderError(f"{path}: format {d.get('format')!r} is not {FORMAT!r}")
        # A stat per shard: far cheaper than finding the hole mid-way through a week of training.
        missing = [] if is_url(root) else [s["name"] for s in d["shards"] if not (root / s["name"]).is_file()]
        if missing:
            raise LeaderError(f"{root}: {len(missing)} of the {len(d['shards'])} shards its {MANIFEST_NAME} lists "
                              f"are missing, first {missing[0]}; the shard set is damaged: rebuild it with "
                              "`leader shards build ... --overwrite`")
        return cls(
            root=root,
            dataset=d["dataset"],
            label_names=list(d["label_names"]),
            landmark_names=list(d.get("landmark_names") or []),
            has_boxes=bool(d["has_boxes"]),
            has_landmarks=bool(d["has_landmarks"]),
            overlap_note=d.get("overlap_note"),
            build=d["build"],
            n_samples=d["n_samples"],
            n_items=d["n_items"],
            n_rejects=d["n_rejects"],
            splits=d["splits"],
            label_counts=d["label_counts"],
            shards=[ShardEntry.from_dict(s) for s in d["shards"]],
            leader_version=d.get("leader_version", ""),
            extra=d.get("extra", {}),
            counts=d.get("counts", {}),
            source_class_names=list(d.get("source_class_names") or []),
            class_sets=d.get("class_sets") or {},
            notes=list(d.get("notes") or []),
            mask_classes=list(d.get("mask_classes") or []),     # sets built before masks have none
        )

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "leader_version": self.leader_version,
            "dataset": self.dataset,
            "label_names": self.label_names,
            "landmark_names": self.landmark_names,
            "has_boxes": self.has_boxes,
            "has_landmarks": self.has_landmarks,
            "mask_classes": self.mask_classes,
            "overlap_note": self.overlap_note,
            "build": self.build,
            "n_samples": self.n_samples,
            "n_items": self.n_items,
            "n_rejects": self.n_rejects,
            "splits": self.splits,
            "label_counts": self.label_counts,
            "shards": [s.to_dict() for s in self.shards],
            "keys_file": KEYS_NAME,
            "counts": self.counts,
            "source_class_names": self.source_class_names,
            "class_sets": self.class_sets,
            "notes": self.notes,
            "extra": self.extra,
        }

    def path(self, name: str) -> Path | str:
        """A file of this shard set (a shard, keys.txt), as a Path or an fsspec URL."""
        return join_path(self.root, name)

    def shard_paths(self) -> list[Path | str]:
        return [self.path(s.name) for s in self.shards]

    def shard_of_row(self, row: int) -> int:
        import bisect

        starts = [s.rows[0] for s in self.shards]
        i = bisect.bisect_right(starts, row) - 1
        if i < 0 or row >= self.shards[i].rows[1]:
            raise IndexError(f"row {row} is outside the manifest's {self.n_items} items")
        return i

    def iter_keys(self) -> Iterator[tuple[str, int]]:
        """(sample key, item count) in manifest order, streamed from keys.txt."""
        with open_input(self.path(KEYS_NAME), "rt") as f:
            for line in f:
                key, n = line.rstrip("\n").split("\t")
                yield key, int(n)

    def fingerprint(self) -> str:
        """Identity of the row layout: the shards' names, sizes, row ranges and content hashes.

        A cache records it; a cache whose fingerprint differs was computed for other shards.
        """
        h = hashlib.sha256()
        for s in self.shards:
            h.update(json.dumps([s.name, s.n_samples, s.n_items, list(s.rows), s.sha256]).encode())
        return h.hexdigest()
