"""Build WebDataset shards from a dataset adapter's records.

    records (adapter) -> healthy-patch plan (a first pass over the records, no pixels read)
    records (adapter) -> load + check + scale annotations + resize + encode (worker pool, in order)
                      -> duplicate check, patch plan, item rows (main process, in order)
                      -> shard-NNNNNN.tar (atomic) + per-shard state -> keys.txt, rejects.jsonl -> manifest.json

Everything that decides content happens in record order, so the shards are byte-identical for
any `--workers`. A killed build resumes from its last complete shard: the per-shard state holds
all it needs (rows, keys, rejects, counts, the healthy-patch size histogram), and the healthy
plan is a pure function of the records. SIGTERM (a scheduler's pre-emption) lets the shard in
progress finish, then stops with `BuildStopped`.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing as mp
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

import leader
from leader.errors import LeaderError
from leader.io import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from leader.runtime import StopOnSigterm, ignore_sigterm
from leader.shards.balance import (
    HealthyPlan,
    counts_report,
    merge_counts,
    plan_healthy_patches,
    shortfall_notes,
    tally_rejects,
    tally_sample,
)
from leader.shards.frames import frame_scale, scale_box, scale_points
from leader.shards.manifest import KEYS_NAME, MANIFEST_NAME, REJECTS_NAME, Manifest, ShardEntry
from leader.shards.png import encode_png
from leader.shards.patches import (
    PatchPlan,
    PatchSizeHistogram,
    diseased_patches,
    healthy_patches,
    landmark_patches,
)
from leader.shards.records import SPLITS, Box, RejectLog, SourceRecord

STATE_DIR = ".build"
# A box may overhang the image by this fraction of the side (annotation tools round outwards);
# more than that means the box belongs to another image size, and the record is rejected.
BOX_OVERHANG = 0.02
# Temporary files of leader.io's atomic writes (`.<name>.<random>.tmp`) that a killed build leaves.
PARTIAL_WRITES = (".shard-*.tar.*.tmp", f".{MANIFEST_NAME}.*.tmp", f".{KEYS_NAME}.*.tmp", f".{REJECTS_NAME}.*.tmp")


class BuildStopped(Exception):
    """SIGTERM stopped the build after a complete shard; rerunning the same command resumes it."""

    def __init__(self, index: int, name: str):
        self.index, self.name = index, name
        super().__init__(f"stopped after shard {index} ({name}) on SIGTERM; rerun the same command to resume")


DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class BuildSettings:
    dataset: str                                  # the adapter
    root: str | None = None
    name: str | None = None                       # the dataset's name in the manifest (default: the adapter's)
    size: int = 512
    shard_size: int = 1000
    seed: int = 0
    n: int | None = None
    max_reject_fraction: float = 0.01
    png_compression: int = 3
    patch: PatchPlan = field(default_factory=PatchPlan)
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch"] = self.patch.to_dict()
        return d

    def content_dict(self) -> dict:
        """The settings that decide the shards' content (the reject threshold does not)."""
        d = self.to_dict()
        d.pop("max_reject_fraction")
        return d


@dataclass
class Prepared:
    """One image ready to be written: the worker's output for an accepted record."""

    index: int
    key: str
    png: bytes
    meta: dict
    diseased_fractions: list[float]


@dataclass
class Rejected:
    index: int
    path: str
    reason: str
    key: str | None = None


# ---------------------------------------------------------------------------------------------
# Worker side: one record in, one Prepared or Rejected out.


def resize_long_side(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    if (new_w, new_h) == (w, h):
        return img
    if img.dtype == np.uint8:
        return np.asarray(Image.fromarray(img).resize((new_w, new_h), Image.Resampling.LANCZOS))
    # 16-bit: resample in float so that Pillow's 8-bit paths never truncate the depth.
    out = np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize((new_w, new_h), Image.Resampling.LANCZOS))
    return np.clip(np.rint(out), 0, 65535).astype(np.uint16)


def stretch_16bit(img: np.ndarray) -> np.ndarray:
    """Spread a 16-bit image that stores 10-12 bits (PadChest, the 16-bit phantom) over 0..65535.

    Readers divide by 65535, so an unstretched 12-bit image would look nearly black to every
    teacher; CXR Foundation's own client stretches the same way.
    """
    if img.dtype != np.uint16:
        return img
    lo, hi = int(img.min()), int(img.max())
    if lo == 0 and hi == 65535:
        return img
    return np.rint((img.astype(np.float64) - lo) * (65535.0 / (hi - lo))).astype(np.uint16)


