"""Zero-shot anatomy: how well frozen features of landmark patches separate the landmarks.

    metrics = anatomy_metrics(X, landmark_names, patients)

No training of the features: every number is computed on L2-normalised embeddings (cosine
geometry, as kNN evaluation of self-supervised features does):
- `knn_accuracy`: k-nearest-neighbour classification of the landmark, cross-validated with folds
  grouped by patient, so a patient's patches are never both neighbours and queries;
- `nmi`: normalised mutual information between k-means clusters (k = number of landmarks) and
  the landmark ids;
- `silhouette`: the cosine silhouette of the landmark ids themselves (-1 to 1).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans
from sklearn.manifold import TSNE
from sklearn.metrics import normalized_mutual_info_score, silhouette_score
from sklearn.model_selection import GroupKFold
from sklearn.neighbors import KNeighborsClassifier

from leader.errors import LeaderError
from leader.evaluate.figures import tsne_scatter
from leader.evaluate.items import ItemTable, rows_of
from leader.evaluate.representations import features, parse_representation
from leader.evaluate.results import write_metrics


def l2_normalise(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def knn_accuracy(X: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int = 10,
                 n_folds: int = 5) -> tuple[float, list[float]]:
    """Mean and per-fold accuracy of a cosine kNN vote, folds grouped by patient."""
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise LeaderError(f"anatomy: kNN needs landmark patches from at least 2 patients, found {n_groups}")
    folds = GroupKFold(n_splits=min(n_folds, n_groups))
    per_fold = []
    for train, test in folds.split(X, labels, groups):
        knn = KNeighborsClassifier(n_neighbors=min(k, len(train)), metric="cosine")
        knn.fit(X[train], labels[train])
        per_fold.append(float(np.mean(knn.predict(X[test]) == labels[test])))
    return float(np.mean(per_fold)), per_fold


def kmeans_nmi(X: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    n_clusters = len(np.unique(labels))
    clusters = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(l2_normalise(X))
    return float(normalized_mutual_info_score(labels, clusters))


def landmark_silhouette(X: np.ndarray, labels: np.ndarray) -> float:
    return float(silhouette_score(X, labels, metric="cosine"))


def tsne_2d(X: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of the normalised features; perplexity shrinks on small sets (it must be < n)."""
    perplexity = float(min(30.0, max(2.0, (len(X) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(l2_normalise(X))


def anatomy_metrics(X: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int = 10,
                    n_folds: int = 5, seed: int = 0) -> dict:
    labels, groups = np.asarray(labels), np.asarray(groups)
    if len(X) != len(labels) or len(X) != len(groups):
        raise LeaderError(f"anatomy: {len(X)} feature rows but {len(labels)} labels and {len(groups)} patients")
    names = np.unique(labels)
    if len(names) < 2:
        raise LeaderError(f"anatomy: landmark patches of at least 2 landmarks are needed, found {names.tolist()}")
    X = l2_normalise(X)
    accuracy, per_fold = knn_accuracy(X, labels, groups, k=k, n_folds=n_folds)
    return {
        "primary": "knn_accuracy",
        "knn_accuracy": accuracy,
        "knn_accuracy_std": float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else 0.0,
        "per_fold": per_fold,
        "nmi": kmeans_nmi(X, labels, seed),
        "silhouette": landmark_silhouette(X, labels),
        "k": int(k),
        "n_folds": len(per_fold),
        "n_patches": int(len(X)),
        "n_patients": int(len(np.unique(groups))),
        "landmarks": names.tolist(),
        "chance": float(np.max(np.unique(labels, return_counts=True)[1]) / len(labels)),
    }


# ---------------------------------------------------------------------------------------------
# On a shard set: `leader eval anatomy`


def run_anatomy(shards_dir, representation: str, out, *, k: int = 10, n_folds: int = 5, seed: int = 0,
                splits=("val", "test"), cache=None, device: str = "cpu") -> dict:
    """Landmark patches of the val and test splits (the only ones that have them)."""
    table = ItemTable.load(shards_dir)
    patches = table.select(kind="landmark", split=splits)
    if not patches:
        raise LeaderError(f"{shards_dir} has no landmark patches in {list(splits)}: anatomy needs a dataset with landmarks")
    rep = parse_representation(representation)
    X, _ = features(rep, shards_dir, rows_of(patches), cache=cache, device=device)
    labels = np.array([p.label for p in patches])
    metrics = anatomy_metrics(X, labels, np.array([p.patient for p in patches]), k=k, n_folds=n_folds, seed=seed)
    out = Path(out)
    tsne_scatter(tsne_2d(X, seed), labels, out / "tsne_landmarks.png",
                 title=f"{rep}: landmark patches (t-SNE), kNN accuracy {metrics['knn_accuracy']:.2f}")
    metrics = {"protocol": "anatomy", "representation": str(rep), "shards": str(shards_dir), "splits": list(splits),
               "samples": {"field": "per_fold", "over": "folds"},
               "paired": {"metric": "knn_accuracy", "field": "per_fold", "over": "folds of the same patients", "test": "t"},
               "figures": {"tsne": "tsne_landmarks.png"}, **metrics}
    write_metrics(out, metrics)
    return metrics
