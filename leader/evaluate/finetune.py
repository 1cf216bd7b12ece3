"""Full fine-tuning: the whole backbone plus a linear classification head, trained on image labels.

    source = backbone_source("timm:resnet18:weights.safetensors", image_size=224)
    metrics = finetune(source, data, class_names, FinetuneConfig(), fractions=(0.1, 1.0), seeds=3)

The transfer recipe (the paper fine-tunes with AdamW and a cosine schedule, selecting on
validation AUC; the numbers below are ours where it is silent):
- AdamW, weight decay 0.05; backbone lr `lr`, head lr 10 x `lr`;
- linear warm-up over the first epoch, then cosine decay to zero over `epochs`;
- each step sees a random view of each image (the paper's augmentations through `replay_views`:
  affine, h-flip, brightness/contrast/gamma), drawn from (seed, epoch, key);
- multi-label BCE with unknown labels masked out;
- after every epoch, validation AUC (mean over classes); training stops when it has not improved
  for `patience` epochs and the best epoch's weights are tested.
`--fraction` keeps a random subset of TRAIN patients per seed, as for the linear probe. The
images of all three splits are held in memory at the model's resolution: fine-tuning sets are
thousands of images, not the pretraining corpus.

Backbones: `run:RUN` (the student's backbone, through `leader.train`) or `timm:ARCH[:CHECKPOINT]`
(any timm model, ImageNet-style input, optionally initialised from a local checkpoint).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from leader.errors import LeaderError
from leader.evaluate.figures import auc_bars
from leader.evaluate.items import ItemTable, label_matrix, patient_subset, read_images
from leader.evaluate.linear_probe import ProbeLabels, evaluable_classes
from leader.evaluate.results import write_metrics
from leader.evaluate.stats import auc_summary, per_class_auc
from leader.network_input import IMAGENET_MEAN, IMAGENET_STD, normalise_input
from leader.schedule import warmup_cosine
from leader.views import IDENTITY, ViewSpec, replay_views, sample_view_params



@dataclass
class FinetuneConfig:
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-4
    head_lr_scale: float = 10.0
    weight_decay: float = 0.05
    patience: int = 5
    augment: bool = True


@dataclass
class BackboneSource:
    """How to build a fresh copy of the starting backbone, and what input it expects."""

    name: str
    build: Callable[[], nn.Module]           # -> a module mapping (B, C, S, S) to (B, num_features)
    image_size: int
    in_chans: int = 3
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) in [0, 1] -> backbone input (grayscale replicated, or one channel)."""
        return normalise_input(pixels, self.in_chans, self.mean, self.std)


def backbone_source(spec: str, image_size: int | None = None, device: str = "cpu") -> BackboneSource:
    """`run:RUN` or `timm:ARCH[:CHECKPOINT]` -> BackboneSource."""
    kind, _, rest = spec.partition(":")
    if kind == "timm" and rest:
        arch, _, checkpoint = rest.partition(":")
        return timm_source(arch, checkpoint or None, image_size or 224)
    if kind == "run" and rest:
        return run_source(rest, image_size)
    raise LeaderError(f"finetune needs run:RUN or timm:ARCH[:CHECKPOINT], got {spec!r} "
                      "(a teacher's cached embeddings cannot be fine-tuned)")


def timm_source(arch: str, checkpoint: str | None, image_size: int) -> BackboneSource:
    import timm

    from leader.precompute.teachers.checkpoints import load_backbone, read_checkpoint, strip_prefix, unwrap_state_dict

    state = None
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise LeaderError(f"finetune: checkpoint {checkpoint} not found")
        state = strip_prefix(unwrap_state_dict(read_checkpoint(path), repr(checkpoint)), "module.")

    def build() -> nn.Module:
        try:
            net = timm.create_model(arch, pretrained=False, num_classes=0)
        except RuntimeError as e:
            raise LeaderError(f"finetune: timm has no model {arch!r}: {e}") from None
        if state is not None:
            load_backbone(net, state, repr(checkpoint))
        return net

    return BackboneSource(f"timm:{arch}" + (f":{checkpoint}" if checkpoint else ""), build, image_size)


def run_source(run_dir: str, image_size: int | None) -> BackboneSource:
    if not Path(run_dir).is_dir():
        raise LeaderError(f"finetune: run directory {run_dir} not found")
    from leader.train.embed import load_student

    student, student_input, _ = load_student(run_dir, device="cpu")
    weights = copy.deepcopy(student.backbone.state_dict())

    def build() -> nn.Module:
        net = copy.deepcopy(student.backbone)
        net.load_state_dict(weights)
        return net

    return BackboneSource(f"run:{run_dir}", build, image_size or student_input.image_size, student_input.in_chans,
                          tuple(student_input.mean), tuple(student_input.std))


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


