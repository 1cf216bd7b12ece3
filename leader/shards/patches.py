"""Where the patches of a sample lie: diseased ones from boxes, healthy ones at random, landmark ones.

All patch boxes are squares in stored-image pixels, shifted to lie inside the image, so that a
patch never shows padding the teacher has never seen. The crop itself is `crop_patch`'s job.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class PatchPlan:
    margin: float = 0.25          # context around a lesion box, as a fraction of its side, per side
    min_side: float = 0.08        # smallest patch, as a fraction of the image's long side
    healthy_ratio: float = 1.0    # healthy patches per diseased patch, in each split (leader.shards.balance)
    healthy_max_per_image: int = 4    # when healthy images are few, at most this many patches from one
    landmark_side: float = 224 / 1024   # 224 px of a 1024 px radiograph, whatever the stored size
    landmark_splits: tuple[str, ...] = ("val", "test")
    # A harder anatomy test: each landmark patch's centre moves by up to this fraction of its side
    # (in x and y) and its side is scaled within landmark_scale, seeded per sample and landmark, so
    # that naming the landmark takes knowing where the patch lies, not matching one fixed crop.
    landmark_jitter: float = 0.0
    landmark_scale: tuple[float, float] = (1.0, 1.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["landmark_splits"] = list(self.landmark_splits)
        d["landmark_scale"] = list(self.landmark_scale)
        return d


def fit_square(cx: float, cy: float, side: float, width: int, height: int) -> list[float]:
    """A square of `side` centred near (cx, cy), shifted (and if needed shrunk) to fit the image."""
    side = min(side, width, height)
    x0 = min(max(cx - side / 2, 0.0), width - side)
    y0 = min(max(cy - side / 2, 0.0), height - side)
    return [round(x0, 3), round(y0, 3), round(x0 + side, 3), round(y0 + side, 3)]


def diseased_patches(boxes: list[dict], width: int, height: int, plan: PatchPlan) -> list[dict]:
    long_side = max(width, height)
    patches = []
    for b in boxes:
        w, h = b["x1"] - b["x0"], b["y1"] - b["y0"]
        side = max(max(w, h) * (1 + 2 * plan.margin), plan.min_side * long_side)
        cx, cy = (b["x0"] + b["x1"]) / 2, (b["y0"] + b["y1"]) / 2
        patch = {"box": fit_square(cx, cy, side, width, height), "kind": "diseased", "label": b["label"]}
        if "source_label" in b:
            patch["source_label"] = b["source_label"]
        patches.append(patch)
    return patches


def landmark_patches(landmarks: dict[str, list[float]], width: int, height: int, plan: PatchPlan,
                     key: str = "", seed: int = 0) -> list[dict]:
    side = plan.landmark_side * max(width, height)
    patches = []
    for name, (x, y) in landmarks.items():
        s, cx, cy = side, x, y
        if plan.landmark_jitter or plan.landmark_scale != (1.0, 1.0):
            rng = sample_rng(seed, f"{key}#{name}", "landmark")
            s = side * rng.uniform(*plan.landmark_scale)
            cx, cy = x + s * plan.landmark_jitter * rng.uniform(-1, 1), y + s * plan.landmark_jitter * rng.uniform(-1, 1)
        patches.append({"box": fit_square(cx, cy, s, width, height), "kind": "landmark", "label": name})
    return patches


class PatchSizeHistogram:
    """The running distribution of diseased patch sides (as a fraction of the image's long side).

    Healthy patches draw their sizes from it, so that patch size does not give away "diseased".
    It is a fixed-bin histogram, so it is small, exact to save and restore, and the same in any
    worker layout: the builder updates it in manifest order.
    """

    EDGES = np.geomspace(0.02, 1.0, 49)

    def __init__(self, counts: list[int] | None = None):
        self.counts = np.zeros(len(self.EDGES) - 1, np.int64) if counts is None else np.asarray(counts, np.int64)

    def add(self, fraction: float) -> None:
        i = int(np.clip(np.searchsorted(self.EDGES, fraction, side="right") - 1, 0, len(self.counts) - 1))
        self.counts[i] += 1

    def sample(self, rng: np.random.Generator) -> float:
        if self.counts.sum() == 0:
            # No lesion seen yet: a log-uniform spread over typical lesion sizes.
            return float(math.exp(rng.uniform(math.log(0.08), math.log(0.35))))
        i = rng.choice(len(self.counts), p=self.counts / self.counts.sum())
        return float(math.exp(rng.uniform(math.log(self.EDGES[i]), math.log(self.EDGES[i + 1]))))

    def to_list(self) -> list[int]:
        return self.counts.tolist()


def sample_rng(seed: int, key: str, purpose: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}\0{key}\0{purpose}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def healthy_patches(key: str, width: int, height: int, sizes: PatchSizeHistogram, plan: PatchPlan, seed: int,
                    count: int) -> list[dict]:
    """`count` random squares of a healthy image (how many: leader.shards.balance)."""
    rng = sample_rng(seed, key, "healthy")
    long_side = max(width, height)
    patches = []
    for _ in range(count):
        side = max(sizes.sample(rng), plan.min_side) * long_side
        cx = rng.uniform(side / 2, max(width - side / 2, side / 2))
        cy = rng.uniform(side / 2, max(height - side / 2, side / 2))
        patches.append({"box": fit_square(cx, cy, side, width, height), "kind": "healthy", "label": None})
    return patches
