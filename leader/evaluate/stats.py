"""AUC and its uncertainty, vectorised so a 1000-resample bootstrap over every class stays cheap.

AUC is computed from ranks (the Mann-Whitney statistic, ties counted half), which equals
scikit-learn's `roc_auc_score` and works on a whole stack of bootstrap resamples at once.
Unknown labels are NaN and never count as either class.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def rank_auc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """AUC along the last axis. scores and positive (bool) have the same shape (..., n).

    Returns (...) floats, NaN where a row has no positive or no negative.
    """
    ranks = rankdata(scores, axis=-1)
    n_pos = positive.sum(axis=-1)
    n_neg = positive.shape[-1] - n_pos
    u = np.where(positive, ranks, 0.0).sum(axis=-1) - n_pos * (n_pos + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def per_class_auc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """scores (n, C), labels (n, C) with 1/0/NaN -> (C,) AUC over the known labels of each class."""
    out = np.full(labels.shape[1], np.nan)
    for c in range(labels.shape[1]):
        known = ~np.isnan(labels[:, c])
        out[c] = rank_auc(scores[known, c], labels[known, c] == 1)
    return out


def bootstrap_auc_mean(
    scores: list[np.ndarray], labels: np.ndarray, classes: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile CI of the class-mean AUC, resampling test items with replacement."""
    lo, hi = np.nanpercentile(bootstrap_auc_replicates(scores, labels, classes, n_boot, seed), [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_auc_replicates(
    scores: list[np.ndarray], labels: np.ndarray, classes: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> np.ndarray:
    """(n_boot,) class-mean AUCs over resamples of the test items drawn with replacement.

    The resamples depend on (seed, number of test items) alone, so two representations evaluated on
    the same test set are resampled identically, and their replicates pair up for a paired test.

    `scores` holds one (n, C) matrix per training seed; every resample uses the same items for all
    of them and averages their class-mean AUCs, so the interval is that of the reported number
    (the mean over seeds). Only `classes` (column indices) enter the mean; a class that a resample
    leaves without a positive or a negative is skipped in that resample.
    """
    rng = np.random.default_rng(seed)
    n = labels.shape[0]
    index = rng.integers(0, n, size=(n_boot, n))
    totals = np.zeros(n_boot)
    for s in scores:
        class_aucs = []
        for c in classes:
            y = labels[index, c]                       # (n_boot, n) with NaN for unknown
            known = ~np.isnan(y)
            if known.all():                            # the common case: one vectorised call
                class_aucs.append(rank_auc(s[index, c], y == 1))
            else:                                      # unknowns differ per resample: drop row by row
                class_aucs.append(np.array([
                    rank_auc(s[index[b], c][known[b]], y[b][known[b]] == 1) for b in range(n_boot)
                ]))
        totals += np.nanmean(np.stack(class_aucs), axis=0)
    return totals / len(scores)


def auc_summary(fraction: float, per_seed: list[float], seed_scores: list[np.ndarray], test_labels: np.ndarray,
                classes: np.ndarray, class_names: list[str], n_boot: int) -> dict:
    """The metrics.json entry of one label fraction: mean/std over seeds, bootstrap CI, AUC per class."""
    per_class = np.mean([per_class_auc(s, test_labels) for s in seed_scores], axis=0)
    replicates = bootstrap_auc_replicates(seed_scores, test_labels, classes, n_boot=n_boot)
    lo, hi = np.nanpercentile(replicates, [2.5, 97.5])
    return {
        "fraction": fraction,
        "auc_mean": float(np.mean(per_seed)),
        "auc_std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
        "auc_ci95": [float(lo), float(hi)],
        "auc_boot": [round(float(r), 6) for r in replicates],    # paired across representations (same resamples)
        "auc_per_class": {class_names[c]: float(per_class[c]) for c in classes},
        "per_seed": per_seed,
    }
