"""Segmentation scores: Dice and IoU, pooled over a test set and per image, with bootstrap CIs.

    counts = overlap_counts(predicted, truth)      # (n, C, 3): |P & G|, |P|, |G| per image and class
    pooled_dice(counts)                            # (C,)   2 sum|P & G| / (sum|P| + sum|G|)
    image_dice(counts)                             # (n, C) per image; empty prediction on empty truth = 1

Two Dice values, as this lab's fine-tuning code reports them, and they answer different questions:
- **pooled Dice** (`dice`): every pixel of the test set counts once, as if the test set were one
  image. An image without the finding adds only its false positives. This is the primary metric.
- **mean per-image Dice** (`dice_per_image`): Dice of each image, averaged over images; an image
  where both prediction and truth are empty scores 1, one where only one of them is empty scores 0.
  On a set where most images are normal (SIIM: about 78% without pneumothorax) it mostly measures
  how often a normal image is left empty, and it is far higher than the pooled Dice.
IoU is reported the same two ways. Classes are averaged with equal weight (a class without any
positive pixel in prediction or truth has no pooled score and is left out of the mean).

The 95% CIs resample test images with replacement (as the AUC protocols do); each resample uses the
same images for every seed and averages the seeds, so the interval is that of the reported number.
The pooled Dice of every resample is kept (`dice_boot`): the resamples depend only on the number of
test images, so two representations' replicates pair up for a paired test (leader.evaluate.claims).
"""
from __future__ import annotations

import warnings

import numpy as np


def overlap_counts(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """predicted, truth: (n, C, H, W) bool -> (n, C, 3) int64: intersection, predicted and true pixels."""
    predicted, truth = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
    if predicted.shape != truth.shape or predicted.ndim != 4:
        raise ValueError(f"overlap_counts needs two (n, C, H, W) masks of one shape, got {predicted.shape} and {truth.shape}")
    return np.stack([(predicted & truth).sum((2, 3)), predicted.sum((2, 3)), truth.sum((2, 3))], axis=-1).astype(np.int64)


def _dice(inter, pred, true, empty):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pred + true > 0, 2.0 * inter / (pred + true), empty)


def _iou(inter, pred, true, empty):
    union = pred + true - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, empty)


def pooled_dice(counts: np.ndarray) -> np.ndarray:
    """(..., n, C, 3) -> (..., C): Dice of all images' pixels together; NaN where nothing is positive."""
    total = counts.sum(-3).astype(np.float64)
    return _dice(total[..., 0], total[..., 1], total[..., 2], np.nan)


def pooled_iou(counts: np.ndarray) -> np.ndarray:
    total = counts.sum(-3).astype(np.float64)
    return _iou(total[..., 0], total[..., 1], total[..., 2], np.nan)


def image_dice(counts: np.ndarray) -> np.ndarray:
    """(n, C, 3) -> (n, C): Dice per image; 1 where prediction and truth are both empty."""
    c = counts.astype(np.float64)
    return _dice(c[..., 0], c[..., 1], c[..., 2], 1.0)


def image_iou(counts: np.ndarray) -> np.ndarray:
    c = counts.astype(np.float64)
    return _iou(c[..., 0], c[..., 1], c[..., 2], 1.0)


def _class_mean(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis (classes), ignoring classes without a score."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)          # "mean of empty slice": no class scored
        return np.nanmean(values, axis=-1)


def seed_scores(counts: np.ndarray) -> dict[str, float]:
    """The headline numbers of one trained model: class means of each score."""
    return {
        "dice": float(_class_mean(pooled_dice(counts))),
        "dice_per_image": float(_class_mean(image_dice(counts).mean(0))),
        "iou": float(_class_mean(pooled_iou(counts))),
        "iou_per_image": float(_class_mean(image_iou(counts).mean(0))),
    }


def bootstrap_replicates(seed_counts: list[np.ndarray], n_boot: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """(n_boot,) seed-averaged scores per name over resamples of the test images drawn with replacement.

    The resamples depend on (seed, number of test images) alone, so two representations segmented
    on the same test set are resampled identically, and their replicates pair up for a paired test.
    """
    n = seed_counts[0].shape[0]
    rng = np.random.default_rng(seed)
    # How often each image is drawn in each resample: sums over a resample become one product.
    weights = np.zeros((n_boot, n))
    np.add.at(weights, (np.repeat(np.arange(n_boot), n), rng.integers(0, n, n_boot * n)), 1.0)
    totals = {name: np.zeros(n_boot) for name in ("dice", "dice_per_image", "iou", "iou_per_image")}
    for counts in seed_counts:
        pooled = np.einsum("bn,nck->bck", weights, counts.astype(np.float64))       # (n_boot, C, 3)
        totals["dice"] += _class_mean(_dice(pooled[..., 0], pooled[..., 1], pooled[..., 2], np.nan))
        totals["iou"] += _class_mean(_iou(pooled[..., 0], pooled[..., 1], pooled[..., 2], np.nan))
        totals["dice_per_image"] += _class_mean(weights @ image_dice(counts) / n)
        totals["iou_per_image"] += _class_mean(weights @ image_iou(counts) / n)
    return {name: total / len(seed_counts) for name, total in totals.items()}


def segmentation_summary(fraction: float, seed_counts: list[np.ndarray], class_names: list[str], n_boot: int) -> dict:
    """The metrics.json entry of one label fraction: means and std over seeds, CIs, scores per class."""
    per_seed = [seed_scores(c) for c in seed_counts]
    replicates = bootstrap_replicates(seed_counts, n_boot)
    summary: dict = {"fraction": fraction}
    for name in ("dice", "dice_per_image", "iou", "iou_per_image"):
        values = [s[name] for s in per_seed]
        summary[f"{name}_mean"] = float(np.mean(values))
        summary[f"{name}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        lo, hi = np.nanpercentile(replicates[name], [2.5, 97.5])
        summary[f"{name}_ci95"] = [float(lo), float(hi)]
    # Paired across representations segmented on the same test images (the same resamples).
    summary["dice_boot"] = [round(float(r), 6) for r in replicates["dice"]]
    summary["per_seed"] = [s["dice"] for s in per_seed]
    for name, score in (("dice_per_class", pooled_dice), ("iou_per_class", pooled_iou),
                        ("dice_per_image_per_class", lambda c: image_dice(c).mean(0))):
        values = np.mean([score(c) for c in seed_counts], axis=0)
        # None: no pixel of the class in any prediction or truth, so nothing to score.
        summary[name] = {c: (float(v) if np.isfinite(v) else None) for c, v in zip(class_names, values)}
    summary["per_seed_scores"] = per_seed
    return summary
