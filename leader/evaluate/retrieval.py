"""Zero-shot disease retrieval: a lesion patch is the query, whole images are the gallery.

    result = retrieve(query_X, query_labels, query_images, gallery_X, gallery_Y, gallery_keys,
                      class_names, k=100, n_queries=500)

The paper's protocol, made explicit where it is silent:
- queries are diseased patches drawn at random (seeded, without replacement) from the test split;
  the gallery is the test split's images;
- similarity is cosine; a retrieved image is relevant when its label for the query's lesion class
  is positive;
- the query's own image is left out of its gallery (it would be found through the shared pixels,
  not through the disease), and so are images whose label for the class is unknown;
- precision@K uses K_q = min(K, number of relevant images in the query's gallery), so a perfect
  ranking scores 1 on small galleries too. With the paper's galleries every class has more than
  100 positives and this is exactly precision@100. A query whose class has no relevant image left
  is skipped and counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leader.errors import LeaderError
from leader.evaluate.anatomy import l2_normalise
from leader.evaluate.figures import retrieval_grid
from leader.evaluate.items import ItemTable, label_matrix, read_images, rows_of
from leader.evaluate.representations import features, parse_representation
from leader.evaluate.results import write_metrics
from leader.shards.crop import crop_patch
from leader.views import to_unit_float


@dataclass
class QueryResult:
    query: int                 # index into the queries
    label: str
    k: int                     # K_q
    precision: float
    top: np.ndarray            # the first `keep_top` gallery indices, best first
    relevant: np.ndarray       # (len(top),) bool


def retrieve(
    query_X: np.ndarray,
    query_labels: list[str],
    query_images: list[str],
    gallery_X: np.ndarray,
    gallery_Y: np.ndarray,
    gallery_keys: list[str],
    class_names: list[str],
    k: int = 100,
    n_queries: int = 500,
    seed: int = 0,
    keep_top: int = 8,
) -> tuple[dict, list[QueryResult]]:
    if k < 1:
        raise LeaderError(f"retrieval: --k must be at least 1, got {k}")
    if len(query_X) == 0:
        raise LeaderError("retrieval: no diseased patches in the query split; the shards need lesion boxes")
    if len(gallery_X) == 0:
        raise LeaderError("retrieval: the gallery split has no images")
    column = {name: c for c, name in enumerate(class_names)}
    unknown = sorted({lab for lab in query_labels if lab not in column})
    if unknown:
        raise LeaderError(f"retrieval: patch labels {unknown} are not image labels of the shard set {class_names}")
    similarity = l2_normalise(query_X) @ l2_normalise(gallery_X).T            # (n_q, n_g)
    order = np.random.default_rng(seed).permutation(len(query_X))[:n_queries]
    key_index = {key: i for i, key in enumerate(gallery_keys)}
    results, chance, skipped = [], [], 0
    for q in order:
        label = query_labels[q]
        y = gallery_Y[:, column[label]]
        eligible = ~np.isnan(y)
        if query_images[q] in key_index:
            eligible[key_index[query_images[q]]] = False
        n_relevant = int(np.sum(y[eligible] == 1))
        if n_relevant == 0:
            skipped += 1
            continue
        candidates = np.flatnonzero(eligible)
        ranked = candidates[np.argsort(-similarity[q, candidates], kind="stable")]
        k_q = min(k, n_relevant)
        relevant = y[ranked] == 1
        results.append(QueryResult(int(q), label, k_q, float(relevant[:k_q].mean()),
                                   ranked[:keep_top], relevant[:keep_top]))
        chance.append(n_relevant / len(candidates))
    if not results:
        raise LeaderError(f"retrieval: none of the {len(order)} queries has a relevant image in the gallery")
    precisions = np.array([r.precision for r in results])
    per_class = {}
    for name in class_names:
        values = [r.precision for r in results if r.label == name]
        if values:
            per_class[name] = float(np.mean(values))
    ks = np.array([r.k for r in results])
    metrics = {
        "primary": "precision_at_k_mean",
        "precision_at_k_mean": float(precisions.mean()),
        "precision_at_k_std": float(precisions.std(ddof=1)) if len(precisions) > 1 else 0.0,
        "k": int(k),
        "k_effective": {"min": int(ks.min()), "median": float(np.median(ks)), "max": int(ks.max())},
        "precision_per_class": per_class,
        "per_query": precisions.tolist(),
        "n_queries": len(results),
        "n_skipped_queries": skipped,
        "n_gallery": int(len(gallery_X)),
        "chance": float(np.mean(chance)),         # the expected precision of a random ranking
    }
    return metrics, results


# ---------------------------------------------------------------------------------------------
# On a shard set: `leader eval retrieval`


def run_retrieval(shards_dir, representation: str, out, *, k: int = 100, n_queries: int = 500,
                  seed: int = 0, split: str = "test", cache=None, device: str = "cpu") -> dict:
    table = ItemTable.load(shards_dir)
    queries = table.select(kind="diseased", split=split)
    gallery = table.select(kind="image", split=split)
    rep = parse_representation(representation)
    X, _ = features(rep, shards_dir, np.concatenate([rows_of(queries), rows_of(gallery)]), cache=cache, device=device)
    metrics, results = retrieve(
        X[: len(queries)], [q.label for q in queries], [q.sample_key for q in queries],
        X[len(queries):], label_matrix(gallery, table.label_names), [g.key for g in gallery],
        table.label_names, k=k, n_queries=n_queries, seed=seed)
    out = Path(out)
    shown = results[0]
    query = queries[shown.query]
    images = read_images(shards_dir, [query.sample_key] + [gallery[i].key for i in shown.top])
    retrieval_grid(
        crop_patch(images[query.sample_key], query.box, 96),
        shown.label,
        [to_unit_float(images[gallery[i].key]).numpy() for i in shown.top],
        shown.relevant.tolist(),
        out / "retrieval_grid.png",
        title=f"{rep}: top {len(shown.top)} for a {shown.label} patch (precision@{shown.k} = {shown.precision:.2f})",
    )
    metrics = {"protocol": "retrieval", "representation": str(rep), "shards": str(shards_dir), "split": split,
               "seed": seed, "samples": {"field": "per_query", "over": "queries"},
               "paired": {"metric": "precision_at_k_mean", "field": "per_query", "over": "queries", "test": "t"},
               "figures": {"retrieval_grid": "retrieval_grid.png"}, **metrics}
    write_metrics(out, metrics)
    return metrics
