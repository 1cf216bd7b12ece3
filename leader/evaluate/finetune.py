"""Full fine-tuning for classification: the whole backbone plus a linear head, trained on image labels.

    source = backbone_source("run:runs/demo/students/student")
    metrics = finetune(source, data, class_names, FinetuneConfig(), fractions=(0.1, 1.0), seeds=3)

The loop is `leader.evaluate.tuning.fit` (AdamW, warm-up then cosine, random views, early
stopping), shared with segmentation. What is classification's own:
- the head starts from the fitted linear probe (LP-FT, `head_init="probe"`): a logistic probe per
  class on the frozen backbone's features of the training images, its L2 strength picked on
  validation AUC (`leader.evaluate.linear_probe.fit_probe`), copied into the head before anything
  is unfrozen. Fine-tuning thus starts where the linear probe ends, and a random head's first
  gradients cannot wreck the features it was given. `head_init="random"` is plain fine-tuning;
- the backbone learns at `lr`, the head at 10 x `lr`; the backbone's BatchNorm statistics stay
  as trained (`keep_norm_stats`), so the features the probe was fitted on do not move under it;
- multi-label BCE with unknown labels masked out; the epoch with the best validation AUC (mean
  over classes) is tested.
Why (measured on the default demo's student, test AUC, linear probe 0.777): plain fine-tuning for
the demo's 3 epochs ended at 0.473, since a random head needs about 10 epochs to rank at all
(20 epochs: 0.771); LP-FT alone ended at 0.756 whatever the learning rate (3e-5: 0.753), because
training-mode BatchNorm re-estimated the backbone's statistics (at a learning rate of 1e-12: 0.752);
LP-FT keeping the statistics: 0.780 after 3 epochs.
`--fraction` keeps a random subset of TRAIN patients per seed, as for the linear probe; the probe
that starts the head sees that subset only. The images of all three splits are held in memory at
the model's resolution: fine-tuning sets are thousands of images, not the pretraining corpus.

Backbones: every starting point of `leader.evaluate.initialisation` (`run:`, `export:`, `timm:`,
`adam:`, `random:`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from leader.errors import LeaderError
from leader.evaluate.figures import auc_bars
from leader.evaluate.initialisation import BackboneSource, backbone_source
from leader.evaluate.items import ItemTable, label_matrix, patient_subset, read_images
from leader.evaluate.linear_probe import BOOTSTRAP_PAIRS, ProbeLabels, evaluable_classes, fit_probe
from leader.evaluate.results import write_metrics
from leader.evaluate.stats import auc_summary, per_class_auc
from leader.shards.class_sets import SOURCE, select_classes
from leader.shards.manifest import Manifest
from leader.evaluate.tuning import Recipe, fit, predict
from leader.views import IDENTITY, replay_views

HEAD_INITS = ("probe", "random")


@dataclass
class FinetuneConfig(Recipe):
    head_init: str = "probe"         # "probe": LP-FT; "random": a freshly initialised head
    select_start: bool = True        # LP-FT's start, the probe, stays when no epoch beats it on val


@dataclass
class FinetuneData:
    """Images (N, 1, S, S) float in [0, 1] at the model's resolution, labels (N, C) 1/0/NaN, per split."""

    images: dict[str, torch.Tensor]
    labels: dict[str, np.ndarray]
    keys: dict[str, list[str]]
    train_patients: np.ndarray


def render_identity(image: np.ndarray, size: int) -> torch.Tensor:
    """A stored image (H, W) uint8/uint16 -> (1, S, S) float, stretched to square as training does."""
    from leader.shards.crop import crop_patch

    h, w = image.shape
    square = crop_patch(image, [0.0, 0.0, float(w), float(h)], max(h, w))
    return replay_views(torch.from_numpy(square)[None, None], IDENTITY[None], size)[0]


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, n_classes: int):
        super().__init__()
        self.backbone = backbone
        if not getattr(backbone, "num_features", 0):
            raise LeaderError(f"finetune: backbone {type(backbone).__name__} does not say its feature width (num_features)")
        self.head = nn.Linear(int(backbone.num_features), n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    known = ~torch.isnan(labels)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, torch.nan_to_num(labels), reduction="none")
    return (loss * known).sum() / known.sum().clamp_min(1)


