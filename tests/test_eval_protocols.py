"""The evaluation protocols as pure functions of feature matrices: known answers on toy data."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from leader.errors import LeaderError
from leader.evaluate.anatomy import anatomy_metrics, knn_accuracy
from leader.evaluate.compare import compare_metrics
from leader.evaluate.claims import check_claims, judge
from leader.evaluate.linear_probe import (
    ProbeFeatures,
    ProbeLabels,
    fit_logistic_grid,
    fit_probe,
    linear_probe,
    probe_scores,
)
from leader.evaluate.report import render_report
from leader.evaluate.representations import parse_representation
from leader.evaluate.retrieval import retrieve
from leader.evaluate.stats import bootstrap_auc_mean, per_class_auc, rank_auc


def toy_split(rng, n, n_classes=3, dim=16, signal=2.0):
    Y = (rng.random((n, n_classes)) < 0.35).astype(float)
    X = rng.normal(size=(n, dim))
    X[:, :n_classes] += signal * Y
    return X, Y


def toy_labels(rng, n_classes=3, signal=2.0):
    (Xtr, Ytr), (Xva, Yva), (Xte, Yte) = (toy_split(rng, n, n_classes, signal=signal) for n in (160, 60, 80))
    patients = np.repeat(np.arange(80), 2)                        # two images per patient
    return ProbeFeatures(Xtr, Xva, Xte), ProbeLabels(Ytr, Yva, Yte, patients)


def test_rank_auc_matches_sklearn_with_ties_and_unknowns():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(50, 2)).astype(float)      # many ties
    labels = (rng.random((50, 2)) < 0.4).astype(float)
    labels[:7, 1] = np.nan
    aucs = per_class_auc(scores, labels)
    assert aucs[0] == pytest.approx(roc_auc_score(labels[:, 0], scores[:, 0]))
    known = ~np.isnan(labels[:, 1])
    assert aucs[1] == pytest.approx(roc_auc_score(labels[known, 1], scores[known, 1]))
    assert np.isnan(rank_auc(np.arange(4.0), np.zeros(4, bool)))  # no positive: undefined, not 0.5


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(1)
    labels = (rng.random((120, 2)) < 0.5).astype(float)
    scores = labels + rng.normal(scale=0.8, size=labels.shape)
    lo, hi = bootstrap_auc_mean([scores], labels, np.array([0, 1]), n_boot=300)
    estimate = np.mean(per_class_auc(scores, labels))
    assert lo < estimate < hi and hi - lo < 0.2


def test_grid_fit_equals_sklearn_logistic_regression():
    rng = np.random.default_rng(2)
    X, Y = toy_split(rng, 100, n_classes=1, dim=5)
    weight, bias = fit_logistic_grid(X, Y, l2_grid=(0.1,))
    # Our loss is mean BCE + l2/2 |w|^2; sklearn's is C * sum BCE + 1/2 |w|^2, so C = 1 / (l2 n).
    ref = LogisticRegression(C=1 / (0.1 * 100), tol=1e-10, max_iter=1000).fit(X, Y[:, 0])
    np.testing.assert_allclose(weight[0, :, 0], ref.coef_[0], atol=1e-4)
    assert bias[0, 0] == pytest.approx(ref.intercept_[0], abs=1e-4)


def test_linear_probe_finds_signal_and_not_noise():
    rng = np.random.default_rng(3)
    feats, labels = toy_labels(rng)
    labels.train[:20, 0] = np.nan                                  # unknown labels are masked, not negatives
    good = linear_probe([feats], labels, ["a", "b", "c"], fractions=(0.25, 1.0), seeds=3, n_boot=200)
    assert good["auc_mean"] > 0.85
    lo, hi = good["auc_ci95"]
    assert lo <= good["auc_mean"] <= hi
    assert set(good["auc_per_class"]) == {"a", "b", "c"}
    assert not good["seed_variation"]                              # a convex probe on all data: seeds agree
    small = good["fractions"]["0.25"]
    assert small["seed_variation"] and len(set(small["per_seed"])) == 3
    assert small["n_train"][0] == 40                               # 20 of 80 patients, 2 images each

    noise = ProbeFeatures(*(rng.normal(size=x.shape) for x in (feats.train, feats.val, feats.test)))
    chance = linear_probe([noise], labels, ["a", "b", "c"], n_boot=200)
    assert abs(chance["auc_mean"] - 0.5) < 0.12


def test_averaging_ensemble_keeps_the_informative_member():
    rng = np.random.default_rng(4)
    feats, labels = toy_labels(rng, signal=1.0)
    noise = ProbeFeatures(*(rng.normal(size=x.shape) for x in (feats.train, feats.val, feats.test)))
    alone = linear_probe([feats], labels, ["a", "b", "c"], n_boot=100)["auc_mean"]
    averaged = linear_probe([feats, noise], labels, ["a", "b", "c"], n_boot=100)["auc_mean"]
    assert 0.55 < averaged <= alone + 0.02


def test_the_fitted_probe_as_one_linear_layer_scores_as_the_probe():
    # What fine-tuning's head starts from (LP-FT): the selected probe with its standardisation folded in.
    from scipy.special import expit

    rng = np.random.default_rng(6)
    feats, labels = toy_labels(rng)
    feats = ProbeFeatures(*(3.0 * x + 1.0 for x in (feats.train, feats.val, feats.test)))   # far from standard
    labels.train[:, 2] = 0                                         # "c" cannot be learned: it must score chance
    probabilities, _, trainable = probe_scores(feats, labels, np.arange(len(labels.train)))
    weight, bias = fit_probe(feats.train, labels.train, feats.val, labels.val)
    assert weight.shape == (16, 3) and not trainable[2] and not weight[:, 2].any() and bias[2] == 0
    np.testing.assert_allclose(expit(feats.test @ weight + bias), probabilities, atol=1e-9)


def test_linear_probe_reports_classes_it_cannot_score():
    rng = np.random.default_rng(5)
    feats, labels = toy_labels(rng)
    labels.test[:, 2] = 0                                          # no positive test image for "c"
    metrics = linear_probe([feats], labels, ["a", "b", "c"], n_boot=50)
    assert metrics["classes"] == ["a", "b"]
    assert metrics["skipped_classes"] == {"c": "no positive label in test"}


def test_knn_folds_never_share_a_patient():
    # Each patient has two studies, and a landmark looks the same in both studies of a patient but
    # unrelated across patients. Folds that split a patient's studies would find the twin patch
    # and score near 1; folds grouped by patient leave only other patients: chance (1/4).
    rng = np.random.default_rng(6)
    n_patients, n_landmarks = 12, 4
    look = rng.normal(size=(n_patients, n_landmarks, 32))
    X = np.concatenate([look[p] + 0.01 * rng.normal(size=(n_landmarks, 32)) for p in range(n_patients) for _ in range(2)])
    labels = np.tile(np.arange(n_landmarks), 2 * n_patients)
    groups = np.repeat(np.arange(n_patients), 2 * n_landmarks)
    accuracy, per_fold = knn_accuracy(X, labels, groups, k=1, n_folds=4)
    assert accuracy < 0.5 and len(per_fold) == 4
    # With a landmark look shared by all patients, the landmarks separate perfectly.
    shared = rng.normal(size=(n_landmarks, 32))
    X_shared = shared[labels] + 0.3 * rng.normal(size=X.shape)
    metrics = anatomy_metrics(X_shared, labels.astype(str), groups, k=5)
    assert metrics["knn_accuracy"] == 1.0 and metrics["nmi"] > 0.9 and metrics["silhouette"] > 0.3


def test_retrieval_precision_on_a_hand_made_gallery():
    # Gallery: 4 nodule images (one is the query's own) and 4 normal images; the query points
    # at the nodule direction, so the 3 other nodule images rank first.
    gallery_X = np.array([[1, 0.1 * i] for i in range(4)] + [[0, 1]] * 4, dtype=float)
    gallery_Y = np.array([[1]] * 4 + [[0]] * 4, dtype=float)
    keys = [f"img{i}" for i in range(8)]
    metrics, results = retrieve(np.array([[1.0, 0.0]]), ["nodule"], ["img0"], gallery_X, gallery_Y, keys,
                                ["nodule"], k=100)
    assert metrics["precision_at_k_mean"] == 1.0
    assert results[0].k == 3                                        # K capped at the 3 relevant images left
    assert 0 not in results[0].top                                  # its own image is not in its gallery
    assert results[0].relevant[:3].all() and not results[0].relevant[3:].any()
    # A query pointing at the normals retrieves none of the nodules first.
    metrics, _ = retrieve(np.array([[0.0, 1.0]]), ["nodule"], ["img0"], gallery_X, gallery_Y, keys, ["nodule"], k=2)
    assert metrics["precision_at_k_mean"] == 0.0 and metrics["k"] == 2


def test_retrieval_refuses_labels_the_gallery_does_not_have():
    with pytest.raises(LeaderError, match="not image labels"):
        retrieve(np.ones((1, 2)), ["fracture"], ["x"], np.ones((2, 2)), np.ones((2, 1)), ["a", "b"], ["nodule"])


def _metrics(protocol, rep, values, primary="auc_mean", field="per_seed", **extra):
    return {"protocol": protocol, "representation": rep, "primary": primary, primary: float(np.mean(values)),
            field: list(values), "samples": {"field": field, "over": "seeds"}, "_path": f"/x/{rep}/metrics.json",
            **extra}


def test_compare_tests_seeds_and_refuses_constant_samples():
    a = _metrics("linear-probe", "teacher:disease", [0.80, 0.82, 0.81, 0.83])
    b = _metrics("linear-probe", "teacher:anatomy", [0.60, 0.62, 0.61, 0.59])
    result = compare_metrics(a, b)
    assert result.significant and result.p < 1e-4 and result.difference == pytest.approx(0.21)
    constant = compare_metrics(_metrics("linear-probe", "a", [0.8, 0.8]), _metrics("linear-probe", "b", [0.7, 0.7]))
    assert constant.p is None and "constant" in constant.note
    with pytest.raises(LeaderError, match="cannot compare"):
        compare_metrics(a, _metrics("anatomy", "x", [0.5, 0.6], primary="knn_accuracy", field="per_fold"))


def test_claims_pass_fail_and_missing_are_all_shown(tmp_path):
    metrics = [
        _metrics("anatomy", "run:runs/student", [0.9, 0.92], primary="knn_accuracy", field="per_fold"),
        _metrics("anatomy", "teacher:disease", [0.5, 0.52], primary="knn_accuracy", field="per_fold"),
        _metrics("anatomy", "teacher:anatomy", [0.95, 0.97], primary="knn_accuracy", field="per_fold"),
    ]
    claims = check_claims([
        {"name": "beats disease", "protocol": "anatomy", "subject": "run:*", "reference": "teacher:disease", "plus": 0.10},
        {"name": "near anatomy", "protocol": "anatomy", "subject": "run:*", "reference": "teacher:anatomy", "times": 0.99},
        {"name": "retrieval", "protocol": "retrieval", "subject": "run:*", "reference": "teacher:anatomy"},
    ])
    verdicts = [judge(c, metrics) for c in claims]
    assert [v.passed for v in verdicts] == [True, False, False]
    assert "missing" in verdicts[2].detail
    text, _ = render_report(metrics, tmp_path, claims)
    assert "Claims: 1 of 3 pass" in text and text.count("**FAIL**") == 2
    assert "| `teacher:anatomy` |" in text
    with pytest.raises(LeaderError, match="tests nothing"):
        check_claims([{"name": "x", "protocol": "anatomy", "subject": "run:*"}])
    json.dumps(claims)                                              # claims are plain data


def test_representation_names_round_trip():
    assert str(parse_representation("teacher:disease")) == "teacher:disease"
    run = parse_representation("run:runs/demo/student:anatomy")
    assert (run.target, run.head) == ("runs/demo/student", "anatomy")
    assert parse_representation("run:runs/demo/student").head == "backbone"
    concat = parse_representation("concat:teacher:disease+run:r:disease")
    assert [str(p) for p in concat.parts] == ["teacher:disease", "run:r:disease"]
    for bad in ("disease", "model:x", "concat:teacher:a"):
        with pytest.raises(LeaderError):
            parse_representation(bad)