def check_pixels(img) -> str | None:
    if not isinstance(img, np.ndarray):
        return f"loader returned {type(img).__name__}, not an array"
    if img.ndim != 2:
        return f"image has shape {img.shape}; expected a 2-D grayscale image"
    if img.dtype not in (np.uint8, np.uint16):
        return f"image dtype {img.dtype}; expected uint8 or uint16"
    if img.shape[0] < 8 or img.shape[1] < 8:
        return f"image is only {img.shape[1]}x{img.shape[0]} pixels"
    if img.min() == img.max():
        return "blank image (every pixel has the same value)"
    return None


def stored_boxes(boxes: list[Box], width: int, height: int, scale: float) -> tuple[list[dict], str | None]:
    out = []
    tol_x, tol_y = BOX_OVERHANG * width, BOX_OVERHANG * height
    for b in boxes:
        coords = b.as_list()
        if not all(math.isfinite(c) for c in coords):
            return [], f"box {b.label!r} has a non-finite coordinate {coords}"
        if b.x1 <= b.x0 or b.y1 <= b.y0:
            return [], f"box {b.label!r} {coords} is inverted or empty"
        if b.x0 < -tol_x or b.y0 < -tol_y or b.x1 > width + tol_x or b.y1 > height + tol_y:
            return [], f"box {b.label!r} {coords} lies outside the {width}x{height} image"
        x0, y0 = max(b.x0, 0.0), max(b.y0, 0.0)
        x1, y1 = min(b.x1, float(width)), min(b.y1, float(height))
        stored = {"label": b.label, "x0": round(x0 * scale, 3), "y0": round(y0 * scale, 3),
                  "x1": round(x1 * scale, 3), "y1": round(y1 * scale, 3)}
        if b.source_label is not None:
            stored["source_label"] = b.source_label
        out.append(stored)
    return out, None


def prepare(job: tuple[int, SourceRecord, BuildSettings]) -> Prepared | Rejected:
    index, rec, settings = job
    where = rec.path or rec.key
    if rec.healthy and rec.boxes:
        return Rejected(index, where, f"stated healthy but has {len(rec.boxes)} lesion box(es): the dataset "
                        "contradicts itself", rec.key)
    try:
        img = rec.load()
    except Exception as e:  # any decoder failure is a reject, never a crash of the build
        reason = str(e) or type(e).__name__
        return Rejected(index, where, f"unreadable image: {reason}", rec.key)
    if problem := check_pixels(img):
        return Rejected(index, where, problem, rec.key)
    height, width = img.shape
    img = stretch_16bit(img)
    try:
        sx, sy = frame_scale(rec.frame, height, width)
    except ValueError as e:
        return Rejected(index, where, str(e), rec.key)
    scale = settings.size / max(height, width)
    boxes, problem = stored_boxes([scale_box(b, sx, sy) for b in rec.boxes], width, height, scale)
    if problem:
        if (sx, sy) != (1.0, 1.0):
            problem += f" (scaled from the {rec.frame[1]}x{rec.frame[0]} annotation frame)"
        return Rejected(index, where, problem, rec.key)
    landmarks = None
    if rec.landmarks is not None:
        landmarks = {}
        for name, (x, y) in scale_points(rec.landmarks, sx, sy).items():
            # Contours drawn by a model may sit a pixel past the edge; further out is an error.
            if -1 <= x <= width + 1 and -1 <= y <= height + 1:
                x, y = min(max(x, 0.0), float(width)), min(max(y, 0.0), float(height))
            else:
                return Rejected(index, where, f"landmark {name!r} ({x}, {y}) lies outside the {width}x{height} image", rec.key)
            landmarks[name] = [round(x * scale, 3), round(y * scale, 3)]
    if rec.split not in SPLITS:
        return Rejected(index, where, f"split {rec.split!r} is not one of {SPLITS}", rec.key)
    stored = resize_long_side(img, settings.size)
    h, w = stored.shape
    patches = diseased_patches(boxes, w, h, settings.patch)
    meta = {
        "key": rec.key,
        "dataset": rec.dataset,
        "image_id": rec.image_id,
        "path": rec.path,
        "split": rec.split,
        "patient_id": rec.patient_id,
        "view": rec.view,
        "orig_size": [height, width],
        "size": [h, w],
        "scale": scale,
        "bits": 8 if stored.dtype == np.uint8 else 16,
        "labels": rec.labels,
        "source_labels": rec.source_labels,
        "source_classes": rec.source_classes,
        "healthy": bool(rec.healthy),
        "frame": list(rec.frame) if rec.frame is not None else None,
        "boxes": boxes,
        "landmarks": landmarks,
        "patches": patches,
        "rows": None,
        "extra": rec.extra,
    }
    fractions = [(p["box"][2] - p["box"][0]) / max(w, h) for p in patches]
    return Prepared(index, rec.key, encode_png(stored, settings.png_compression), meta, fractions)


