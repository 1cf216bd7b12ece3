"""Linear probing of frozen features: one logistic probe per class, many L2 strengths at once.

    result = linear_probe([ProbeFeatures(X_tr, X_va, X_te)], labels, class_names,
                          fractions=(0.1, 1.0), seeds=3)

Recipe (the DINOv2 way of probing cached features, with a convex probe):
- features are standardised with the training items' mean and std;
- for every class and every strength in `L2_GRID`, a logistic regression is fitted on the labelled
  training items (unknown labels are masked out of that class's loss). All of them form one
  separable objective solved by full-batch L-BFGS, so the whole grid costs about one fit;
- each class keeps the strength with the best validation AUC (ties go to the stronger penalty);
- test AUC is reported per class, averaged over classes, with a 95% bootstrap CI over test items.

`--fraction` draws a random subset of TRAIN patients per seed. Seeds change only that draw: the
probe is convex and solved to convergence, so at fraction 1.0 every seed gives the same number
(`seed_variation` says so, and `compare` runs no t-test on such values). A class without a
positive and a negative in a seed's training subset cannot be learned; it scores a constant
(AUC 0.5) and is counted in `chance_classes`.

Several feature sets (one per representation) give the averaging ensemble: each gets its own
probe, selected on its own, and their test probabilities are averaged.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from threadpoolctl import threadpool_limits

from leader.errors import LeaderError
from leader.evaluate.figures import auc_bars
from leader.evaluate.items import ItemTable, label_matrix, patient_subset, rows_of
from leader.evaluate.representations import features, parse_representation
from leader.evaluate.results import write_metrics
from leader.evaluate.stats import auc_summary, per_class_auc
from leader.shards.class_sets import ALL, SOURCE, select_classes

L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
# What a paired claim compares between two representations probed on the same test set.
BOOTSTRAP_PAIRS = {"metric": "auc_mean", "field": "auc_boot", "over": "bootstrap resamples of the test images",
                   "test": "bootstrap"}
FALLBACK_L2 = 1e-2   # used for a class whose validation split cannot rank (no positive or negative)


@dataclass
class ProbeFeatures:
    """One representation's features for the three splits (rows aligned with ProbeLabels)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


@dataclass
class ProbeLabels:
    train: np.ndarray                 # (n_train, C) 1 / 0 / NaN
    val: np.ndarray
    test: np.ndarray
    train_patients: np.ndarray        # (n_train,) patient ids, for the --fraction draw


