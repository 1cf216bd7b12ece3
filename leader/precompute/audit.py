"""The invariance audit: which augmentations leave a teacher's embedding (nearly) unchanged.

    result = audit_invariance("shards/phantom", teacher, name="disease", n_items=64)
    result["consistent_families"]        # e.g. ["brightness", "contrast", "gamma", "photometric"]

The trainer shows the student the cached view its target came from. Augmenting further online
(beyond the cached views) is only sound for augmentations the teacher is invariant to, or the
student learns to match a target computed on different pixels. For each augmentation family (see
`leader.views.view_param_families`), this renders views in which only that family varies (the
full views' own values for it, everything else the identity), embeds them next to the identity
view, and takes the cosine between the two embeddings. A family whose mean cosine reaches the
threshold counts as teacher-consistent. Views where the family happens to stay at the identity
(an h-flip not drawn, say) are left out, so they cannot inflate the mean.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from leader.errors import LeaderError
from leader.precompute.cache import utc_now
from leader.precompute.run import render_sample_views
from leader.precompute.teachers import Teacher
from leader.shards.layout import iter_samples
from leader.views import IDENTITY, ViewSpec, sample_family_params, view_param_families


def audit_invariance(shards_dir: str | Path, teacher: Teacher, *, name: str | None = None, n_items: int = 64,
                     n_views: int = 4, threshold: float = 0.9, seed: int = 0, view_spec: ViewSpec | None = None,
                     batch_size: int = 32, device: str = "cpu", families: Sequence[str] | None = None,
                     on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Mean and min cosine(identity view, augmented view) per family over the first n_items images.

    Returns a JSON-able dict: the settings, `families` {family: {mean_cosine, min_cosine, n_views,
    consistent}} and `consistent_families`. A family with no non-identity view in the sample (its
    range is zero in the view spec) gets consistent=None and is not listed as consistent.
    """
    if not teacher.needs_pixels:
        raise LeaderError(f"teacher {teacher.kind!r} imports stored embeddings of the un-augmented image; "
                          "there is nothing to audit")
    if n_items < 1 or n_views < 2:
        raise LeaderError(f"the audit needs at least 1 item and 2 views (identity + augmented); got {n_items} and {n_views}")
    if not 0.0 < threshold <= 1.0:
        raise LeaderError(f"--threshold must be in (0, 1], got {threshold}")
    spec = view_spec or ViewSpec()
    all_families = view_param_families()
    families = list(families or all_families)
    unknown = sorted(set(families) - set(all_families))
    if unknown:
        raise LeaderError(f"unknown augmentation families {unknown}; known: {sorted(all_families)}")

    # cosines[family] collects one value per (item, augmented view).
    cosines: dict[str, list[float]] = {f: [] for f in families}
    seen = 0
    for sample in iter_samples(shards_dir):
        if seen >= n_items:
            break
        image = sample.image()
        params, owners = [IDENTITY[None]], [None]
        for family in families:
            p = sample_family_params(spec, family, seed, [sample.key], n_views)[0, 1:]
            moved = np.any(p[:, list(all_families[family])] != IDENTITY[list(all_families[family])], axis=1)
            params.append(p[moved])
            owners.extend([family] * int(moved.sum()))
        stacked = np.concatenate(params)[None]                                   # (1, 1 + n, K)
        views = render_sample_views(image, [], stacked, image_size=teacher.input_size, device=device)[0]
        embeddings = _embed_in_batches(teacher, views, int(sample.meta.get("bits", 8)), batch_size)
        reference = embeddings[0]
        for family, emb in zip(owners[1:], embeddings[1:]):
            cosines[family].append(_cosine(reference, emb))
        seen += 1
        if on_progress is not None:
            on_progress(seen, n_items)
    if seen == 0:
        raise LeaderError(f"shard set {shards_dir} has no samples to audit")

    report = {}
    for family in families:
        values = np.asarray(cosines[family], dtype=np.float64)
        if values.size == 0:
            report[family] = {"mean_cosine": None, "min_cosine": None, "n_views": 0, "consistent": None}
            continue
        mean = float(values.mean())
        report[family] = {"mean_cosine": round(mean, 6), "min_cosine": round(float(values.min()), 6),
                          "n_views": int(values.size), "consistent": bool(mean >= threshold)}
    return {
        "teacher": name or teacher.kind, "kind": teacher.kind, "fingerprint": teacher.fingerprint,
        "threshold": threshold, "n_items": seen, "n_views": n_views, "seed": seed,
        "view_spec": spec.to_dict(), "families": report,
        "consistent_families": [f for f in families if report[f]["consistent"]],
        "created": utc_now(),
    }


def _embed_in_batches(teacher: Teacher, views: torch.Tensor, bits: int, batch_size: int) -> np.ndarray:
    return np.concatenate([teacher.embed(views[i:i + batch_size], bits=bits)
                           for i in range(0, views.shape[0], batch_size)])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    if denominator == 0:
        # Two zero vectors are the same embedding; one zero vector is not similar to anything.
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(a @ b / denominator)


def format_audit(result: dict) -> str:
    """The audit as a small table, one family per line."""
    lines = [f"invariance audit of teacher {result['teacher']!r} ({result['kind']}): {result['n_items']} images, "
             f"{result['n_views'] - 1} augmented views each, threshold {result['threshold']}",
             f"{'family':<13} {'mean cos':>9} {'min cos':>9} {'views':>6}  consistent"]
    for family, r in result["families"].items():
        if r["consistent"] is None:
            lines.append(f"{family:<13} {'-':>9} {'-':>9} {0:>6}  not exercised (zero range in the view spec)")
        else:
            lines.append(f"{family:<13} {r['mean_cosine']:>9.4f} {r['min_cosine']:>9.4f} {r['n_views']:>6}  "
                         f"{'yes' if r['consistent'] else 'no'}")
    consistent = ", ".join(result["consistent_families"]) or "none"
    lines.append(f"teacher-consistent families (safe to apply online): {consistent}")
    return "\n".join(lines)