@torch.no_grad()
def predict(model: Classifier, source: BackboneSource, images: torch.Tensor, batch_size: int, device) -> np.ndarray:
    model.eval()
    out = [torch.sigmoid(model(source.normalise(images[i:i + batch_size].to(device)))).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


def mean_auc(scores: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> float:
    aucs = per_class_auc(scores, labels)[classes]
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")


def train_one(source: BackboneSource, data: FinetuneData, train_index: np.ndarray, classes: np.ndarray,
              cfg: FinetuneConfig, seed: int, device: str,
              on_epoch: Callable[[int], None] | None = None) -> tuple[np.ndarray, dict]:
    """Fine-tune once; -> (test probabilities (n_test, C), training log)."""
    torch.manual_seed(seed)
    n_classes = data.labels["train"].shape[1]
    model = Classifier(source.build(), n_classes).to(device)
    optimizer = torch.optim.AdamW([
        {"params": model.backbone.parameters(), "lr": cfg.lr},
        {"params": model.head.parameters(), "lr": cfg.lr * cfg.head_lr_scale},
    ], weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_index) / cfg.batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, steps_per_epoch

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total, warmup))
    images, labels = data.images["train"][train_index], torch.as_tensor(data.labels["train"][train_index], dtype=torch.float32)
    keys = [data.keys["train"][i] for i in train_index]
    spec, rng = ViewSpec(), np.random.default_rng(seed)
    best = (-math.inf, -1, None)
    log = {"val_auc": [], "train_loss": []}
    for epoch in range(cfg.epochs):
        model.train()
        order = rng.permutation(len(train_index))
        params = (sample_view_params(spec, seed * 100_003 + epoch, keys, 2)[:, 1] if cfg.augment
                  else np.repeat(IDENTITY[None], len(keys), 0))
        losses = []
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            if len(batch) < 2:
                continue                                   # BatchNorm cannot train on a single image
            pixels = replay_views(images[batch].to(device), params[batch], source.image_size)
            loss = masked_bce(model(source.normalise(pixels)), labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        val_auc = mean_auc(predict(model, source, data.images["val"], cfg.batch_size, device), data.labels["val"], classes)
        log["train_loss"].append(float(np.mean(losses)))
        log["val_auc"].append(val_auc)
        if on_epoch:
            on_epoch(1)
        # A validation split that cannot rank any class (NaN) selects nothing: keep the last epoch.
        if np.isnan(val_auc) or val_auc > best[0] or best[2] is None:
            best = (val_auc if not np.isnan(val_auc) else -math.inf, epoch, copy.deepcopy(model.state_dict()))
        elif epoch - best[1] >= cfg.patience:
            if on_epoch:
                on_epoch(cfg.epochs - epoch - 1)           # the epochs early stopping saved
            break
    model.load_state_dict(best[2])
    log.update(best_epoch=best[1], epochs_run=len(log["val_auc"]))
    return predict(model, source, data.images["test"], cfg.batch_size, device), log


def finetune(source: BackboneSource, data: FinetuneData, class_names: list[str], cfg: FinetuneConfig,
             fractions=(1.0,), seeds: int = 1, device: str = "cpu", n_boot: int = 1000,
             on_epoch: Callable[[int], None] | None = None) -> dict:
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
    return {
        "primary": "auc_mean",
        **{k: top[k] for k in ("auc_mean", "auc_std", "auc_ci95", "auc_per_class", "per_seed", "fraction")},
        "fractions": by_fraction,
        "classes": [class_names[c] for c in classes],
        "skipped_classes": skipped,
        "recipe": {**asdict(cfg), "optimizer": "AdamW", "schedule": "1 epoch linear warm-up, cosine to 0",
                   "selection": "best validation AUC, early stopping"},
        "backbone": source.name,
        "image_size": source.image_size,
    }


# ---------------------------------------------------------------------------------------------
# On a shard set: `leader eval finetune`


def load_finetune_data(shards_dir, class_names: list[str], image_size: int) -> FinetuneData:
    table = ItemTable.load(shards_dir)
    items = {split: table.select(kind="image", split=split) for split in ("train", "val", "test")}
    for split, chosen in items.items():
        if not chosen:
            raise LeaderError(f"finetune: the {split} split of {shards_dir} has no images")
    pixels = read_images(shards_dir, [it.key for split in items for it in items[split]])
    return FinetuneData(
        images={s: torch.stack([render_identity(pixels[it.key], image_size) for it in items[s]]) for s in items},
        labels={s: label_matrix(items[s], class_names) for s in items},
        keys={s: [it.key for it in items[s]] for s in items},
        train_patients=np.array([it.patient for it in items["train"]]),
    )


def run_finetune(shards_dir, backbone: str, out, *, fractions=(1.0,), seeds: int = 1, image_size: int | None = None,
                 device: str = "cpu", n_boot: int = 1000, on_epoch: Callable[[int], None] | None = None,
                 **recipe) -> dict:
    """Fine-tune `backbone` on a shard set's image labels; recipe: FinetuneConfig's fields (epochs, lr, ...)."""
    unknown = sorted(set(recipe) - set(FinetuneConfig.__dataclass_fields__))
    if unknown:
        raise LeaderError(f"finetune: unknown setting(s) {unknown}; known: {sorted(FinetuneConfig.__dataclass_fields__)}")
    cfg = FinetuneConfig(**recipe)
    source = backbone_source(backbone, image_size)
    class_names = ItemTable.load(shards_dir).label_names
    data = load_finetune_data(shards_dir, class_names, source.image_size)
    metrics = finetune(source, data, class_names, cfg, fractions=fractions, seeds=seeds, device=device,
                       n_boot=n_boot, on_epoch=on_epoch)
    out = Path(out)
    auc_bars({source.name: metrics["auc_per_class"]}, out / "auc_per_class.png",
             title=f"fine-tuned, fraction {metrics['fraction']:g}: {source.name}")
    metrics = {"protocol": "finetune", "representation": source.name, "shards": str(shards_dir),
               "samples": {"field": "per_seed", "over": "seeds"},
               "figures": {"auc_per_class": "auc_per_class.png"}, **metrics}
    write_metrics(out, metrics)
    return metrics
