"""The evaluation figures: AUC per class, t-SNE of landmark patches, a retrieval grid, segmentation overlays.

Figures are drawn on a bare `matplotlib.figure.Figure` (no pyplot, no global backend state, safe in
any process) and written atomically as PNG.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from leader.io import atomic_write_bytes

CORRECT, WRONG, QUERY = "#2ca02c", "#d62728", "#1f77b4"


def save(fig: Figure, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def auc_bars(per_class: Mapping[str, Mapping[str, float]], path: str | Path, title: str = "AUC per class") -> Path:
    """Grouped bars: one group per class, one bar per representation ({representation: {class: auc}})."""
    names = list(per_class)
    classes = sorted({c for aucs in per_class.values() for c in aucs})
    width = 0.8 / max(1, len(names))
    fig = Figure(figsize=(max(5.0, 0.9 * len(classes) + 2), 3.6))
    ax = fig.add_subplot()
    x = np.arange(len(classes))
    for i, name in enumerate(names):
        values = [per_class[name].get(c, np.nan) for c in classes]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, classes, rotation=30, ha="right")
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("test AUC")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save(fig, path)


def tsne_scatter(points: np.ndarray, labels: Sequence[str], path: str | Path, title: str = "landmark patches (t-SNE)") -> Path:
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    names = sorted(set(labels))
    labels = np.asarray(labels)
    for name, colour in zip(names, _palette(len(names))):
        at = labels == name
        ax.scatter(points[at, 0], points[at, 1], s=10, color=colour, label=name)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    ax.legend(fontsize=6, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save(fig, path)


def _palette(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def retrieval_grid(query: np.ndarray, query_label: str, retrieved: Sequence[np.ndarray], correct: Sequence[bool],
                   path: str | Path, title: str = "") -> Path:
    """The query patch (blue frame) and its top retrieved images, framed green (relevant) or red."""
    n = len(retrieved) + 1
    fig = Figure(figsize=(1.6 * n, 2.0))
    panels = [(query, QUERY, f"query: {query_label}")]
    panels += [(img, CORRECT if ok else WRONG, f"#{i + 1}") for i, (img, ok) in enumerate(zip(retrieved, correct))]
    for i, (img, colour, caption) in enumerate(panels):
        ax = fig.add_subplot(1, n, i + 1)
        ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0)
        h, w = img.shape
        ax.add_patch(Rectangle((-0.5, -0.5), w, h, fill=False, edgecolor=colour, linewidth=4))
        ax.set_title(caption, fontsize=7)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    return save(fig, path)


def segmentation_overlays(cases: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, str]], path: str | Path,
                          title: str = "") -> Path:
    """One row per case: the image, the truth over it (green) and the prediction over it (red).

    cases: (image (S, S) in [0, 1], truth (S, S) bool, prediction (S, S) bool, caption).
    """
    fig = Figure(figsize=(6.0, 2.0 * max(1, len(cases)) + 0.3), layout="constrained")
    for row, (image, truth, predicted, caption) in enumerate(cases):
        for col, (mask, colour, name) in enumerate(((None, None, caption), (truth, CORRECT, "truth"),
                                                    (predicted, WRONG, "prediction"))):
            ax = fig.add_subplot(len(cases), 3, 3 * row + col + 1)
            ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
            if mask is not None and mask.any():
                from matplotlib.colors import to_rgba

                overlay = np.zeros((*mask.shape, 4))
                overlay[mask] = to_rgba(colour, 0.45)
                ax.imshow(overlay)
                ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=0.8)
            ax.set_title(name, fontsize=7)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    return save(fig, path)