def fit_logistic_grid(X: np.ndarray, Y: np.ndarray, l2_grid=L2_GRID, max_iter: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Fit one logistic regression per (strength, class) on standardised X.

    X (n, d); Y (n, C) with NaN for unknown. Loss per class: mean binary cross-entropy over its
    known items + l2 / 2 * |w|^2. The G x C problems are independent, so their sum is one smooth
    objective with an exact gradient, solved by scipy's L-BFGS in a single call.
    Returns weights (G, d, C) and biases (G, C).
    """
    n, d = X.shape
    C, G = Y.shape[1], len(l2_grid)
    known = ~np.isnan(Y)
    target = np.where(known, Y, 0.0)
    item_weight = known / np.maximum(known.sum(0), 1)              # (n, C): mean over known items
    l2 = np.repeat(np.asarray(l2_grid, dtype=np.float64), C)        # (G * C,) per output column

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        weight = theta[: d * G * C].reshape(d, G * C)
        bias = theta[d * G * C:]
        logits = (X @ weight + bias).reshape(n, G, C)
        loss = (np.logaddexp(0.0, logits) - target[:, None] * logits) * item_weight[:, None]
        residual = ((expit(logits) - target[:, None]) * item_weight[:, None]).reshape(n, G * C)
        grad_w = X.T @ residual + l2 * weight
        value = loss.sum() + (l2 / 2 * weight**2).sum()
        return value, np.concatenate([grad_w.ravel(), residual.sum(0)])

    # L-BFGS-B makes thousands of tiny BLAS calls; on a shared machine waking BLAS threads for
    # each costs more than the work, so the fit runs on one thread.
    with threadpool_limits(limits=1, user_api="blas"):
        result = minimize(objective, np.zeros(d * G * C + G * C), jac=True, method="L-BFGS-B",
                          options={"maxiter": max_iter, "gtol": 1e-5})
    theta = result.x
    weight = theta[: d * G * C].reshape(d, G, C).transpose(1, 0, 2)
    return np.ascontiguousarray(weight), theta[d * G * C:].reshape(G, C)


class Standardiser:
    """Per-dimension z-score with statistics of the training items only."""

    def __init__(self, X: np.ndarray):
        self.mean = X.mean(0)
        self.std = X.std(0) + 1e-6

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean) / self.std


def _fit_and_select(train_X: np.ndarray, train_Y: np.ndarray, val_X: np.ndarray, val_Y: np.ndarray, l2_grid):
    """Fit the whole L2 grid on training features, pick each class's strength on validation AUC.

    -> (standardiser, weights (G, d, C), biases (G, C), chosen grid index per class (C,), trainable (C,)).
    """
    trainable = np.array([np.nanmax(train_Y[:, c], initial=-1) == 1 and np.nanmin(train_Y[:, c], initial=2) == 0
                          for c in range(train_Y.shape[1])])
    scale = Standardiser(train_X)
    weight, bias = fit_logistic_grid(scale(train_X), train_Y, l2_grid)
    val_logits = np.einsum("nd,gdc->gnc", scale(val_X), weight) + bias[:, None, :]
    val_auc = np.stack([per_class_auc(expit(p), val_Y) for p in val_logits])   # (G, C)
    chosen = np.empty(train_Y.shape[1], dtype=int)
    for c in range(train_Y.shape[1]):
        if np.isnan(val_auc[:, c]).all():
            chosen[c] = int(np.argmin(np.abs(np.log10(np.asarray(l2_grid)) - np.log10(FALLBACK_L2))))
        else:
            # Ties go to the strongest penalty: scan from the end of the ascending grid.
            scores = np.nan_to_num(val_auc[::-1, c], nan=-1.0)
            chosen[c] = len(l2_grid) - 1 - int(np.argmax(scores))
    return scale, weight, bias, chosen, trainable


def probe_scores(feats: ProbeFeatures, labels: ProbeLabels, train_index: np.ndarray,
                 l2_grid=L2_GRID) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train on `train_index`, select per class on val; -> (test probabilities (n_test, C),
    selected l2 per class (C,), trainable mask (C,))."""
    scale, weight, bias, chosen, trainable = _fit_and_select(
        feats.train[train_index], labels.train[train_index], feats.val, labels.val, l2_grid)
    test = expit(np.einsum("nd,gdc->gnc", scale(feats.test), weight) + bias[:, None, :])   # (G, n, C)
    picked = test[chosen, :, np.arange(len(chosen))].T             # (n_test, C)
    picked[:, ~trainable] = 0.5                                   # an unlearnable class scores chance
    return picked, np.asarray(l2_grid)[chosen], trainable


def fit_probe(train_X: np.ndarray, train_Y: np.ndarray, val_X: np.ndarray, val_Y: np.ndarray,
              l2_grid=L2_GRID) -> tuple[np.ndarray, np.ndarray]:
    """The probe `probe_scores` selects, as one linear layer on the raw features: (weight (d, C), bias (C,)).

    The standardisation is folded in, so sigmoid(X @ weight + bias) is the probe's probability. A
    class that cannot be learned from these labels gets weight 0 and bias 0: it scores chance.
    Fine-tuning starts its head from this (LP-FT).
    """
    scale, weight, bias, chosen, trainable = _fit_and_select(train_X, train_Y, val_X, val_Y, l2_grid)
    classes = np.arange(len(chosen))
    picked = weight[chosen, :, classes].T / scale.std[:, None]      # (d, C), on raw features
    offset = bias[chosen, classes] - scale.mean @ picked
    picked[:, ~trainable], offset[~trainable] = 0.0, 0.0
    return picked, offset


def evaluable_classes(labels: ProbeLabels, class_names: list[str]) -> tuple[np.ndarray, dict[str, str]]:
    """Columns that test and train can score (a positive and a negative in each), and why others cannot."""
    keep, skipped = [], {}
    for c, name in enumerate(class_names):
        for split in ("test", "train"):
            y = getattr(labels, split)[:, c]
            if not (np.any(y == 1) and np.any(y == 0)):
                skipped[name] = f"no {'positive' if not np.any(y == 1) else 'negative'} label in {split}"
                break
        else:
            keep.append(c)
    return np.asarray(keep, dtype=int), skipped


def linear_probe(
    features: list[ProbeFeatures],
    labels: ProbeLabels,
    class_names: list[str],
    fractions=(1.0,),
    seeds: int = 1,
    l2_grid=L2_GRID,
    n_boot: int = 1000,
    on_fit: Callable[[], None] | None = None,
) -> dict:
    """Probe every representation in `features` (more than one: average their probabilities).

    Returns the metrics dict; its top-level numbers are those of the largest fraction.
    """
    if not features:
        raise LeaderError("linear probe: no representation given")
    if seeds < 1:
        raise LeaderError(f"--seeds must be at least 1, got {seeds}")
    for name, Y in (("train", labels.train), ("val", labels.val), ("test", labels.test)):
        if len(Y) == 0:
            raise LeaderError(f"linear probe: the {name} split has no items; the shards need train, val and test samples")
    classes, skipped = evaluable_classes(labels, class_names)
    if len(classes) == 0:
        raise LeaderError(f"linear probe: no class has both labels in train and test ({skipped})")
    by_fraction = {}
    for fraction in sorted(set(float(f) for f in fractions)):
        seed_scores, per_seed, chance, selected, n_train = [], [], [], [], []
        for seed in range(seeds):
            train_index = patient_subset(labels.train_patients, fraction, seed)
            runs = [probe_scores(f, labels, train_index, l2_grid) for f in features]
            if on_fit:
                on_fit()
            scores = np.mean([r[0] for r in runs], axis=0)
            aucs = per_class_auc(scores, labels.test)[classes]
            seed_scores.append(scores)
            per_seed.append(float(np.mean(aucs)))
            chance.append([class_names[c] for c in classes if not runs[0][2][c]])
            selected.append({class_names[c]: [float(r[1][c]) for r in runs] for c in classes})
            n_train.append(int(len(train_index)))
        by_fraction[f"{fraction:g}"] = {
            **auc_summary(fraction, per_seed, seed_scores, labels.test, classes, class_names, n_boot),
            "seed_variation": len(set(per_seed)) > 1,
            "n_train": n_train,
            "chance_classes": chance,
            "selected_l2": selected,
        }
    top = by_fraction[max(by_fraction, key=float)]
    return {
        "primary": "auc_mean",
        "auc_mean": top["auc_mean"],
        "auc_std": top["auc_std"],
        "auc_ci95": top["auc_ci95"],
        "auc_boot": top["auc_boot"],
        "paired": BOOTSTRAP_PAIRS,
        "auc_per_class": top["auc_per_class"],
        "per_seed": top["per_seed"],
        "seed_variation": top["seed_variation"],
        "fraction": top["fraction"],
        "fractions": by_fraction,
        "classes": [class_names[c] for c in classes],
        "skipped_classes": skipped,
        "l2_grid": list(l2_grid),
        "n_items": {"train": len(labels.train), "val": len(labels.val), "test": len(labels.test)},
    }


# ---------------------------------------------------------------------------------------------
# On a shard set: `leader eval linear-probe`

LEVELS = ("image", "lesion")


def lesion_targets(items, classes: list[str], source: bool = False) -> np.ndarray:
    """One-vs-rest targets of patches: a diseased patch is positive for its lesion class and
    negative for the others; a healthy patch is negative for every class (there is no "normal"
    class to score: healthy patches are the hard negatives), and so is a lesion of a class left out.
    source: read each patch's class in the dataset's own names."""
    column = {name: c for c, name in enumerate(classes)}
    Y = np.zeros((len(items), len(classes)))
    for i, it in enumerate(items):
        label = it.source_label if source else it.label
        if it.kind == "diseased" and label in column:
            Y[i, column[label]] = 1.0
    return Y


def run_linear_probe(shards_dir, representations: list[str], out, *, level: str = "image",
                     fractions=(1.0,), seeds: int = 1, ensemble: str | None = None, classes=None, cache=None,
                     device: str = "cpu", n_boot: int = 1000, on_fit: Callable[[], None] | None = None) -> dict:
    """Probe one representation (or average several with ensemble="average"); write metrics + figure.

    classes: the classes averaged: None or "all" (every label; at lesion level every lesion class
    present), a class set the manifest names (e.g. "paper"), or a list (see leader/shards/class_sets.py).
    """
    if level not in LEVELS:
        raise LeaderError(f"--level must be one of {LEVELS}, got {level!r}")
    if ensemble not in (None, "average"):
        raise LeaderError(f"--ensemble must be 'average', got {ensemble!r}")
    reps = [parse_representation(r) for r in representations]
    if len(reps) > 1 and ensemble is None:
        raise LeaderError("several --repr values need --ensemble average (or use one concat:A+B representation)")
    if ensemble and len(reps) < 2:
        raise LeaderError("--ensemble average needs at least two --repr values")
    name = str(reps[0]) if len(reps) == 1 else "average:" + "+".join(map(str, reps))

    table = ItemTable.load(shards_dir)
    selection = select_classes(table.manifest, classes)
    source = selection.labels == SOURCE
    kinds = "image" if level == "image" else ("diseased", "healthy")
    items = {split: table.select(kind=kinds, split=split) for split in ("train", "val", "test")}
    if level == "image":
        class_names = selection.names
        targets = {s: label_matrix(items[s], class_names, source) for s in items}
    else:
        class_names = selection.names
        if selection.preset == ALL:
            found = {it.label for s in items for it in items[s] if it.kind == "diseased"}
            class_names = [c for c in table.label_names if c in found] + sorted(found - set(table.label_names))
        if not class_names:
            raise LeaderError(f"{shards_dir}: --level lesion needs diseased patches; these shards have none")
        targets = {s: lesion_targets(items[s], class_names, source) for s in items}
    all_rows = np.concatenate([rows_of(items[s]) for s in ("train", "val", "test")])
    bounds = np.cumsum([0] + [len(items[s]) for s in ("train", "val", "test")])
    per_rep = []
    for rep in reps:
        X, _ = features(rep, shards_dir, all_rows, cache=cache, device=device)
        per_rep.append(ProbeFeatures(*(X[bounds[i]:bounds[i + 1]] for i in range(3))))
    labels = ProbeLabels(targets["train"], targets["val"], targets["test"],
                         np.array([it.patient for it in items["train"]]))
    metrics = linear_probe(per_rep, labels, class_names, fractions=fractions, seeds=seeds, n_boot=n_boot, on_fit=on_fit)
    out = Path(out)
    auc_bars({name: metrics["auc_per_class"]}, out / "auc_per_class.png",
             title=f"{level}-level linear probe, fraction {metrics['fraction']:g}: {name}")
    metrics = {"protocol": "linear-probe" if level == "image" else "linear-probe-lesion",
               "representation": name, "shards": str(shards_dir), "level": level,
               "class_set": selection.preset or "a list", "class_labels": selection.labels,
               "ensemble": ensemble, "members": [str(r) for r in reps],
               "samples": {"field": "per_seed", "over": "seeds"},
               "figures": {"auc_per_class": "auc_per_class.png"}, **metrics}
    write_metrics(out, metrics)
    return metrics
