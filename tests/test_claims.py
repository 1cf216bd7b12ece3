"""The claims' arithmetic on made-up results with known answers: the share of the gap between two
references that a representation closes, and one-sided paired tests over folds, queries and
bootstrap resamples."""
import numpy as np
import pytest
from scipy.stats import ttest_rel

from leader.errors import LeaderError
from leader.evaluate.claims import check_claims, gap_closed, judge, paired_test

FOLDS = {"metric": "knn_accuracy", "field": "per_fold", "over": "folds of the same patients", "test": "t"}
BOOT = {"metric": "auc_mean", "field": "auc_boot", "over": "bootstrap resamples", "test": "bootstrap"}


def anatomy(rep, folds):
    return {"protocol": "anatomy", "representation": rep, "primary": "knn_accuracy", "knn_accuracy": float(np.mean(folds)),
            "per_fold": folds, "samples": {"field": "per_fold", "over": "folds"}, "paired": FOLDS}


def probe(rep, auc, boot):
    return {"protocol": "linear-probe", "representation": rep, "primary": "auc_mean", "auc_mean": auc,
            "auc_boot": boot, "samples": {"field": "per_seed", "over": "seeds"}, "per_seed": [auc], "paired": BOOT}


RESULTS = [anatomy("run:runs/demo/student", [0.80, 0.82, 0.78, 0.81, 0.79]),
           anatomy("teacher:disease", [0.50, 0.55, 0.45, 0.52, 0.48]),
           anatomy("teacher:anatomy", [0.90, 0.91, 0.89, 0.92, 0.88])]


def test_the_share_of_the_gap_closed():
    assert gap_closed(0.8, 0.5, 0.9) == pytest.approx(0.75)
    assert gap_closed(0.95, 0.5, 0.9) == pytest.approx(1.125)     # above the strong reference
    assert gap_closed(0.4, 0.5, 0.9) == pytest.approx(-0.25)
    assert gap_closed(0.8, 0.9, 0.9) is None                       # no gap to close


def test_a_gap_claim_passes_at_its_share_and_not_above():
    claim = {"name": "near the anatomy teacher", "protocol": "anatomy", "subject": "run:*/student",
             "gap": {"weak": "teacher:disease", "strong": "teacher:anatomy", "closes": 0.75}}
    verdict = judge(check_claims([claim])[0], RESULTS)
    # (0.8 - 0.5) / (0.9 - 0.5) = 0.75 exactly
    assert verdict.passed and "closes 75% of the gap" in verdict.detail
    harder = {**claim, "gap": {**claim["gap"], "closes": 0.76}}
    assert not judge(harder, RESULTS).passed
    flat = {**claim, "gap": {"weak": "teacher:anatomy", "strong": "teacher:disease", "closes": 0.5}}
    assert "no gap to close" in judge(flat, RESULTS).detail and not judge(flat, RESULTS).passed


def test_a_paired_t_test_over_folds():
    a, b = RESULTS[0]["per_fold"], RESULTS[1]["per_fold"]
    assert paired_test(np.array(a), np.array(b), "t") == pytest.approx(ttest_rel(a, b, alternative="greater").pvalue)
    beats = {"name": "far better than the disease teacher", "protocol": "anatomy", "subject": "run:*/student",
             "beats": "teacher:disease"}
    assert judge(beats, RESULTS).passed
    # Reversed, the one-sided test fails: the disease teacher is not ahead of the student.
    reversed_ = {**beats, "subject": "teacher:disease", "beats": "run:*/student"}
    assert not judge(reversed_, RESULTS).passed
    # A constant difference has no spread: its sign decides.
    assert paired_test(np.array([0.6, 0.7]), np.array([0.5, 0.6]), "t") == 0.0


def test_a_paired_bootstrap_counts_the_resamples_not_ahead():
    a = np.array([0.80, 0.81, 0.79, 0.70])       # behind in one resample of four
    b = np.array([0.75, 0.76, 0.74, 0.72])
    assert paired_test(a, b, "bootstrap") == pytest.approx((1 + 1) / (1 + 4))
    results = [probe("run:s", 0.78, list(np.linspace(0.75, 0.81, 199))),
               probe("teacher:anatomy", 0.60, list(np.linspace(0.57, 0.63, 199)))]
    claim = {"name": "beats the anatomy teacher", "protocol": "linear-probe", "subject": "run:s",
             "beats": "teacher:anatomy", "gap": {"weak": "teacher:anatomy", "strong": "run:s", "closes": 1.0}}
    verdict = judge(claim, results)
    assert verdict.passed and "one-sided p = 0.005" in verdict.detail         # (1 + 0) / (1 + 199)


def test_every_test_of_a_claim_must_hold_and_missing_numbers_fail():
    both = {"name": "x", "protocol": "anatomy", "subject": "run:*/student", "beats": "teacher:disease",
            "gap": {"weak": "teacher:disease", "strong": "teacher:anatomy", "closes": 0.9}}
    assert not judge(both, RESULTS).passed                      # significant, but closes only 75%
    unpaired = [dict(m, paired=None) for m in RESULTS]
    missing = judge({**both, "gap": {**both["gap"], "closes": 0.5}}, unpaired)
    assert not missing.passed and missing.detail.startswith("missing: ") and "no paired samples" in missing.detail
    with pytest.raises(LeaderError, match="gap must be"):
        check_claims([{"name": "y", "protocol": "anatomy", "subject": "s", "gap": {"weak": "a"}}])
