"""Named class sets: which of a dataset's classes an evaluation averages over.

A paper reports each dataset on a class set of its own: NIH on its 14 findings (not "No Finding"),
CheXpert on 5 competition diseases, VinDr on its 14 standard lesion classes, ChestX-Det on its 13.
An adapter declares such sets (`class_sets = {"paper": ClassSet(...)}`) and the manifest carries
them. The shared vocabulary merges or renames some datasets' classes (ChestX-Det's "Nodule" and
"Diffuse Nodule" are both `nodule`), so a set names either harmonised classes, read from a
sample's `labels` and a patch's `label`, or the dataset's own classes, read from `source_classes`
and a patch's `source_label`. `select_classes` resolves a preset name or an explicit list.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from leader.errors import LeaderError

HARMONISED = "harmonised"
SOURCE = "source"
ALL = "all"


@dataclass(frozen=True)
class ClassSet:
    names: tuple[str, ...]
    labels: str = HARMONISED        # HARMONISED: `labels` / patch `label`; SOURCE: `source_classes` / `source_label`
    about: str = ""

    def to_dict(self) -> dict:
        return {"names": list(self.names), "labels": self.labels, "about": self.about}


@dataclass(frozen=True)
class ClassSelection:
    names: list[str]                # the classes to average, in order
    labels: str                     # HARMONISED or SOURCE: where a sample's values for them are read
    preset: str | None = None       # the class set's name, None for an explicit list


def select_classes(manifest, classes: str | Sequence[str] | None = None) -> ClassSelection:
    """The classes to average for `classes`: None or "all" (every harmonised label), a class set
    the manifest names (e.g. "paper"), or explicit class names (a list or "a,b,c"), harmonised or
    the dataset's own, not mixed."""
    if classes is None or classes == ALL:
        return ClassSelection(list(manifest.label_names), HARMONISED, ALL)
    presets = getattr(manifest, "class_sets", None) or {}
    if isinstance(classes, str) and classes in presets:
        chosen = presets[classes]
        return ClassSelection(list(chosen["names"]), chosen["labels"], classes)
    names = [c.strip() for c in (classes.split(",") if isinstance(classes, str) else classes) if c.strip()]
    if not names:
        raise LeaderError(f"{manifest.dataset}: --classes names no class")
    harmonised, source = set(manifest.label_names), set(getattr(manifest, "source_class_names", None) or [])
    if set(names) <= harmonised:
        return ClassSelection(names, HARMONISED)
    if set(names) <= source:
        return ClassSelection(names, SOURCE)
    unknown = [n for n in names if n not in harmonised and n not in source]
    if not unknown:
        raise LeaderError(f"{manifest.dataset}: --classes mixes harmonised and the dataset's own class names "
                          f"({', '.join(names)}); use one kind")
    if isinstance(classes, str) and len(names) == 1:
        known = ", ".join([ALL, *presets]) if presets else ALL
        raise LeaderError(f"{manifest.dataset}: no class set or class {classes!r}; class sets: {known} "
                          "(a shard set built before class sets existed has none: rebuild it)")
    raise LeaderError(f"{manifest.dataset}: unknown class(es) {unknown}; harmonised: {', '.join(manifest.label_names)}"
                      + (f"; the dataset's own: {', '.join(sorted(source))}" if source else ""))