def mean_auc(scores: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> float:
    aucs = per_class_auc(scores, labels)[classes]
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")


class ClassificationTask:
    """Image labels: a linear head on the backbone, masked BCE, validation AUC."""

    score_name = "val_auc"

    def __init__(self, source: BackboneSource, data: FinetuneData, train_index: np.ndarray, classes: np.ndarray,
                 cfg: FinetuneConfig, device: torch.device):
        self.source, self.data, self.classes, self.batch_size = source, data, classes, cfg.batch_size
        self.model = Classifier(source.build(), data.labels["train"].shape[1])
        self.pretrained = self.model.backbone if source.pretrained else None
        self.images = data.images["train"][train_index]
        self.labels = torch.as_tensor(data.labels["train"][train_index], dtype=torch.float32)
        self.train_keys = [data.keys["train"][i] for i in train_index]
        if cfg.head_init == "probe":
            self.start_from_probe(device)

    def start_from_probe(self, device: torch.device) -> None:
        """LP-FT: fit the linear probe on the frozen backbone's features and make it the head."""
        backbone = self.model.backbone.to(device)

        def features(images: torch.Tensor) -> np.ndarray:
            out = predict(backbone, lambda s: self.source.normalise(images[s]), len(images), self.batch_size, device,
                          activation=lambda x: x)
            return out.double().numpy()

        weight, bias = fit_probe(features(self.images), self.labels.numpy(), features(self.data.images["val"]),
                                 self.data.labels["val"])
        with torch.no_grad():
            self.model.head.weight.copy_(torch.from_numpy(weight.T))
            self.model.head.bias.copy_(torch.from_numpy(bias))

    def parameter_groups(self):
        return self.model.backbone.parameters(), self.model.head.parameters()

    def batch(self, index: np.ndarray, params: np.ndarray, device: torch.device):
        pixels = replay_views(self.images[index].to(device), params, self.source.image_size)
        return self.source.normalise(pixels), self.labels[index].to(device)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return masked_bce(output, target)

    def scores(self, split: str, device: torch.device) -> np.ndarray:
        images = self.data.images[split]
        return predict(self.model, lambda s: self.source.normalise(images[s]), len(images), self.batch_size,
                       device).numpy()

    def validate(self, device: torch.device) -> float:
        return mean_auc(self.scores("val", device), self.data.labels["val"], self.classes)


def train_one(source: BackboneSource, data: FinetuneData, train_index: np.ndarray, classes: np.ndarray,
              cfg: FinetuneConfig, seed: int, device: str,
              on_epoch: Callable[[int], None] | None = None) -> tuple[np.ndarray, dict]:
    """Fine-tune once; -> (test probabilities (n_test, C), training log)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    task = ClassificationTask(source, data, train_index, classes, cfg, device)
    start = task.validate(device)                  # where fine-tuning starts: the probe's, or chance
    log = fit(task, cfg, seed, device, on_epoch)
    return task.scores("test", device), {"val_auc_at_start": start, **log}


def finetune(source: BackboneSource, data: FinetuneData, class_names: list[str], cfg: FinetuneConfig,
             fractions=(1.0,), seeds: int = 1, device: str = "cpu", n_boot: int = 1000,
             on_epoch: Callable[[int], None] | None = None) -> dict:
    if cfg.head_init not in HEAD_INITS:
        raise LeaderError(f"finetune: head_init must be one of {HEAD_INITS}, got {cfg.head_init!r}")
    classes, skipped = evaluable_classes(
        ProbeLabels(data.labels["train"], data.labels["val"], data.labels["test"], data.train_patients), class_names)
    if len(classes) == 0:
        raise LeaderError(f"finetune: no class has both labels in train and test ({skipped})")
    by_fraction = {}
    for fraction in sorted(set(float(f) for f in fractions)):
        scores, per_seed, logs = [], [], []
        for seed in range(seeds):
            train_index = patient_subset(data.train_patients, fraction, seed)
            test_scores, log = train_one(source, data, train_index, classes, cfg, seed, device, on_epoch)
            scores.append(test_scores)
            per_seed.append(mean_auc(test_scores, data.labels["test"], classes))
            logs.append({**log, "n_train": int(len(train_index))})
        by_fraction[f"{fraction:g}"] = {
            **auc_summary(fraction, per_seed, scores, data.labels["test"], classes, class_names, n_boot),
            "training": logs,
        }
    top = by_fraction[max(by_fraction, key=float)]
    head = ("the fitted linear probe (LP-FT)" if cfg.head_init == "probe" else "random")
    return {
        "primary": "auc_mean",
        **{k: top[k] for k in ("auc_mean", "auc_std", "auc_ci95", "auc_boot", "auc_per_class", "per_seed", "fraction")},
        "paired": BOOTSTRAP_PAIRS,                # the same resamples as the linear probe's, on the same test images
        "fractions": by_fraction,
        "classes": [class_names[c] for c in classes],
        "skipped_classes": skipped,
        "recipe": {**asdict(cfg), "optimizer": "AdamW", "head": head,
                   "schedule": f"{cfg.warmup_epochs:g} epoch(s) linear warm-up, cosine to 0",
                   "selection": "best validation AUC, early stopping"},
        "backbone": source.name,
        "image_size": source.image_size,
    }


# ---------------------------------------------------------------------------------------------
# On a shard set: `leader eval finetune`


def load_finetune_data(shards_dir, class_names: list[str], image_size: int, source: bool = False) -> FinetuneData:
    table = ItemTable.load(shards_dir)
    items = {split: table.select(kind="image", split=split) for split in ("train", "val", "test")}
    for split, chosen in items.items():
        if not chosen:
            raise LeaderError(f"finetune: the {split} split of {shards_dir} has no images")
    pixels = read_images(shards_dir, [it.key for split in items for it in items[split]])
    return FinetuneData(
        images={s: torch.stack([render_identity(pixels[it.key], image_size) for it in items[s]]) for s in items},
        labels={s: label_matrix(items[s], class_names, source) for s in items},
        keys={s: [it.key for it in items[s]] for s in items},
        train_patients=np.array([it.patient for it in items["train"]]),
    )


def run_finetune(shards_dir, backbone: str, out, *, fractions=(1.0,), seeds: int = 1, image_size: int | None = None,
                 classes=None, device: str = "cpu", n_boot: int = 1000, on_epoch: Callable[[int], None] | None = None,
                 **recipe) -> dict:
    """Fine-tune `backbone` on a shard set's image labels; recipe: FinetuneConfig's fields (epochs, lr, ...).
    classes: the labels to learn and average, as for the linear probe ("all", a class set, a list)."""
    unknown = sorted(set(recipe) - set(FinetuneConfig.__dataclass_fields__))
    if unknown:
        raise LeaderError(f"finetune: unknown setting(s) {unknown}; known: {sorted(FinetuneConfig.__dataclass_fields__)}")
    cfg = FinetuneConfig(**recipe)
    source = backbone_source(backbone, image_size)
    selection = select_classes(Manifest.load(shards_dir), classes)
    class_names = selection.names
    data = load_finetune_data(shards_dir, class_names, source.image_size, selection.labels == SOURCE)
    metrics = finetune(source, data, class_names, cfg, fractions=fractions, seeds=seeds, device=device,
                       n_boot=n_boot, on_epoch=on_epoch)
    out = Path(out)
    auc_bars({source.name: metrics["auc_per_class"]}, out / "auc_per_class.png",
             title=f"fine-tuned, fraction {metrics['fraction']:g}: {source.name}")
    metrics = {"protocol": "finetune", "representation": source.name, "shards": str(shards_dir),
               "class_set": selection.preset or "a list", "class_labels": selection.labels,
               "samples": {"field": "per_seed", "over": "seeds"},
               "figures": {"auc_per_class": "auc_per_class.png"}, **metrics}
    write_metrics(out, metrics)
    return metrics
