"""Student embeddings of any shard set: the bridge from a trained run to evaluation and to users.

    out = embed_items("runs/demo", "shards/phantom", rows=[0, 1, 2], heads=("backbone", "disease"))
    out["backbone"].shape          # (3, num_features)

Items are rendered exactly as in training, with the identity view: an image stretched onto its
stored square and resized to the student's resolution; a patch cut with `crop_patch` at the run's
patch_size first. Head outputs are the raw h_t(E_DA), before any target normalisation.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from leader.errors import LeaderError
from leader.io import atomic_write_bytes
from leader.shards.manifest import Manifest
from leader.shards.layout import item_keys, iter_shard
from leader.train.checkpoint import Checkpoint
from leader.train.config import config_from_dict
from leader.train.loader import place_on_canvas
from leader.train.model import Student, create_student
from leader.train.step import StudentInput, render_images, render_patches
from leader.views import IDENTITY


def load_student(run: str | Path, device: str | torch.device = "cpu") -> tuple[Student, StudentInput, dict]:
    """The trained student in eval mode, how it wants its input, and the checkpoint's head dims."""
    checkpoint = Checkpoint.load(run)
    cfg = config_from_dict(checkpoint.config)
    cfg.model.pretrained_file = None          # the checkpoint holds the weights
    student = create_student(cfg.model, checkpoint.head_dims)
    student.load_state_dict(checkpoint.inference_weights())
    student.to(device).eval()
    return student, StudentInput.from_config(cfg.model, checkpoint.patch_size), checkpoint.head_dims


@torch.no_grad()
def embed_items(run_dir: str | Path, shards_dir: str | Path, rows: Sequence[int] | None = None,
                heads: Sequence[str] = ("backbone",), batch_size: int = 64, device: str = "cpu") -> dict[str, np.ndarray]:
    """{head: (len(rows), d) float32} for item rows in manifest order (None: every item)."""
    device = torch.device(device)
    student, student_input, head_dims = load_student(run_dir, device)
    unknown = [h for h in heads if h != "backbone" and h not in head_dims]
    if unknown:
        raise LeaderError(f"run {run_dir} has no head {unknown}; heads: backbone, {', '.join(head_dims)}")
    manifest = Manifest.load(shards_dir)
    rows = np.arange(manifest.n_items) if rows is None else np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= manifest.n_items):
        raise LeaderError(f"rows must lie in [0, {manifest.n_items}) for {shards_dir}; got {rows.min()}..{rows.max()}")
    wanted: dict[int, list[int]] = {}
    for position, row in enumerate(rows.tolist()):
        wanted.setdefault(row, []).append(position)
    shards = sorted({manifest.shard_of_row(r) for r in wanted})
    canvas = int(manifest.build["size"])
    out = {h: np.zeros((len(rows), student.num_features if h == "backbone" else head_dims[h]), np.float32) for h in heads}

    pending: list[tuple[int, np.ndarray, np.ndarray, list | None]] = []

    def flush() -> None:
        if not pending:
            return
        images = torch.from_numpy(np.stack([p[1] for p in pending])).to(device)
        hw = np.stack([p[2] for p in pending])
        is_patch = np.array([p[3] is not None for p in pending])
        pixels = torch.empty(len(pending), 1, student_input.image_size, student_input.image_size, device=device)
        for select, patch in ((~is_patch, False), (is_patch, True)):
            if not select.any():
                continue
            rows = np.flatnonzero(select)
            index = torch.from_numpy(rows).to(device)
            identity = np.repeat(IDENTITY[None], len(rows), axis=0)
            if patch:
                boxes = np.array([pending[i][3] for i in rows], dtype=np.float64)
                pixels[index] = render_patches(images[index], hw[rows], boxes, identity, student_input.patch_size,
                                               student_input.image_size)
            else:
                pixels[index] = render_images(images[index], hw[rows], identity, student_input.image_size)
        features, outputs = student(student_input.normalise(pixels), branches=[h for h in heads if h != "backbone"])
        results = {"backbone": features, **outputs}
        for i, (row, *_rest) in enumerate(pending):
            for h in heads:
                out[h][wanted[row]] = results[h][i].float().cpu().numpy()
        pending.clear()

    for s in shards:
        entry = manifest.shards[s]
        for sample in iter_shard(manifest.path(entry.name), entry.sha256):
            a, b = sample.meta["rows"]
            needed = [r for r in range(a, b) if r in wanted]
            if not needed:
                continue
            image, hw = place_on_canvas(sample.image(), canvas, sample.key)
            for r in needed:
                box = None if r == a else sample.meta["patches"][r - a - 1]["box"]
                pending.append((r, image, hw, box))
                if len(pending) >= batch_size:
                    flush()
    flush()
    return out


def write_embeddings(run: str | Path, shards_dir: str | Path, out: str | Path, heads: Sequence[str] | None = None,
                     batch_size: int = 64, device: str = "cpu") -> Path:
    """`leader embed`: every item of a shard set -> FILE.npz with one array per head, rows and keys."""
    if heads is None:
        heads = ["backbone", *Checkpoint.load(run).head_dims]
    arrays = embed_items(run, shards_dir, None, heads, batch_size, device)
    manifest = Manifest.load(shards_dir)
    keys = [key for sample_key, n in manifest.iter_keys() for key in item_keys(sample_key, n - 1)]
    buffer = io.BytesIO()
    np.savez(buffer, rows=np.arange(manifest.n_items), keys=np.array(keys), **arrays)
    atomic_write_bytes(out, buffer.getvalue())
    return Path(out)
