"""`leader eval segment`: fine-tune a UperNet whose encoder starts from a representation's backbone.

    metrics = run_segment("shards/siim", "run:runs/swinb", "eval/seg-student", fractions=(0.05, 0.1, 1.0),
                          seeds=3, size=448)

The paper's segmentation protocol (its Tables 2 and 3: SIIM-ACR and ChestX-Det, with all, 10% and
5% of the training labels), fine-tuned end to end:
- data: the samples of a shard set that carry masks of the chosen classes (`leader.shards.masks`);
  a sample whose annotation lacks one of them is left out and counted. Train, val and test are
  the shard splits (by patient); `--fraction` keeps a random subset of training patients per seed,
  so the 5% and 10% subsets are the same for a given seed on every representation;
- target: `union` (default) is one binary mask of any finding class, as this lab's published code
  treats ChestX-Det; `per-class` is a multi-label mask with one output and one score per class.
  `--classes A,B` picks mask classes (default: every class that marks a finding, none of the
  anatomy); anatomy tasks name theirs (`--classes right_lung,left_lung`);
- model: `leader.evaluate.upernet.build_upernet`, the encoder filled from the starting point and
  checked; `random:SPEC` gives the same architecture with random weights, the baseline;
- training: `leader.evaluate.tuning.fit`, the loop classification fine-tuning uses: AdamW (the
  encoder at `lr`, 2e-4 by default as in this lab's code; the decoder, which starts from scratch,
  at `lr * head_lr_scale`), warm-up then cosine, random views of image and mask together
  (`replay_views` / `replay_mask_views`: the same geometry, nearest neighbour for the mask),
  Dice + BCE loss, early stopping on the validation set's pooled Dice;
- metrics (`leader.evaluate.seg_metrics`), at the model's input size: pooled Dice (primary), mean
  per-image Dice (empty on empty scores 1), both IoUs, 95% bootstrap CIs over test images, and per
  class where there are classes; `eval compare` and `leader report` read them like any protocol;
- figure: overlays of image, truth and prediction for the best and worst test cases.

The stored images and masks of all three splits are held in memory at the stored size (as uint8 or
uint16 and packed bits); each batch is rendered at the model's size on the device.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from leader.errors import LeaderError
from leader.evaluate.figures import segmentation_overlays
from leader.evaluate.initialisation import BackboneSource, backbone_source
from leader.evaluate.items import patient_subset
from leader.evaluate.results import write_metrics
from leader.evaluate.seg_metrics import image_dice, overlap_counts, seed_scores, segmentation_summary
from leader.evaluate.tuning import Recipe, autocast, fit, prepare_input
from leader.evaluate.upernet import build_upernet
from leader.shards.layout import iter_samples
from leader.shards.manifest import Manifest
from leader.shards.class_sets import ALL, select_classes
from leader.shards.masks import decode_masks, finding_classes, pack_planes
from leader.views import IDENTITY, replay_mask_views, replay_views

TARGETS = ("union", "per-class")
SPLITS = ("train", "val", "test")
OVERLAY_CASES = 3                       # best and worst test cases in the figure
# What a paired claim compares between two starting points segmented on the same test set.
BOOTSTRAP_PAIRS = {"metric": "dice_mean", "field": "dice_boot", "over": "bootstrap resamples of the test images",
                   "test": "bootstrap"}


@dataclass
class SegmentConfig(Recipe):
    epochs: int = 50
    batch_size: int = 16
    lr: float = 2e-4
    patience: int = 10
    decoder_channels: int = 256


@dataclass
class SegmentData:
    """Per split: stored images (N, 1, side, side) uint8/uint16 and masks (N, 1, side, side) int32
    whose bit k is `classes[k]`; item keys and patients."""

    classes: list[str]
    images: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    keys: dict[str, list[str]]
    train_patients: np.ndarray
    left_out: dict[str, int]            # samples per split without masks of every chosen class


def choose_classes(shards_dir, mask_classes: list[str], requested: list[str] | None) -> list[str]:
    if requested:
        unknown = [c for c in requested if c not in mask_classes]
        if unknown:
            raise LeaderError(f"--classes {','.join(unknown)}: not mask classes of {shards_dir}; "
                              f"it has {', '.join(mask_classes)}")
        return list(dict.fromkeys(requested))
    findings = finding_classes(mask_classes)
    if not findings:
        raise LeaderError(f"{shards_dir} has anatomy masks only ({', '.join(mask_classes)}); choose them with --classes")
    return findings


def requested_mask_classes(manifest, classes: str | list[str] | None) -> list[str] | None:
    """--classes as mask class names: a list, "a,b", or a class set the manifest names (e.g. "paper",
    whose names are matched to the masks' spelling); None or "all" for the default."""
    if classes is None or classes == ALL:
        return None
    if isinstance(classes, str) and classes in (manifest.class_sets or {}):
        by_spelling = {mask_class_name(m): m for m in manifest.mask_classes}
        names = select_classes(manifest, classes).names
        missing = [n for n in names if mask_class_name(n) not in by_spelling]
        if missing:
            raise LeaderError(f"class set {classes!r} of {manifest.dataset} names classes without masks: {missing}")
        return [by_spelling[mask_class_name(n)] for n in names]
    return [c.strip() for c in (classes.split(",") if isinstance(classes, str) else classes) if c.strip()]


def mask_class_name(name: str) -> str:
    """A class as masks spell it: ChestX-Det's "Diffuse Nodule" is the mask class diffuse_nodule."""
    return name.strip().lower().replace(" ", "_")


def load_segment_data(shards_dir, classes: str | list[str] | None = None) -> SegmentData:
    manifest = Manifest.load(shards_dir)
    if not manifest.mask_classes:
        raise LeaderError(f"{shards_dir} has no segmentation masks: it was built before leader stored masks, or its "
                          f"dataset ({manifest.dataset}) has none; rebuild it with `leader shards build` to segment")
    chosen = choose_classes(shards_dir, manifest.mask_classes, requested_mask_classes(manifest, classes))
    images, masks, keys = ({s: [] for s in SPLITS} for _ in range(3))
    patients, left_out = [], {s: 0 for s in SPLITS}
    for sample in iter_samples(shards_dir):
        split = sample.meta["split"]
        annotated = (sample.meta.get("mask") or {}).get("classes", [])
        if sample.mask_png is None or not set(chosen) <= set(annotated):
            left_out[split] += 1
            continue
        image, packed = on_square_canvas(sample.image(), pack_planes(decode_masks(sample.mask_png, manifest.mask_classes,
                                                                                   chosen)))
        images[split].append(image)
        masks[split].append(packed)
        keys[split].append(sample.key)
        if split == "train":
            patients.append(str(sample.meta["patient_id"]))
    for split in SPLITS:
        if not images[split]:
            raise LeaderError(f"segment: the {split} split of {shards_dir} has no sample with masks of "
                              f"{', '.join(chosen)} ({left_out[split]} samples left out)")
    deep = any(im.dtype == np.uint16 for split in SPLITS for im in images[split])
    return SegmentData(
        classes=chosen,
        images={s: torch.from_numpy(np.stack([_to_depth(im, deep) for im in images[s]])[:, None]) for s in SPLITS},
        masks={s: torch.from_numpy(np.stack(masks[s]).astype(np.int32)[:, None]) for s in SPLITS},
        keys=keys, train_patients=np.array(patients), left_out=left_out)


def on_square_canvas(image: np.ndarray, packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A stored image and its mask stretched onto a square of the longer side, as training views are."""
    h, w = image.shape
    if h == w:
        return image, packed
    from leader.shards.crop import crop_patch

    side = max(h, w)
    top = 255 if image.dtype == np.uint8 else 65535
    square = np.rint(crop_patch(image, [0.0, 0.0, float(w), float(h)], side) * top).astype(image.dtype)
    mask = replay_mask_views(packed.astype(np.int32)[None, None], IDENTITY[None], side)[0, 0].numpy()
    return square, mask


def _to_depth(image: np.ndarray, deep: bool) -> np.ndarray:
    """One bit depth for a whole set: 8-bit images become 16-bit (x257, exact) where any is 16-bit."""
    return image.astype(np.uint16) * np.uint16(257) if deep and image.dtype == np.uint8 else image


def dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE plus soft Dice pooled over the batch, averaged over classes (this lab trains with Dice)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum((0, 2, 3))
    dice = (2 * inter + 1.0) / (p.sum((0, 2, 3)) + target.sum((0, 2, 3)) + 1.0)
    return bce + (1 - dice).mean()


class SegmentationTask:
    """Masks: a UperNet on the backbone, Dice + BCE, validation pooled Dice."""

    score_name = "val_dice"

    def __init__(self, source: BackboneSource, data: SegmentData, train_index: np.ndarray, target: str,
                 cfg: SegmentConfig, size: int):
        self.source, self.data, self.target, self.size, self.batch_size = source, data, target, size, cfg.batch_size
        self.n_out = 1 if target == "union" else len(data.classes)
        self.model, self.encoder = build_upernet(source, self.n_out, size, cfg.decoder_channels)
        self.pretrained = self.model.encoder if source.pretrained else None
        self.images = data.images["train"][train_index]
        self.masks = data.masks["train"][train_index]
        self.train_keys = [data.keys["train"][i] for i in train_index]

    def parameter_groups(self):
        fresh = [p for name, p in self.model.named_parameters() if not name.startswith("encoder.")]
        return self.model.encoder.parameters(), fresh

    def targets(self, packed: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) packed bits -> (B, n_out, S, S) float: any finding, or one plane per class."""
        if self.target == "union":
            return (packed != 0).float()
        return torch.cat([(packed >> k) & 1 for k in range(self.n_out)], dim=1).float()

    def batch(self, index: np.ndarray, params: np.ndarray, device: torch.device):
        pixels = replay_views(self.images[index].to(device), params, self.size)
        masks = replay_mask_views(self.masks[index].to(device), params, self.size)
        return self.source.normalise(pixels), self.targets(masks)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_bce(output, target)

    def render(self, split: str, index: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Identity views of some images of a split at the model's size: (pixels in [0, 1], targets)."""
        identity = np.repeat(IDENTITY[None], len(index), 0)
        pixels = replay_views(self.data.images[split][index].to(device), identity, self.size)
        masks = replay_mask_views(self.data.masks[split][index].to(device), identity, self.size)
        return pixels, self.targets(masks)

    @torch.no_grad()
    def predicted(self, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
        self.model.eval()
        with autocast(device):
            logits = self.model(prepare_input(self.source.normalise(pixels), device))
        return logits.float() > 0.0                              # probability above one half

    def counts(self, split: str, device: torch.device) -> np.ndarray:
        """(n, n_out, 3) overlap counts of the split's predictions, batch by batch."""
        n = len(self.data.keys[split])
        out = []
        for start in range(0, n, self.batch_size):
            pixels, truth = self.render(split, np.arange(start, min(n, start + self.batch_size)), device)
            out.append(overlap_counts(self.predicted(pixels, device).cpu().numpy(), truth.cpu().numpy() > 0.5))
        return np.concatenate(out)

    def validate(self, device: torch.device) -> float:
        return seed_scores(self.counts("val", device))["dice"]

    def overlay_cases(self, counts: np.ndarray, device: torch.device) -> list[tuple]:
        """The best and worst test cases by per-image Dice, among those with a finding in truth or prediction."""
        score = np.nanmean(image_dice(counts), axis=1)
        shown = np.flatnonzero(counts[:, :, 1:].sum((1, 2)) > 0)
        ranked = shown[np.argsort(-score[shown], kind="stable")]            # best first
        best = list(ranked[:OVERLAY_CASES])
        worst = [i for i in ranked[::-1][:OVERLAY_CASES] if i not in best]
        picks = np.array(best + worst, dtype=np.int64)
        if not len(picks):
            return []
        pixels, truth = self.render("test", picks, device)
        predicted = self.predicted(pixels, device).cpu().numpy().any(1)
        truth = truth.cpu().numpy().any(1)
        names = ["best"] * len(best) + ["worst"] * len(worst)
        return [(pixels[i, 0].cpu().numpy(), truth[i], predicted[i],
                 f"{names[i]}: {self.data.keys['test'][k]}, Dice {score[k]:.2f}") for i, k in enumerate(picks)]


def segment(source: BackboneSource, data: SegmentData, cfg: SegmentConfig, target: str = "union",
            size: int | None = None, fractions=(1.0,), seeds: int = 1, device: str = "cpu", n_boot: int = 1000,
            on_epoch: Callable[[int], None] | None = None) -> tuple[dict, list[tuple]]:
    """Fine-tune and test per fraction and seed; -> (metrics, overlay cases of the top fraction's first seed)."""
    if target not in TARGETS:
        raise LeaderError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    if seeds < 1:
        raise LeaderError(f"--seeds must be at least 1, got {seeds}")
    size = size or source.image_size
    device = torch.device(device)
    class_names = ["union"] if target == "union" else list(data.classes)
    fractions = sorted(set(float(f) for f in fractions))
    by_fraction, cases, encoder = {}, [], {}
    for fraction in fractions:
        seed_counts, logs = [], []
        for seed in range(seeds):
            train_index = patient_subset(data.train_patients, fraction, seed)
            torch.manual_seed(seed)
            task = SegmentationTask(source, data, train_index, target, cfg, size)
            log = fit(task, cfg, seed, device, on_epoch)
            counts = task.counts("test", device)
            seed_counts.append(counts)
            logs.append({**log, "n_train": int(len(train_index))})
            encoder = task.encoder
            if fraction == fractions[-1] and seed == 0:
                cases = task.overlay_cases(counts, device)
        by_fraction[f"{fraction:g}"] = {**segmentation_summary(fraction, seed_counts, class_names, n_boot),
                                        "training": logs}
    top = by_fraction[f"{fractions[-1]:g}"]
    headline = [f"{name}_{stat}" for name in ("dice", "dice_per_image", "iou", "iou_per_image")
                for stat in ("mean", "std", "ci95")]
    metrics = {
        "primary": "dice_mean",
        **{k: top[k] for k in headline + ["dice_boot", "dice_per_class", "dice_per_image_per_class", "iou_per_class",
                                          "per_seed", "fraction"]},
        "paired": BOOTSTRAP_PAIRS,
        "fractions": by_fraction,
        "target": target,
        "classes": list(data.classes),
        "n_images": {s: len(data.keys[s]) for s in SPLITS},
        "left_out": data.left_out,
        "image_size": size,
        "backbone": source.name,
        "encoder": encoder,
        "recipe": {**asdict(cfg), "optimizer": "AdamW", "loss": "Dice + BCE", "decoder": "smp UPerNet",
                   "schedule": f"{cfg.warmup_epochs:g} epoch(s) linear warm-up, cosine to 0",
                   "selection": "best validation pooled Dice, early stopping"},
        "metric_note": "dice: pooled over every test pixel (primary); dice_per_image: mean over test images, "
                       "an empty prediction on an empty truth scoring 1",
    }
    return metrics, cases


def run_segment(shards_dir, representation: str, out, *, fractions=(1.0,), seeds: int = 1, target: str = "union",
                classes: str | list[str] | None = None, size: int | None = None, device: str = "cpu", n_boot: int = 1000,
                on_epoch: Callable[[int], None] | None = None, **recipe) -> dict:
    """Segment a shard set's masks from `representation`; recipe: SegmentConfig's fields. Writes OUT/metrics.json."""
    unknown = sorted(set(recipe) - set(SegmentConfig.__dataclass_fields__))
    if unknown:
        raise LeaderError(f"segment: unknown setting(s) {unknown}; known: {sorted(SegmentConfig.__dataclass_fields__)}")
    cfg = SegmentConfig(**recipe)
    data = load_segment_data(shards_dir, classes)
    source = backbone_source(representation, size)
    metrics, cases = segment(source, data, cfg, target=target, size=size, fractions=fractions, seeds=seeds,
                             device=device, n_boot=n_boot, on_epoch=on_epoch)
    out = Path(out)
    figures = {}
    if cases:
        segmentation_overlays(cases, out / "overlays.png",
                              title=f"{source.name}, fraction {metrics['fraction']:g}, seed 0: best and worst test cases")
        figures["overlays"] = "overlays.png"
    metrics = {"protocol": "segment", "representation": source.name, "shards": str(shards_dir),
               "samples": {"field": "per_seed", "over": "seeds"}, "figures": figures, **metrics}
    write_metrics(out, metrics)
    return metrics
