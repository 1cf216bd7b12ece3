"""Is representation A better than B? A two-sample t-test on the protocol's primary metric.

    result = compare_metrics(json.load(open("a/metrics.json")), json.load(open("b/metrics.json")))

Each metrics.json names its primary metric and the list of repeated measurements behind it
(`samples`): seeds for the linear probe and fine-tuning (as in the paper's tables), folds for kNN
anatomy, queries for retrieval. The test is scipy's `ttest_ind` (Student's, equal variances).
When both sides are constant (a convex probe at fraction 1.0 gives the same number for every
seed) there is no variance to test against: the p-value is None and the note says why, rather
than a meaningless p = 0.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.stats import ttest_ind

from leader.errors import LeaderError
from leader.evaluate.results import load_metrics

ALPHA = 0.05


@dataclass
class Comparison:
    protocol: str
    metric: str
    a: str
    b: str
    a_mean: float
    b_mean: float
    difference: float               # a - b
    over: str                       # what the samples are: seeds, folds, queries
    n_a: int
    n_b: int
    t: float | None
    p: float | None
    significant: bool | None        # p < alpha; None when the test is undefined
    alpha: float = ALPHA
    note: str = ""
    ci_overlap: bool | None = None  # do the two 95% CIs overlap (None: no CIs in the metrics)

    def to_dict(self) -> dict:
        return asdict(self)

    def sentence(self) -> str:
        head = (f"{self.metric} ({self.protocol}): {self.a} {self.a_mean:.4f} vs {self.b} {self.b_mean:.4f} "
                f"(difference {self.difference:+.4f}; n = {self.n_a} and {self.n_b} {self.over})")
        if self.p is None:
            ci = "" if self.ci_overlap is None else f"; the 95% CIs {'overlap' if self.ci_overlap else 'do not overlap'}"
            return f"{head}: no t-test, {self.note}{ci}"
        verdict = "significant" if self.significant else "not significant"
        return f"{head}: t = {self.t:.3f}, p = {self.p:.4g}, {verdict} at alpha {self.alpha}"


def primary_samples(metrics: dict) -> tuple[str, np.ndarray, str]:
    """(metric name, repeated measurements, what they are over)."""
    field, over = metrics["samples"]["field"], metrics["samples"]["over"]
    values = np.asarray(metrics[field], dtype=np.float64)
    return metrics["primary"], values, over


def compare_metrics(a: dict, b: dict, alpha: float = ALPHA) -> Comparison:
    if a["protocol"] != b["protocol"] or a["primary"] != b["primary"]:
        raise LeaderError(f"cannot compare {a['protocol']} ({a['primary']}) with {b['protocol']} ({b['primary']})")
    metric, xa, over = primary_samples(a)
    _, xb, _ = primary_samples(b)
    common = dict(protocol=a["protocol"], metric=metric, a=a["representation"], b=b["representation"],
                  a_mean=float(a[metric]), b_mean=float(b[metric]), difference=float(a[metric] - b[metric]),
                  over=over, n_a=len(xa), n_b=len(xb), alpha=alpha, ci_overlap=_ci_overlap(a, b, metric))
    if len(xa) < 2 or len(xb) < 2:
        return Comparison(**common, t=None, p=None, significant=None,
                          note=f"a t-test needs at least 2 {over} on each side (rerun with more --seeds)")
    if np.ptp(xa) == 0 and np.ptp(xb) == 0:
        return Comparison(**common, t=None, p=None, significant=None,
                          note=f"both are constant across {over}; the bootstrap CIs are the uncertainty to read")
    result = ttest_ind(xa, xb)
    t, p = float(result.statistic), float(result.pvalue)
    if math.isnan(p):
        return Comparison(**common, t=None, p=None, significant=None, note="the t-test is undefined for these samples")
    return Comparison(**common, t=t, p=p, significant=p < alpha)


def compare_files(a: str | Path, b: str | Path, alpha: float = ALPHA) -> Comparison:
    return compare_metrics(load_metrics(a), load_metrics(b), alpha)


def _ci_overlap(a: dict, b: dict, metric: str) -> bool | None:
    key = metric.removesuffix("_mean") + "_ci95"
    if key not in a or key not in b:
        return None
    (lo_a, hi_a), (lo_b, hi_b) = a[key], b[key]
    return bool(lo_a <= hi_b and lo_b <= hi_a)
