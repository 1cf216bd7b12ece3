"""Tiny chest-X-ray-like files in the formats real datasets ship, for the adapter tests.

Each writer makes a small image with some structure (a bright disc on a gradient), so that a
resize or a crop has something to show and a blank-image check never fires by accident.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from leader.shards.datasets import create_dataset
from leader.shards.records import RejectLog, SourceRecord


def radiograph(height: int = 64, width: int | None = None, *, bits: int = 8, seed: int = 0) -> np.ndarray:
    """A 2-D uint8 (bits=8) or uint16 array: a vertical gradient, a disc and a little noise."""
    width = width or height
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    gradient = yy / max(height - 1, 1)
    disc = ((yy - height * 0.4) ** 2 + (xx - width * 0.6) ** 2 < (min(height, width) * 0.15) ** 2) * 0.5
    unit = np.clip(0.2 + 0.4 * gradient + disc + rng.uniform(0, 0.05, (height, width)), 0, 1)
    top = (1 << bits) - 1
    return np.rint(unit * top).astype(np.uint8 if bits <= 8 else np.uint16)


def write_png(path: Path, image: np.ndarray | None = None, *, rgb: bool = False, **kw) -> Path:
    from PIL import Image

    image = radiograph(**kw) if image is None else image
    path.parent.mkdir(parents=True, exist_ok=True)
    if rgb:
        Image.fromarray(np.stack([image] * 3, axis=-1).astype(np.uint8)).save(path)
    else:
        Image.fromarray(image).save(path)  # uint8 -> L, uint16 -> I;16
    return path


def write_mha(path: Path, image: np.ndarray | None = None, **kw) -> Path:
    import SimpleITK as sitk

    image = radiograph(**kw) if image is None else image
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(image), str(path))
    return path


def write_raw(path: Path, image: np.ndarray, dtype: str = ">u2") -> Path:
    """A headerless raw file, e.g. JSRT's big-endian 12-bit .IMG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.astype(dtype).tofile(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def collect(name: str, root: Path, *, seed: int = 0, n: int | None = None, adapter=None):
    """Run an adapter the way the builder does: records by id, plus the reject log."""
    adapter = adapter or create_dataset(name)
    rejects = RejectLog()
    records = list(adapter.records(root, rejects, seed=seed, n=n))
    return {r.image_id: r for r in records}, rejects


def reject_reasons(rejects: RejectLog) -> dict[str, str]:
    """path -> reason for every rejected input."""
    return {e["path"]: e["reason"] for e in rejects.entries}


def check_record(record: SourceRecord, adapter) -> None:
    """What the builder relies on for every record of any adapter."""
    import pickle

    assert record.dataset == adapter.name
    assert record.split in ("train", "val", "test")
    assert record.patient_id
    assert set(record.labels) <= set(adapter.label_names), (record.labels, adapter.label_names)
    assert all(v in (0, 1, None) for v in record.labels.values())
    json.dumps(record.source_labels)
    json.dumps(record.extra)
    pickle.dumps(record.load)  # loads run in worker processes
    if record.masks is not None:
        pickle.dumps(record.masks)  # and so do masks


def build_with_cli(name: str, root: Path, out: Path, *extra: str, size: int = 64):
    """`leader shards build NAME --root ROOT --out OUT --size SIZE`, then the samples and manifest."""
    from typer.testing import CliRunner

    from leader.cli import app
    from leader.shards.manifest import Manifest
    from leader.shards.layout import iter_samples

    result = CliRunner().invoke(
        app, ["shards", "build", name, "--root", str(root), "--out", str(out), "--size", str(size), *extra]
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    samples = {s.meta["image_id"]: s for s in iter_samples(out)}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines() if line]
    return samples, Manifest.load(out), rejects
