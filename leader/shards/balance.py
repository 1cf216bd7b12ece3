"""How many healthy patches each healthy image gives: `healthy_ratio` x the diseased patches, per split.

Phase 2 of Algorithm 1 pairs patches cut from lesion boxes with patches cut at random from healthy
images, and Table 1's counts fit one of each (NODE21's 2,952 samples are twice its 1,476 nodule
boxes). One healthy patch for every normal image would instead let the number of normal images
set the balance: NIH has tens of thousands of "No Finding" images against fewer than 1,000 boxes.

The plan is made from the adapter's records alone, before any pixel is read: a box is a diseased
patch, and only an image the dataset itself calls healthy (`SourceRecord.healthy`) is a
candidate. In each split the candidates are ranked by a hash of (seed, key), and the target,
round(ratio x diseased), is dealt out in that order: one patch per image while there are enough
images, else several per image up to `max_per_image`. What is still missing then is a shortfall,
which the manifest reports. The plan is therefore the same for any worker count and after a
resume. Images rejected when read lower the achieved counts below the plan; the manifest has both.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Iterable

from leader.shards.records import SPLITS, SourceRecord


@dataclass
class SplitPlan:
    diseased: int = 0          # boxes on the split's records
    candidates: int = 0        # records the dataset calls healthy
    target: int = 0            # round(ratio x diseased)
    planned: int = 0           # healthy patches dealt out (target, or less at the per-image cap)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HealthyPlan:
    ratio: float
    max_per_image: int
    patches: dict[int, int] = field(default_factory=dict)        # record index -> healthy patches
    candidates: dict[int, str] = field(default_factory=dict)     # record index -> split, every candidate
    splits: dict[str, SplitPlan] = field(default_factory=dict)

    def patches_for(self, index: int) -> int:
        return self.patches.get(index, 0)


def plan_healthy_patches(records: Iterable[SourceRecord], ratio: float, max_per_image: int, seed: int) -> HealthyPlan:
    """The healthy patches per record index (the order the builder numbers records in)."""
    plan = HealthyPlan(ratio, max_per_image)
    ranked: dict[str, list[tuple[bytes, int]]] = {}
    seen: set[str] = set()
    for index, rec in enumerate(records):
        # Mirror what the builder refuses before reading pixels: a second record of one key, a
        # split it does not know, an image stated healthy that carries boxes.
        if rec.key in seen or rec.split not in SPLITS or (rec.healthy and rec.boxes):
            continue
        seen.add(rec.key)
        split = plan.splits.setdefault(rec.split, SplitPlan())
        split.diseased += len(rec.boxes)
        if rec.healthy:
            split.candidates += 1
            plan.candidates[index] = rec.split
            ranked.setdefault(rec.split, []).append((_rank(seed, rec.key), index))
    for name, split in plan.splits.items():
        split.target = int(ratio * split.diseased + 0.5)
        order = [index for _, index in sorted(ranked.get(name, []))]
        for index, count in zip(order, deal(split.target, len(order), max_per_image)):
            if count:
                plan.patches[index] = count
                split.planned += count
    return plan


def deal(target: int, images: int, max_per_image: int) -> list[int]:
    """Patches per image, in rank order: as even as possible, at most `max_per_image` each."""
    if images == 0:
        return []
    base, extra = divmod(target, images)
    if base >= max_per_image:
        return [max_per_image] * images
    return [base + 1] * extra + [base] * (images - extra)


def _rank(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{key}\0healthy-source".encode()).digest()


# ---------------------------------------------------------------------------------------------
# Achieved counts, per split, as the manifest reports them beside the plan.

COUNTED = ("images", "diseased_patches", "healthy_patches", "landmark_patches",
           "healthy_candidates", "healthy_images", "rejected_healthy_candidates")
_KIND_COUNT = {"diseased": "diseased_patches", "healthy": "healthy_patches", "landmark": "landmark_patches"}


def tally_sample(counts: dict[str, dict[str, int]], meta: dict) -> None:
    """Add one written sample (its final patches included) to the per-split counts."""
    c = counts.setdefault(meta["split"], dict.fromkeys(COUNTED, 0))
    c["images"] += 1
    for patch in meta["patches"]:
        c[_KIND_COUNT[patch["kind"]]] += 1
    c["healthy_candidates"] += int(meta["healthy"])
    c["healthy_images"] += int(any(p["kind"] == "healthy" for p in meta["patches"]))


def tally_rejects(counts: dict[str, dict[str, int]], rejects, plan: HealthyPlan) -> dict[str, dict[str, int]]:
    """Count the rejected records (builder `Rejected`s) that were healthy candidates; returns `counts`."""
    for r in rejects:
        if (split := plan.candidates.get(r.index)) is not None:
            counts.setdefault(split, dict.fromkeys(COUNTED, 0))["rejected_healthy_candidates"] += 1
    return counts


def merge_counts(total: dict[str, dict[str, int]], counts: dict[str, dict[str, int]]) -> None:
    for split, c in counts.items():
        acc = total.setdefault(split, dict.fromkeys(COUNTED, 0))
        for k in COUNTED:
            acc[k] += c.get(k, 0)


def counts_report(counts: dict[str, dict[str, int]], plan: HealthyPlan, rejected_inputs: int) -> dict:
    """The manifest's `counts`: totals, then `by_split`, each with the healthy target and shortfall."""
    by_split = {}
    for split in SPLITS:
        if split not in counts and split not in plan.splits:
            continue
        c = {**dict.fromkeys(COUNTED, 0), **counts.get(split, {})}
        target = plan.splits[split].target if split in plan.splits else 0
        by_split[split] = {**c, "healthy_target": target, "healthy_shortfall": max(0, target - c["healthy_patches"])}
    total = {k: sum(c[k] for c in by_split.values()) for k in (*COUNTED, "healthy_target", "healthy_shortfall")}
    rule = (f"healthy patches = round({plan.ratio:g} x diseased patches) in each split, cut from images the dataset "
            f"calls healthy, up to {plan.max_per_image} per image; what is still missing is the shortfall")
    return {**total, "rejected_inputs": rejected_inputs, "healthy_rule": rule, "by_split": by_split}


def shortfall_notes(counts: dict, dataset: str, max_per_image: int) -> list[str]:
    """One line saying where and why healthy patches fall short of the target; nothing when they do not."""
    short = counts["healthy_shortfall"]
    if not short:
        return []
    if counts["healthy_candidates"] + counts["rejected_healthy_candidates"] == 0:
        return [f"{dataset}: no image is stated healthy, so its {counts['diseased_patches']} diseased patches "
                f"have no healthy counterpart (shortfall {short})"]
    where = []
    for split, c in counts["by_split"].items():
        if c["healthy_shortfall"]:
            images = c["healthy_candidates"]
            text = (f"in {split}, {images} healthy image{'' if images == 1 else 's'} at up to {max_per_image} "
                    f"patch{'' if max_per_image == 1 else 'es'} each")
            if c["rejected_healthy_candidates"]:
                text += f" ({c['rejected_healthy_candidates']} more rejected when read)"
            where.append(text)
    return [f"{dataset}: {counts['healthy_patches']} healthy patches for {counts['diseased_patches']} diseased, "
            f"{short} short of the target {counts['healthy_target']}: " + "; ".join(where)]