# ---------------------------------------------------------------------------------------------
# Main process: order, patches, rows, shards, resume.


class ShardBuilder:
    def __init__(self, settings: BuildSettings, out: Path, adapter):
        self.s = settings
        self.out = out
        self.adapter = adapter
        self.state_dir = out / STATE_DIR
        self.histogram = PatchSizeHistogram()
        self.next_row = 0
        self.consumed = 0              # records consumed by complete shards
        self.completed: list[dict] = []
        self.seen_keys: set[str] = set()
        self.landmark_names: list[str] = []
        self.healthy_plan = HealthyPlan(settings.patch.healthy_ratio, settings.patch.healthy_max_per_image)

    # -- resume --------------------------------------------------------------------------
    def restore(self) -> None:
        settings_file = self.state_dir / "settings.json"
        wanted = self.s.content_dict()
        if settings_file.exists():
            found = json.loads(settings_file.read_text())
            if found != wanted:
                changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
                raise LeaderError(
                    f"{self.out} holds a partial build with other settings ({', '.join(changed)}); "
                    "rerun with the same settings, or pass --overwrite"
                )
        else:
            atomic_write_json(settings_file, wanted)
        # A kill during an atomic write leaves its temporary file; a shard's can be a gigabyte.
        for pattern in PARTIAL_WRITES:
            for partial in self.out.glob(pattern):
                partial.unlink(missing_ok=True)
        for partial in self.state_dir.glob(".*.tmp"):
            partial.unlink(missing_ok=True)
        for state_file in sorted(self.state_dir.glob("shard-*.json")):
            state = json.loads(state_file.read_text())
            tar = self.out / state["name"]
            if not tar.exists() or sha256_file(tar) != state["sha256"]:
                break  # the first shard that is not intact ends what can be reused
            self.completed.append(state)
        # A shard past a broken one cannot be trusted: its rows depend on what came before.
        for state_file in sorted(self.state_dir.glob("shard-*.json"))[len(self.completed):]:
            state_file.unlink()
        for state in self.completed:
            self.seen_keys.update(k for k, _ in state["keys"])
            for name in state["landmark_names"]:
                if name not in self.landmark_names:
                    self.landmark_names.append(name)
        if self.completed:
            last = self.completed[-1]
            self.histogram = PatchSizeHistogram(last["histogram"])
            self.next_row = last["rows"][1]
            self.consumed = last["consumed"]

    # -- one shard -----------------------------------------------------------------------
    def write_shard(self, samples: list[Prepared], rejects: list[Rejected], consumed: int) -> None:
        import webdataset as wds

        name = f"shard-{len(self.completed):06d}.tar"
        for p in samples:
            for f in p.diseased_fractions:
                self.histogram.add(f)
        row_start = self.next_row
        keys, label_counts, splits, counts = [], {}, {}, {}
        buf = io.BytesIO()
        with wds.TarWriter(buf, encoder=False, mtime=0) as sink:
            for p in samples:
                meta = p.meta
                h, w = meta["size"]
                if n_healthy := self.healthy_plan.patches_for(p.index):
                    meta["patches"] += healthy_patches(p.key, w, h, self.histogram, self.s.patch, self.s.seed, n_healthy)
                if meta["landmarks"] and meta["split"] in self.s.patch.landmark_splits:
                    meta["patches"] += landmark_patches(meta["landmarks"], w, h, self.s.patch, p.key, self.s.seed)
                    for lm in meta["landmarks"]:
                        if lm not in self.landmark_names:
                            self.landmark_names.append(lm)
                tally_sample(counts, meta)
                n_items = 1 + len(meta["patches"])
                meta["rows"] = [self.next_row, self.next_row + n_items]
                self.next_row += n_items
                keys.append([p.key, n_items])
                splits[meta["split"]] = splits.get(meta["split"], 0) + 1
                for label, v in meta["labels"].items():
                    c = label_counts.setdefault(label, {"pos": 0, "neg": 0, "unknown": 0})
                    c["pos" if v == 1 else "neg" if v == 0 else "unknown"] += 1
                sink.write({"__key__": p.key, "json": json.dumps(meta, ensure_ascii=False).encode(), "png": p.png})
        data = buf.getvalue()
        atomic_write_bytes(self.out / name, data)
        state = {
            "name": name,
            "n_samples": len(samples),
            "n_items": self.next_row - row_start,
            "rows": [row_start, self.next_row],
            "first_key": samples[0].key,
            "last_key": samples[-1].key,
            "sha256": hashlib.sha256(data).hexdigest(),
            "consumed": consumed,
            "keys": keys,
            "rejects": [{"path": r.path, "reason": r.reason, "key": r.key} for r in rejects],
            "histogram": self.histogram.to_list(),
            "label_counts": label_counts,
            "splits": splits,
            "counts": tally_rejects(counts, rejects, self.healthy_plan),
            "landmark_names": list(self.landmark_names),
        }
        # The state is written after the tar: a state file always describes a complete shard.
        atomic_write_json(self.state_dir / f"{Path(name).stem}.json", state, indent=None)
        self.completed.append(state)

    # -- the whole build -----------------------------------------------------------------
    def run(self, workers: int, on_progress=None) -> Manifest:
        self.restore()
        adapter_rejects = RejectLog()
        root = Path(self.s.root) if self.s.root else None
        if self.adapter.has_boxes:
            # A first pass over the records (their own rejects are logged by the second) fixes how
            # many healthy patches each healthy image gives before any shard is written.
            self.healthy_plan = plan_healthy_patches(
                self.adapter.records(root, RejectLog(), seed=self.s.seed, n=self.s.n),
                self.s.patch.healthy_ratio, self.s.patch.healthy_max_per_image, self.s.seed)
        records = self.adapter.records(root, adapter_rejects, seed=self.s.seed, n=self.s.n)
        jobs = ((i, rec, self.s) for i, rec in enumerate(records) if i >= self.consumed)
        pending: list[Prepared] = []
        pending_rejects: list[Rejected] = []
        done = self.consumed
        # Large rounds keep every worker busy between the main process's ordered bookkeeping.
        chunk = max(16, 64 * workers)
        # Workers ignore SIGTERM: a scheduler signals the whole process group, and the main process
        # still needs them to finish the shard in progress.
        pool = mp.get_context("spawn").Pool(workers, initializer=ignore_sigterm) if workers > 1 else None
        try:
            with StopOnSigterm() as stop:
                while True:
                    batch = list(_take(jobs, chunk))
                    if not batch:
                        break
                    results = pool.imap(prepare, batch, chunksize=4) if pool else map(prepare, batch)
                    for r in results:
                        done += 1
                        if isinstance(r, Prepared) and r.key in self.seen_keys:
                            r = Rejected(r.index, r.meta["path"] or r.key, f"duplicate key {r.key!r}", r.key)
                        if isinstance(r, Rejected):
                            pending_rejects.append(r)
                            continue
                        self.seen_keys.add(r.key)
                        pending.append(r)
                        if len(pending) == self.s.shard_size:
                            self.write_shard(pending, pending_rejects, consumed=r.index + 1)
                            pending, pending_rejects = [], []
                            if stop.requested:
                                raise BuildStopped(len(self.completed) - 1, self.completed[-1]["name"])
                    if on_progress:
                        on_progress(done, len(self.completed))
        finally:
            if pool:
                pool.close()
                pool.join()
        if pending:
            self.write_shard(pending, pending_rejects, consumed=done)
            pending_rejects = []
        return self.finish(adapter_rejects, pending_rejects)

    def finish(self, adapter_rejects: RejectLog, tail_rejects: list[Rejected]) -> Manifest:
        rejects = list(adapter_rejects.entries)
        for state in self.completed:
            rejects += [{k: v for k, v in r.items() if v is not None} for r in state["rejects"]]
        rejects += [{"path": r.path, "reason": r.reason, **({"key": r.key} if r.key else {})} for r in tail_rejects]
        rejects.sort(key=lambda r: (r["path"], r["reason"]))
        atomic_write_text(self.out / REJECTS_NAME, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
        n_samples = sum(s["n_samples"] for s in self.completed)
        total = n_samples + len(rejects)
        if total == 0:
            raise LeaderError(f"{self.s.dataset}: no images found (root {self.s.root})")
        fraction = len(rejects) / total
        if fraction > self.s.max_reject_fraction:
            raise LeaderError(
                f"{len(rejects)} of {total} inputs were rejected ({fraction:.1%}), more than "
                f"--max-reject-fraction {self.s.max_reject_fraction:.1%}; reasons are in {self.out / REJECTS_NAME}. "
                "No manifest was written; fix the inputs or raise the threshold and rerun (finished shards are kept)"
            )
        atomic_write_text(
            self.out / KEYS_NAME,
            "".join(f"{k}\t{n}\n" for s in self.completed for k, n in s["keys"]),
        )
        label_counts: dict = {}
        splits, counts = {}, {}
        for s in self.completed:
            merge_counts(counts, s["counts"])
            for label, c in s["label_counts"].items():
                acc = label_counts.setdefault(label, {"pos": 0, "neg": 0, "unknown": 0})
                for k in acc:
                    acc[k] += c[k]
            for k, v in s["splits"].items():
                splits[k] = splits.get(k, 0) + v
        tally_rejects(counts, tail_rejects, self.healthy_plan)
        label_names = list(self.adapter.label_names) or sorted(label_counts)
        counts = counts_report(counts, self.healthy_plan, len(rejects))
        dataset = self.s.name or self.s.dataset
        notes = [*getattr(self.adapter, "notes", []),
                 *shortfall_notes(counts, dataset, self.s.patch.healthy_max_per_image)]
        manifest = Manifest(
            root=self.out,
            dataset=dataset,
            label_names=label_names,
            landmark_names=list(self.landmark_names),
            has_boxes=bool(self.adapter.has_boxes),
            has_landmarks=bool(getattr(self.adapter, "has_landmarks", False)),
            overlap_note=getattr(self.adapter, "overlap_note", None),
            build=self.s.to_dict(),
            n_samples=n_samples,
            n_items=self.completed[-1]["rows"][1] if self.completed else 0,
            n_rejects=len(rejects),
            splits={k: splits[k] for k in SPLITS if k in splits},
            label_counts={k: label_counts[k] for k in label_names if k in label_counts},
            shards=[ShardEntry(s["name"], s["n_samples"], s["n_items"], tuple(s["rows"]), s["first_key"], s["last_key"], s["sha256"]) for s in self.completed],
            leader_version=leader.__version__,
            counts=counts,
            source_class_names=list(getattr(self.adapter, "source_class_names", [])),
            class_sets={name: c.to_dict() for name, c in getattr(self.adapter, "class_sets", {}).items()},
            notes=notes,
        )
        atomic_write_json(self.out / MANIFEST_NAME, manifest.to_dict())
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return manifest


def _take(it: Iterator, n: int):
    for _ in range(n):
        try:
            yield next(it)
        except StopIteration:
            return


def build_shards(settings: BuildSettings, out: str | Path, workers: int = 1, overwrite: bool = False, on_progress=None) -> Manifest:
    """Build (or resume, or confirm) the shard set for `settings` in `out`."""
    from leader.shards.datasets import create_dataset

    out = Path(out)
    if settings.shard_size < 1:
        raise LeaderError("--shard-size must be at least 1")
    if settings.size < 16:
        raise LeaderError("--size must be at least 16 pixels")
    if overwrite and out.exists():
        for p in list(out.glob("shard-*.tar")) + [out / MANIFEST_NAME, out / KEYS_NAME, out / REJECTS_NAME]:
            p.unlink(missing_ok=True)
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    if (out / MANIFEST_NAME).exists():
        existing = Manifest.load(out)
        found = dict(existing.build)
        found.pop("max_reject_fraction", None)
        found.setdefault("name", None)                  # manifests written before --name existed
        # Manifests written before landmark jitter existed cut exactly the unjittered patches.
        found["patch"] = {"landmark_jitter": 0.0, "landmark_scale": [1.0, 1.0], **found.get("patch", {})}
        if found == settings.content_dict():
            return existing
        raise LeaderError(f"{out} already holds a complete shard set built with other settings; pass --overwrite or choose another --out")
    if settings.name is not None and not DATASET_NAME.fullmatch(settings.name):
        raise LeaderError(f"--name {settings.name!r}: use letters, digits, '.', '_' and '-' (it names the dataset in configs)")
    out.mkdir(parents=True, exist_ok=True)
    adapter = create_dataset(settings.dataset, **settings.options)
    return ShardBuilder(settings, out, adapter).run(workers, on_progress)
